"""The invariants every registered method must keep, checked on a tiny BERT after a few real training steps.

- a freshly attached method leaves the outputs unchanged (where the method says so);
- training changes only what the adapter file holds (method tensors, the head, masked entries), nothing else;
- save/load round-trips the outputs exactly;
- merged equals unmerged, unmerge restores, and merge + unload leaves a plain model with the same outputs;
- the counts agree with the tensors.

A method whose defaults do not suit the tiny model may set smaller options in ``TINY_OPTIONS``. The matrix runs on
the CPU; ``PEFTLAB_TEST_DEVICE=cuda`` runs it on a GPU instead (model, batches, training, merge and loading there).
"""

import os

import pytest
import torch

import peftlab
from peftlab.core.adapter import AdapterLayer, adapter_layers
from peftlab.core.adapter_file import base_name
from peftlab.methods import all_methods
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import ClassificationTask, TrainSettings, fit
from tests.fusion_members import MatrixFusionOptions

TINY_OPTIONS: dict[str, dict] = {
    "lora": {"r": 4},
    "qlora": {"r": 4},
    # pruning within the matrix's 4 steps: warm-up 1 step, allocate at step 2, fixed from step 3
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "delta_t": 1},
    "dylora": {"r": 4},
    # one reset (after step 2) within the matrix's 4 steps, so the merged history is saved and loaded
    "relora": {"r": 4, "reset_every": 2, "restart_warmup": 1},
    "last_k": {"k": 1},  # the tiny BERT has 2 blocks: keep one frozen
    "child_tuning_d": {"fisher_examples": 16},
    "fishmask": {"keep": 0.05, "fisher_examples": 16},  # 0.5% of a tiny model is a handful of entries
    # By default these save their encoder's output, not the encoder (folded: fewer parameters after loading than
    # while training, so the round trip's equal counts cannot hold); the matrix keeps the encoder, and
    # test_p_tuning.py / test_prefix_tuning.py test the folded round trip.
    "p_tuning": {"keep_encoder": True},
    "prefix_tuning": {"keep_encoder": True, "encoder_hidden": 32},
    # AdapterDrop while training (n drawn from 0..1 each step) and trained LayerNorms go through the invariants too
    "houlsby": {"bottleneck": 8, "drop_train": True},
    "pfeiffer": {"bottleneck": 8},
    "parallel": {"bottleneck": 8, "train_layernorms": True},
    # as prefix_tuning: the matrix keeps the prefix MLP (test_mam.py tests the folded round trip)
    "mam": {"keep_encoder": True, "encoder_hidden": 32, "num_virtual_tokens": 4, "bottleneck": 8},
    "unipelt": {"keep_encoder": True, "encoder_hidden": 32, "num_virtual_tokens": 4, "bottleneck": 8, "lora_r": 4},
    # three stage-one pfeiffer adapters, made on first use
    "adapter_fusion": MatrixFusionOptions(),
}
MERGE_TOLERANCE: dict[str, float] = {}

METHODS = [m.name for m in all_methods()]
DEVICE = torch.device(os.environ.get("PEFTLAB_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    return options, prepare_data(options, quiet=True)


def fresh(prepared, seed=0):
    options, data = prepared
    return build_model(options, data, seed).to(DEVICE).eval()


def inputs(prepared):
    batch = prepared[1].splits["test"].batch(range(8), DEVICE)
    batch.pop("labels")
    return batch


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def base_parameters(attachment) -> dict[str, torch.Tensor]:
    layers = attachment.layers()
    own = {id(p) for layer in layers.values() for p in layer.adapter_parameters().values()}
    return {
        base_name(n, layers): p.detach().clone() for n, p in attachment.model.named_parameters() if id(p) not in own
    }


def trained(prepared, method, tmp_path, steps=4):
    options, data = prepared
    model = fresh(prepared)
    adapter = peftlab.attach(model, method, **TINY_OPTIONS.get(method, {}))
    before = base_parameters(adapter)
    settings = TrainSettings(max_steps=steps, batch_size=8, lr=5e-3, warmup=0, seed=0)
    fit(
        adapter,
        ClassificationTask(2),
        data.splits["train"],
        data.splits["validation"],
        settings,
        5e-3,
        tmp_path / "ckpt",
        lambda m, s: None,
        DEVICE,
        show_progress=False,
    )
    adapter.model.eval()
    return adapter, before


@pytest.mark.parametrize("method", METHODS)
def test_fresh_method_leaves_outputs_unchanged(prepared, method):
    if not peftlab.get_method(method).identity_at_init:
        pytest.skip(f"{method} changes the outputs by design")
    batch = inputs(prepared)
    model = fresh(prepared)
    expected = logits(model, batch)
    peftlab.attach(model, method, **TINY_OPTIONS.get(method, {}))
    torch.testing.assert_close(logits(model.eval(), batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_only_what_the_adapter_holds(prepared, method, tmp_path):
    adapter, before = trained(prepared, method, tmp_path)
    after = base_parameters(adapter)
    state = adapter.state()
    for name, value in after.items():
        if name not in state:
            assert torch.equal(value, before[name]), f"{method} changed {name}, which its adapter does not hold"
        elif name in adapter.masks:
            outside = ~adapter.masks[name]
            assert torch.equal(value[outside], before[name][outside]), f"{method} changed masked-out {name}"
    assert adapter.trainable_count() == peftlab.parameter_counts(adapter)["trainable"]


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trips(prepared, method, tmp_path):
    adapter, _ = trained(prepared, method, tmp_path)
    batch = inputs(prepared)
    expected = logits(adapter.model, batch)
    adapter.save(tmp_path / "adapter")
    loaded = peftlab.load_adapter(fresh(prepared, seed=123), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.model.eval(), batch), expected, rtol=0, atol=1e-6)
    assert peftlab.parameter_counts(loaded) == peftlab.parameter_counts(adapter)


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged(prepared, method, tmp_path):
    if not peftlab.get_method(method).mergeable:
        pytest.skip(f"{method} has no weight form")
    adapter, _ = trained(prepared, method, tmp_path)
    batch = inputs(prepared)
    unmerged = logits(adapter.model, batch)
    tolerance = MERGE_TOLERANCE.get(method, 1e-5)
    changed = peftlab.changed_parameters(adapter)
    adapter.merge()
    torch.testing.assert_close(logits(adapter.model, batch), unmerged, rtol=0, atol=tolerance)
    assert peftlab.changed_parameters(adapter) == changed
    adapter.unmerge()
    torch.testing.assert_close(logits(adapter.model, batch), unmerged, rtol=0, atol=tolerance)
    adapter.merge()
    plain = adapter.unload()
    assert not adapter_layers(plain)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), unmerged, rtol=0, atol=tolerance)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_is_refused_with_a_suggestion(method):
    with pytest.raises(peftlab.InputError, match="unknown option 'no_such_option'"):
        peftlab.attach(fresh_tiny(), method, no_such_option=1)


def fresh_tiny():
    from tests.conftest import tiny_classifier

    return tiny_classifier()
