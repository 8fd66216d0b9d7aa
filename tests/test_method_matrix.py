"""The invariants every registered method must keep, checked on a tiny BERT encoder and a tiny Llama decoder (each a
sequence classifier) after a few real training steps.

- a freshly attached method leaves the outputs unchanged (where the method says so);
- training moves the method's own tensors (an update cut off from the loss would leave them where they started)
  and changes only what the adapter file holds (method tensors, the head, masked entries), nothing else;
- save/load round-trips the outputs exactly (for a method that folds a training-only part away on saving, the
  loaded adapter's counts are those of the folded form);
- merged equals unmerged, unmerge restores, and merge + unload leaves a plain model with the same outputs;
- the counts agree with the tensors.

A method whose defaults do not suit the tiny models may set smaller options in ``TINY_OPTIONS``. Each (model,
method) trains once per session (``trained``); a test that changes the adapter (merging) takes it out of the
cache. The matrix runs on the CPU; ``PEFTLAB_TEST_DEVICE=cuda`` runs it on a GPU instead (model, batches,
training, merge and loading there).
"""

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import peftlab
from peftlab.core.adapter import AdapterLayer, adapter_layers
from peftlab.core.adapter_file import base_name
from peftlab.methods import all_methods
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import ClassificationTask, TrainSettings, fit
from tests.fusion_members import matrix_fusion_options

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
    "diff_pruning": {"keep": 0.05, "prune_at": 0.5},  # the projection after step 2 of the matrix's 4
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
    # the tiny models are 32 wide: a side network 8 wide instead of 4
    "lst": {"reduction_factor": 4},
    "unipelt": {"keep_encoder": True, "encoder_hidden": 32, "num_virtual_tokens": 4, "bottleneck": 8, "lora_r": 4},
}
# (adapter_fusion's options, three stage-one pfeiffer adapters on the same tiny model, are made on first use)
MODELS = ("bert", "llama")
# (model kind, method) pairs that cannot work, and why
NOT_ON = {("llama", "bitfit"): "Llama has no bias terms outside the task head (BitFit refuses it)"}
MERGE_TOLERANCE: dict[str, float] = {}

METHODS = [m.name for m in all_methods()]
DEVICE = torch.device(os.environ.get("PEFTLAB_TEST_DEVICE", "cpu"))


class World(NamedTuple):
    options: RunOptions
    data: object
    kind: str  # "bert" or "llama"


@pytest.fixture(scope="module")
def worlds(tiny_model_dir, tiny_llama_dir, tiny_csv):
    """Per model kind: the run options and the prepared data of the tiny classification task."""
    out = {}
    for kind, folder in (("bert", tiny_model_dir), ("llama", tiny_llama_dir)):
        options = RunOptions(model=str(folder), data=str(tiny_csv), max_length=32)
        out[kind] = World(options, prepare_data(options, quiet=True), kind)
    return out


@pytest.fixture(params=MODELS)
def prepared(request, worlds):
    return worlds[request.param]


def fresh(prepared, seed=0):
    options, data = prepared.options, prepared.data
    return build_model(options, data, seed).to(DEVICE).eval()


def inputs(prepared):
    batch = prepared.data.splits["test"].batch(range(8), DEVICE)
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


_FUSION_OPTIONS: dict[str, dict] = {}


def options_for(prepared, method) -> dict:
    if method != "adapter_fusion":
        return TINY_OPTIONS.get(method, {})
    folder = prepared.options.model
    if folder not in _FUSION_OPTIONS:
        _FUSION_OPTIONS[folder] = matrix_fusion_options(Path(folder))
    return _FUSION_OPTIONS[folder]


def attach(prepared, method, seed=0):
    if (prepared.kind, method) in NOT_ON:
        pytest.skip(NOT_ON[prepared.kind, method])
    return peftlab.attach(fresh(prepared, seed), method, **options_for(prepared, method))


@dataclass
class Trained:
    adapter: peftlab.Attachment
    before: dict[str, torch.Tensor]  # the base parameters before training
    initial: dict[str, torch.Tensor]  # the adapter's tensors (``state()``) before training


_TRAINED: dict[tuple[str, str], Trained] = {}


def trained(prepared, method, steps=4) -> Trained:
    """The method trained for ``steps`` steps on the prepared model, once per session (cached)."""
    key = (prepared.options.model, method)
    if key not in _TRAINED:
        _TRAINED[key] = train(prepared, method, steps)
    return _TRAINED[key]


def train(prepared, method, steps) -> Trained:
    data = prepared.data
    adapter = attach(prepared, method)
    before = base_parameters(adapter)
    initial = {k: v.detach().clone() for k, v in adapter.state().items()}
    settings = TrainSettings(max_steps=steps, batch_size=8, lr=5e-3, warmup=0, seed=0)
    with tempfile.TemporaryDirectory() as checkpoints:
        fit(
            adapter,
            ClassificationTask(2),
            data.splits["train"],
            data.splits["validation"],
            settings,
            5e-3,
            Path(checkpoints) / "ckpt",
            lambda m, s: None,
            DEVICE,
            show_progress=False,
        )
    adapter.model.eval()
    return Trained(adapter, before, initial)


@pytest.mark.parametrize("method", METHODS)
def test_fresh_method_leaves_outputs_unchanged(prepared, method):
    if not peftlab.get_method(method).identity_at_init:
        pytest.skip(f"{method} changes the outputs by design")
    batch = inputs(prepared)
    expected = logits(fresh(prepared), batch)
    model = attach(prepared, method).model
    torch.testing.assert_close(logits(model.eval(), batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_the_method_and_changes_only_what_the_adapter_holds(prepared, method):
    run = trained(prepared, method)
    adapter, before = run.adapter, run.before
    after = base_parameters(adapter)
    state = adapter.state()
    heads = tuple(f"{h}." for h in adapter.trainable_modules)
    own = [k for k in state if not k.startswith(heads)]  # the method's tensors, the task head left out
    if method != "head":  # the head-only probe trains nothing but the head
        moved = [k for k in own if k in run.initial and not torch.equal(state[k], run.initial[k])]
        assert moved, f"{method}: training moved none of the method's tensors ({len(own)} of them)"
    for name, value in after.items():
        if name not in state:
            assert torch.equal(value, before[name]), f"{method} changed {name}, which its adapter does not hold"
        elif name in adapter.masks:
            outside = ~adapter.masks[name]
            assert torch.equal(value[outside], before[name][outside]), f"{method} changed masked-out {name}"
    assert adapter.trainable_count() == peftlab.parameter_counts(adapter)["trainable"]


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trips(prepared, method, tmp_path):
    adapter = trained(prepared, method).adapter
    batch = inputs(prepared)
    expected = logits(adapter.model, batch)
    adapter.save(tmp_path / "adapter")
    loaded = peftlab.load_adapter(fresh(prepared, seed=123), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.model.eval(), batch), expected, rtol=0, atol=1e-6)
    saved = adapter
    if adapter.method.fold and adapter.method.fold(adapter) is not None:  # what the file holds: the folded form
        saved = copy.deepcopy(adapter)
        saved.fold()
        torch.testing.assert_close(logits(saved.model, batch), expected, rtol=0, atol=1e-6)
    assert peftlab.parameter_counts(loaded) == peftlab.parameter_counts(saved)


@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged(prepared, method):
    if not peftlab.get_method(method).mergeable:
        pytest.skip(f"{method} has no weight form")
    adapter = trained(prepared, method).adapter
    del _TRAINED[prepared.options.model, method]  # merging and unloading change it: a later test trains it anew
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
