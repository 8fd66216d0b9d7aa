"""Diff pruning: the hard-concrete gate and its closed-form L0 expectation, the global magnitude projection, the
accounting (about twice the model trains, the kept share changes), the sparse saved form, merging, ties, an exact
resume after the projection, a best state only from after it, and one-line errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.core.registry import config_from_dict, config_to_dict
from peftlab.methods.diff_pruning import (
    DiffPrunedLayer,
    DiffPruningConfig,
    DiffPruningHooks,
    hard_concrete,
    hard_concrete_eval,
    probability_nonzero,
)
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import ClassificationTask, TrainSettings
from peftlab.train.step import param_groups
from tests.conftest import tiny_classifier
from tests.short_fit import fit_tiny

HEAD = ("classifier.weight", "classifier.bias")
HEAD_SIZE = 32 * 2 + 2
OPTIONS = {"keep": 0.02, "prune_at": 0.5}
SETTINGS = dict(
    max_steps=8, batch_size=8, lr=1e-2, head_lr=2e-2, warmup=0, schedule="constant", checkpoint_every=2, seed=0
)


def covered(adapter) -> int:
    """Entries of the pretrained parameters that carry a diff."""
    return sum(layer.diff(n).numel() for layer in adapter.layers().values() for n in layer.names)


def kept(adapter) -> int:
    return sum(int(layer.mask(n).sum()) for layer in adapter.layers().values() for n in layer.names)


@pytest.mark.parametrize(("lower", "upper"), [(-1.5, 1.5), (-0.1, 1.1)])
def test_the_share_of_open_gates_is_the_closed_form_l0_expectation(lower, upper):
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.7, 2.0, 5.0]).repeat_interleave(200_000)
    u = torch.rand(log_alpha.shape, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    z = hard_concrete(log_alpha, u, lower, upper)
    assert z.min() >= 0 and z.max() <= 1
    assert 0 < (z == 1).float().mean() < 1  # the stretch puts mass on exactly 0 and exactly 1
    opened = (z > 0).float().reshape(6, -1).mean(1)
    expected = probability_nonzero(log_alpha.reshape(6, -1)[:, 0], lower, upper)
    torch.testing.assert_close(opened, expected, rtol=0, atol=4e-3)  # 200,000 draws: standard error <= 1.2e-3
    if lower != -upper:  # the shift beta log(-l / r) matters: the expectation is not just sigmoid(log_alpha)
        assert not torch.allclose(expected, torch.sigmoid(log_alpha.reshape(6, -1)[:, 0]), atol=0.05)
    mean = hard_concrete_eval(log_alpha[::200_000], lower, upper)
    torch.testing.assert_close(mean, (torch.sigmoid(log_alpha[::200_000]) * (upper - lower) + lower).clamp(0, 1))


def test_a_layer_runs_its_base_with_theta_0_plus_the_diff():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = DiffPrunedLayer(base, ["weight", "bias"], log_alpha_init=1.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # w = 0: the identity
    with torch.no_grad():
        layer.diff_weight.normal_()
        layer.diff_bias.normal_()
    z = hard_concrete_eval(torch.tensor(1.0))  # 0.69: outside training the gate is deterministic
    expected = F.linear(x, base.weight + z * layer.diff_weight, base.bias + z * layer.diff_bias)
    torch.testing.assert_close(layer.eval()(x), expected)
    layer.fix({"weight": torch.rand(4, 6) > 0.5, "bias": torch.tensor([True, False, False, True])})
    expected = F.linear(
        x, base.weight + layer.mask_weight * layer.diff_weight, base.bias + layer.mask_bias * layer.diff_bias
    )
    torch.testing.assert_close(layer(x), expected)
    layer.train()(x).sum().backward()
    assert layer.log_alpha_weight.grad is None  # once fixed, the gates take no part
    assert torch.equal(layer.diff_weight.grad == 0, ~layer.mask_weight)


def test_every_pretrained_parameter_outside_the_head_gets_one_diff_and_one_gate():
    model = tiny_classifier()
    pretrained = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier."))
    adapter = peftlab.attach(model, "diff_pruning")
    assert covered(adapter) == pretrained
    counts = peftlab.parameter_counts(adapter)
    assert counts["adapter"] == 2 * pretrained  # w and log_alpha for every entry
    assert counts["trainable"] == 2 * pretrained + HEAD_SIZE
    assert counts["changed"] == 0
    kinds = {type(layer.base).__name__ for layer in adapter.layers().values()}
    assert {"Embedding", "Linear", "LayerNorm"} <= kinds
    groups = {g["name"]: g for g in param_groups(adapter, 0.01, 5e-5)}
    assert groups["log_alpha_*"]["lr"] == 0.1 and groups["log_alpha_*"]["weight_decay"] == 0.0  # whatever the rate
    fixed = peftlab.attach(tiny_classifier(), "diff_pruning", search=False)  # the saved form, empty: only the head
    assert peftlab.parameter_counts(fixed)["trainable"] == HEAD_SIZE


def test_the_projection_keeps_the_largest_deltas_over_the_whole_model():
    adapter = peftlab.attach(tiny_classifier(), "diff_pruning", keep=0.01)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers().values():
            for n in layer.names:
                layer.diff(n).copy_(torch.randn(layer.diff(n).shape, generator=g))
                getattr(layer, f"log_alpha_{n}").copy_(torch.randn(layer.diff(n).shape, generator=g) * 2)
    before = {
        (name, n): layer.delta(n).detach().clone() for name, layer in adapter.layers().items() for n in layer.names
    }
    hooks = DiffPruningHooks(adapter, adapter.config)
    hooks.project(step=3)
    assert kept(adapter) == round(0.01 * covered(adapter))
    inside = torch.cat([before[k][adapter.layers()[k[0]].mask(k[1])].abs() for k in before])
    outside = torch.cat([before[k][~adapter.layers()[k[0]].mask(k[1])].abs() for k in before])
    assert inside.min() >= outside.max()  # one threshold for all tensors
    per_tensor = {k: int(adapter.layers()[k[0]].mask(k[1]).sum()) for k in before}
    assert len(set(per_tensor.values())) > 2  # not a share per tensor
    for (name, n), delta in before.items():
        layer = adapter.layers()[name]
        assert torch.equal(layer.diff(n), torch.where(layer.mask(n), delta, 0))
    assert hooks.penalty() is None and hooks.final_form(3) and hooks.report(None)["diff"]["pruned_at_step"] == 3


def setup(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    return options, prepare_data(options, quiet=True)


def train(options, data, folder, resume=False, crash_after=None, **settings):
    adapter = peftlab.attach(build_model(options, data, 0), "diff_pruning", **OPTIONS)
    hooks = DiffPruningHooks(adapter, adapter.config)
    result = fit_tiny(adapter, data, folder, TrainSettings(**(SETTINGS | settings)), resume, hooks, crash_after)
    return adapter, hooks, result


def task_loss(adapter, data) -> float:
    batch = data.splits["train"].batch(range(64), torch.device("cpu"))
    with torch.no_grad():
        return float(ClassificationTask(2).loss(adapter.model.eval(), batch))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_csv, tmp_path_factory):
    options, data = setup(tiny_model_dir, tiny_csv)
    tmp = tmp_path_factory.mktemp("diff_pruning")
    adapter, hooks, _ = train(options, data, tmp / "ckpt")
    adapter.model.eval()
    adapter.save(tmp / "adapter")
    return options, data, adapter, hooks, tmp


def test_training_projects_halfway_and_keeps_the_diff_inside_the_mask(trained):
    _, _, adapter, hooks, _ = trained
    report = hooks.report(None)["diff"]
    assert report["pruned_at_step"] == 4 and report["kept"] == round(0.02 * covered(adapter)) == kept(adapter)
    assert 0 < report["expected_nonzero_share"] < 1 and report["open_gate_share"] == 1.0
    for layer in adapter.layers().values():
        for n in layer.names:
            assert torch.all(layer.diff(n)[~layer.mask(n)] == 0)  # AdamW never moved an entry outside M


def test_the_loss_falls_and_stays_down_after_the_projection(tiny_model_dir, tiny_csv, tmp_path):
    options, data = setup(tiny_model_dir, tiny_csv)
    adapter = peftlab.attach(build_model(options, data, 0), "diff_pruning", keep=0.1, prune_at=0.5)
    start = task_loss(adapter, data)
    settings = TrainSettings(**(SETTINGS | {"max_steps": 24, "batch_size": 16, "checkpoint_every": 0}))
    result = fit_tiny(adapter, data, tmp_path / "ckpt", settings)
    assert task_loss(adapter, data) < start - 0.05  # 0.692 -> 0.605 with the 10% diff kept after step 12
    assert result.best["accuracy"] == 1.0


def test_about_twice_the_model_trains_and_the_kept_share_changes(trained):
    _, _, adapter, _, _ = trained
    counts = peftlab.parameter_counts(adapter)
    assert counts["trainable"] == 2 * covered(adapter) + HEAD_SIZE
    state = adapter.state()
    moved = sum(int(torch.count_nonzero(layer.delta(n))) for layer in adapter.layers().values() for n in layer.names)
    head_moved = sum(int((state[k] != adapter.initial[k]).sum()) for k in HEAD)
    assert 0 < moved <= kept(adapter)
    assert counts["changed"] == moved + head_moved
    assert counts["changed"] < 0.05 * counts["trainable"]


def test_the_saved_adapter_is_the_sparse_diff_and_round_trips(trained):
    options, data, adapter, _, tmp = trained
    folder = tmp / "adapter"
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["config"]["search"] is False and meta["trained_as"]["search"] is True
    tensors = read_tensors(folder / WEIGHTS_FILE)
    assert not any("log_alpha" in k for k in tensors)
    diffs = [k for k in tensors if "diff_" in k]
    assert diffs and all(k.endswith(("::indices", "::values")) for k in diffs)
    assert all(tensors[k].dtype == torch.int32 for k in diffs if k.endswith("::indices"))
    assert sum(tensors[k].numel() for k in diffs if k.endswith("::values")) == kept(adapter)
    dense = 4 * (covered(adapter) + HEAD_SIZE)
    assert (folder / WEIGHTS_FILE).stat().st_size < 0.3 * dense
    loaded = peftlab.load_adapter(build_model(options, data, 1), folder)
    batch = data.splits["test"].batch(range(8), torch.device("cpu"))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(**batch).logits, adapter.model(**batch).logits, rtol=0, atol=0)
    counts = peftlab.parameter_counts(loaded)
    assert counts["trainable"] == kept(loaded) + HEAD_SIZE and kept(loaded) <= kept(adapter)  # M = (w != 0)
    assert counts["changed"] == peftlab.parameter_counts(adapter)["changed"]


def test_merged_equals_unmerged_and_unloads_to_a_plain_model(trained):
    options, data, _, _, tmp = trained
    adapter = peftlab.load_adapter(build_model(options, data, 1), tmp / "adapter")
    batch = data.splits["test"].batch(range(8), torch.device("cpu"))
    batch.pop("labels")
    model = adapter.model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        changed = peftlab.changed_parameters(adapter)
        adapter.merge()
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-6)
        assert peftlab.changed_parameters(adapter) == changed
        adapter.unmerge()
        adapter.merge()
        plain = adapter.unload()
        assert not any(isinstance(m, DiffPrunedLayer) for m in plain.modules())
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=0, atol=1e-6)


def test_training_on_from_a_saved_adapter_keeps_its_entries(trained, tmp_path):
    options, data, adapter, _, tmp = trained
    loaded = peftlab.load_adapter(build_model(options, data, 1), tmp / "adapter")
    mask = {name: {n: layer.mask(n).clone() for n in layer.names} for name, layer in loaded.layers().items()}
    before = {k: v.detach().clone() for k, v in loaded.state().items()}
    fit_tiny(loaded, data, tmp_path / "ckpt", TrainSettings(**(SETTINGS | {"max_steps": 2, "seed": 1})))
    state = loaded.state()
    for name, layer in loaded.layers().items():
        for n in layer.names:
            assert torch.equal(layer.mask(n), mask[name][n])
            diff = state[f"{name}.diff_{n}"]
            assert torch.all(diff[~mask[name][n]] == 0)
    assert any(not torch.equal(state[k], before[k]) for k in state if ".diff_" in k)


@pytest.mark.parametrize("crash_after", [2, 6])  # before and after the projection (after step 4)
def test_an_interrupted_run_resumes_exactly(tiny_model_dir, tiny_csv, tmp_path, crash_after):
    options, data = setup(tiny_model_dir, tiny_csv)
    straight, straight_hooks, _ = train(options, data, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(options, data, tmp_path / "b", crash_after=crash_after)
    resumed, resumed_hooks, _ = train(options, data, tmp_path / "b", resume=True)
    for key, value in straight.state().items():
        assert torch.equal(resumed.state()[key], value), key
    for key, value in straight_hooks.state_dict().items():
        assert torch.equal(resumed_hooks.state_dict()[key], value), key
    for name, layer in straight.layers().items():
        for n in layer.names:
            assert torch.equal(resumed.layers()[name].mask(n), layer.mask(n))


def test_the_best_state_is_never_one_from_before_the_projection(tiny_model_dir, tiny_csv, tmp_path):
    options, data = setup(tiny_model_dir, tiny_csv)
    best_steps = []
    adapter = peftlab.attach(build_model(options, data, 0), "diff_pruning", keep=0.02, prune_at=0.75)
    settings = TrainSettings(**(SETTINGS | {"max_steps": None, "epochs": 2, "batch_size": 32}))  # 6 steps an epoch
    result = fit_tiny(adapter, data, tmp_path / "ckpt", settings, on_best=lambda m, step: best_steps.append(step))
    assert [h["step"] for h in result.history] == [6, 12]  # the first evaluation comes before the projection (9)
    assert best_steps == [12] and result.best_step == 12


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("keep", 0, "^keep: expected a share in"),
        ("keep", 1.5, "^keep: expected a share in"),
        ("prune_at", 0, "^prune_at: expected a share of the steps"),
        ("prune_at", 1.2, "^prune_at: expected a share of the steps"),
        ("l0_weight", -1.0, "^l0_weight: expected a number >= 0"),
        ("gate_lr", 0, "^gate_lr: expected a positive number"),
        ("log_alpha_init", float("inf"), "log_alpha_init: expected a finite number"),
        ("targets", ["no_such_module"], "^targets: pattern 'no_such_module' covers no module"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_field(option, value, message):
    with pytest.raises(peftlab.InputError, match=message) as error:
        peftlab.attach(tiny_classifier(), "diff_pruning", **{option: value})
    assert "\n" not in str(error.value)


def test_a_tied_lm_head_reads_the_embeddings_diff():
    from transformers import LlamaForCausalLM

    from peftlab.bench.assets import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    adapter = peftlab.attach(model, "diff_pruning", search=False)
    layers = adapter.layers()
    assert layers["lm_head"].names == [] and layers["lm_head"].shared == {
        "weight": (layers["model.embed_tokens"], "weight")
    }
    embedding = layers["model.embed_tokens"]
    with torch.no_grad():
        embedding.diff_weight.normal_(0, 0.3)
        embedding.mask_weight.fill_(True)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        adapter.merge()
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-5)
        assert peftlab.parameter_counts(adapter)["changed"] == 64 * 32  # the tied tensor counted once
        adapter.unmerge()
    hidden = model.model(ids).last_hidden_state
    weight = model.model.embed_tokens.base.weight + embedding.diff_weight
    torch.testing.assert_close(logits, F.linear(hidden, weight), rtol=0, atol=1e-5)  # the head uses theta_0 + delta


def test_the_cli_reports_the_search_counts_honestly_and_merges(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, err = cli(
        "train", "--model", tiny_model_dir, "--data", tiny_csv, "--max-length", "32", "--max-steps", "6",
        "--batch-size", "16", "--method", "diff_pruning", "--keep", "0.01", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report, params = results["method_report"]["diff"], results["params"]
    assert report["pruned_at_step"] == 3 and report["kept"] == round(0.01 * report["of"])
    assert params["trainable"] == 2 * report["of"] + HEAD_SIZE  # what the optimiser updated over the run
    assert params["adapter"] == report["of"]  # the saved form: the diff without its gates
    assert params["changed"] <= report["kept"] + HEAD_SIZE
    assert results["adapter_bytes"] < 0.2 * 4 * report["of"]
    assert results["best_step"] == 6
    code, _, err = cli("merge", tmp_path / "run", "--out", tmp_path / "merged")
    assert code == 0, err


def test_a_decoder_with_a_tied_head_trains_by_sft_and_evaluates_the_same(tiny_llama_dir, tmp_path, cli):
    from tests.test_sft import instruction_rows

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(48)))
    out = tmp_path / "run"
    code, _, err = cli(
        "train", "--task", "sft", "--model", tiny_llama_dir, "--data", data, "--out", out, "--method",
        "diff_pruning", "--keep", "0.05", "--max-steps", "4", "--batch-size", "8", "--max-length", "48",
    )  # fmt: skip
    assert code == 0, err
    tensors = read_tensors(out / "adapter" / WEIGHTS_FILE)
    assert any(k.startswith("model.embed_tokens.diff_weight") for k in tensors)
    assert not any(k.startswith("lm_head.") for k in tensors)  # tied to the embedding: one diff, stored once
    test = json.loads((out / "results.json").read_text())["metrics"]["test"]
    code, printed, err = cli("eval", out, "--json")
    assert code == 0, err
    assert json.loads(printed)["test"]["loss"] == pytest.approx(test["loss"], rel=1e-5)


def test_a_minilm_size_adapter_file_holds_the_kept_share_only(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    adapter = peftlab.attach(BertForSequenceClassification(config), "diff_pruning")
    with torch.no_grad():
        for layer in adapter.layers().values():
            for n in layer.names:
                layer.diff(n).normal_()
    DiffPruningHooks(adapter, adapter.config).project(step=1)
    entries = covered(adapter)
    assert 22_000_000 < entries < 23_000_000  # MiniLM-L6's size
    path = adapter.save(tmp_path / "adapter")
    size = (path / WEIGHTS_FILE).stat().st_size
    values_and_indices = round(0.005 * entries) * (4 + 4)
    assert values_and_indices < size < values_and_indices + 200_000  # plus the head and the headers: ~0.9 MB
    assert size < 0.011 * 4 * entries  # a dense diff would take 91 MB


def test_the_config_round_trips_through_the_saved_form():
    config = DiffPruningConfig(keep=0.01, prune_at=0.3)
    assert config_from_dict(DiffPruningConfig, config_to_dict(config), "test") == config
