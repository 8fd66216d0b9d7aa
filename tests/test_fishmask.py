"""FishMask: the changed count is exactly what the fixed Fisher mask allows, and the file stores it sparse."""

import json

import pytest
import torch

import peftlab
from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.core.hooks import pretrained_parameters
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import ClassificationTask, TrainSettings, fit
from tests.short_fit import run_fit

HEAD = ("classifier.weight", "classifier.bias")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_csv, tmp_path_factory):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    data = prepare_data(options, quiet=True)
    adapter = peftlab.attach(build_model(options, data, 0), "fishmask", keep=0.02, fisher_examples=16)
    head_before = {k: adapter.initial[k].clone() for k in HEAD}
    settings = TrainSettings(max_steps=6, batch_size=8, lr=1e-2, warmup=0, seed=0)
    tmp = tmp_path_factory.mktemp("fishmask")
    fit(
        adapter,
        ClassificationTask(2),
        data.splits["train"],
        data.splits["validation"],
        settings,
        1e-2,
        tmp / "ckpt",
        lambda m, s: None,
        torch.device("cpu"),
        show_progress=False,
    )
    adapter.save(tmp / "adapter")
    return options, data, adapter, head_before, tmp / "adapter"


def test_changed_equals_the_mask_size_plus_the_head_entries_that_moved(trained):
    _, _, adapter, head_before, _ = trained
    total = sum(p.numel() for p in pretrained_parameters(adapter).values())
    mask_size = sum(int(m.sum()) for m in adapter.masks.values())
    assert mask_size == round(0.02 * total)
    state = adapter.state()
    head_moved = sum(int((state[k] != head_before[k]).sum()) for k in HEAD)
    counts = peftlab.parameter_counts(adapter)
    assert counts["changed"] == mask_size + head_moved
    assert counts["trainable"] == mask_size + sum(state[k].numel() for k in HEAD)


def test_the_saved_delta_is_sparse_indices_and_values(trained):
    _, _, adapter, _, folder = trained
    tensors = read_tensors(folder / WEIGHTS_FILE)
    state = adapter.state()
    for name, mask in adapter.masks.items():
        assert name not in tensors
        indices, values = tensors[f"{name}::indices"], tensors[f"{name}::values"]
        assert torch.equal(indices, torch.nonzero(mask.reshape(-1)).reshape(-1))
        assert torch.equal(values, state[name].detach().reshape(-1)[indices])
    assert all(tensors[k].shape == state[k].shape for k in HEAD)  # the new head is stored dense
    stored = sum(t.numel() for t in tensors.values())
    assert stored < 0.1 * sum(p.numel() for p in adapter.model.parameters())


def test_loading_restores_the_mask_and_the_weights(trained):
    options, data, adapter, _, folder = trained
    loaded = peftlab.load_adapter(build_model(options, data, 1), folder)
    assert set(loaded.masks) == set(adapter.masks)
    assert all(torch.equal(loaded.masks[k], m) for k, m in adapter.masks.items())
    original = dict(adapter.model.named_parameters())
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, original[name]), name


def test_training_on_from_a_saved_adapter_keeps_its_mask(trained, tmp_path):
    options, data, adapter, _, folder = trained
    loaded = peftlab.load_adapter(build_model(options, data, 1), folder)
    run_fit(loaded, data, tmp_path, 2, seed=1, schedule="linear", checkpoint_every=200)
    assert all(torch.equal(loaded.masks[k], m) for k, m in adapter.masks.items())
    state = dict(loaded.model.named_parameters())
    for k, m in adapter.masks.items():  # outside the mask the weights are still the pretrained ones
        assert torch.equal(state[k][~m], loaded.initial[k][~m])


def test_the_cli_reports_the_mask_and_merges(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, err = cli(
        "train", "--model", tiny_model_dir, "--data", tiny_csv, "--max-length", "32", "--max-steps", "3",
        "--train-limit", "24", "--method", "fishmask", "--keep", "0.01", "--fisher-examples", "100",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    mask = results["method_report"]["mask"]
    assert mask["selected"] == round(0.01 * mask["of"]) and mask["share"] == 0.01
    assert mask["fisher_examples"] == 100 and mask["fisher_examples_used"] == results["data_sizes"]["train"] < 100
    assert results["params"]["trainable"] == mask["selected"] + 32 * 2 + 2
    code, _, err = cli("merge", tmp_path / "run", "--out", tmp_path / "merged")
    assert code == 0, err


@pytest.mark.parametrize("keep", [0, 1.5])
def test_keep_is_a_share(keep):
    from tests.conftest import tiny_classifier

    with pytest.raises(peftlab.InputError, match="^keep: expected a share in"):
        peftlab.attach(tiny_classifier(), "fishmask", keep=keep)
