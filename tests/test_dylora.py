"""DyLoRA: the b-truncated LoRA equation, the per-step rank draw, frozen vs full updates, serving ranks, the
report over ranks, exact resume, and export as a plain LoRA that Hugging Face PEFT loads."""

from unittest import mock

import pytest
import torch
from peft import PeftModel
from torch import nn

import peftlab
from peftlab.errors import InputError
from peftlab.methods.dylora import DyLoraHooks, DyLoraLinear, report_ranks, set_rank
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import TrainSettings
from tests.conftest import tiny_classifier
from tests.short_fit import fit_tiny
from tests.test_lora import TOKENS


def randomise_B(attachment, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in attachment.layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("b", [1, 2, 5])
def test_truncated_forward_is_the_lora_equation_with_the_first_b_ranks(b):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = DyLoraLinear(base, r=5, alpha=6.0)
    nn.init.normal_(layer.lora_B)
    layer.rank = b
    x = torch.randn(4, 12)
    A, B = layer.lora_A[:b], layer.lora_B[:, :b]  # (b, in), (out, b)
    expected = x @ base.weight.T + base.bias + (6.0 / b) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), (6.0 / b) * B @ A)
    layer.rank, layer.sampled_rank = 5, b  # a training step's draw overrides the serving rank
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_each_step_draws_one_rank_for_every_layer_from_the_step_generator():
    adapter = peftlab.attach(tiny_classifier(), "dylora", r=4, targets=["query", "value"])
    torch.manual_seed(7)
    hooks = DyLoraHooks(adapter, adapter.config)
    twin = DyLoraHooks(adapter, adapter.config)  # built from another global RNG state: its own seed
    torch.manual_seed(7)
    same = DyLoraHooks(adapter, adapter.config)  # another process, seeded alike
    drawn = []
    for step in range(400):
        hooks.before_step(step)
        ranks = {layer.active_rank for layer in adapter.layers().values()}
        assert len(ranks) == 1
        drawn.append(ranks.pop())
        hooks.after_backward(step)
        hooks.after_step(step, None, None)
        assert all(layer.active_rank == 4 for layer in adapter.layers().values())  # serving rank between steps
    assert drawn == [int(torch.randint(1, 5, (), generator=same.random.generator(s)).item()) for s in range(400)]
    assert drawn != [int(torch.randint(1, 5, (), generator=twin.random.generator(s)).item()) for s in range(400)]
    counts = [drawn.count(b) for b in range(1, 5)]
    assert min(counts) > 70  # uniform over 1..4


@pytest.mark.parametrize("frozen", [False, True])
def test_which_rows_and_columns_receive_gradients(frozen):
    adapter = peftlab.attach(tiny_classifier(), "dylora", r=4, frozen=frozen, targets=["query"])
    randomise_B(adapter)
    for layer in adapter.layers().values():
        layer.sampled_rank = 3
    adapter.model(TOKENS, labels=torch.tensor([0, 1, 0])).loss.backward()
    for layer in adapter.layers().values():
        rows_with_grad = [i for i in range(4) if layer.lora_A.grad[i].abs().sum() > 0]
        cols_with_grad = [i for i in range(4) if layer.lora_B.grad[:, i].abs().sum() > 0]
        expected = [2] if frozen else [0, 1, 2]  # never rank 4 (index 3): it is not in use at b = 3
        assert rows_with_grad == expected and cols_with_grad == expected


@pytest.mark.parametrize("frozen", [False, True])
def test_an_optimiser_step_changes_exactly_the_trained_rows_and_columns(frozen):
    adapter = peftlab.attach(tiny_classifier(), "dylora", r=4, frozen=frozen, targets=["query"])
    randomise_B(adapter)
    hooks = DyLoraHooks(adapter, adapter.config)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for step, b in enumerate([4, 2, 3]):  # momentum and weight decay from earlier steps would move every row
        with mock.patch.object(torch, "randint", return_value=torch.tensor(b)):  # the step's draw is b
            hooks.before_step(step)
        before = {
            n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in hooks.layers.items()
        }
        adapter.model(TOKENS, labels=torch.tensor([0, 1, 0])).loss.backward()
        hooks.after_backward(step)
        optimizer.step()
        optimizer.zero_grad()
        hooks.after_step(step, optimizer, None)
        trained = [b - 1] if frozen else list(range(b))
        for name, layer in hooks.layers.items():
            A, B = before[name]
            changed_rows = [i for i in range(4) if not torch.equal(layer.lora_A[i], A[i])]
            changed_cols = [i for i in range(4) if not torch.equal(layer.lora_B[:, i], B[:, i])]
            assert changed_rows == trained and changed_cols == trained, (step, b)


def test_serving_rank_is_a_setting_kept_by_save_and_load(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "dylora", r=4, targets=["query", "value"])
    randomise_B(adapter)
    full = logits(model)
    set_rank(adapter, 2)
    at_two = logits(model)
    assert not torch.allclose(full, at_two)
    adapter.save(tmp_path / "a")
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "a")
    assert loaded.config.rank == 2
    torch.testing.assert_close(logits(loaded.model), at_two, rtol=0, atol=1e-6)
    loaded.merge()  # merging folds the rank-2 update
    torch.testing.assert_close(logits(loaded.model), at_two, rtol=0, atol=1e-5)
    assert peftlab.delta_ranks(loaded) == {name: 2 for name in loaded.layers()}
    with pytest.raises(peftlab.PeftlabError, match="unmerge"):
        set_rank(loaded, 3)
    with pytest.raises(InputError, match="rank: expected an integer from 1 to r = 4, got 5"):
        set_rank(adapter, 5)
    with pytest.raises(InputError, match="rank: expected an integer from 1 to r = 4, got 0"):
        peftlab.attach(tiny_classifier(), "dylora", r=4, rank=0)


def test_report_evaluates_ranks_one_two_four_up_to_r():
    assert report_ranks(8) == [1, 2, 4, 8]
    assert report_ranks(6) == [1, 2, 4, 6]
    assert report_ranks(1) == [1]
    adapter = peftlab.attach(tiny_classifier(), "dylora", r=6, rank=4, targets=["query", "value"])
    hooks = DyLoraHooks(adapter, adapter.config)
    layers = list(adapter.layers().values())
    report = hooks.report(lambda: {"ranks": sorted({layer.rank for layer in layers})})  # evaluated at each rank
    assert report == {"serving_rank": 4, "validation_by_rank": {str(b): {"ranks": [b]} for b in (1, 2, 4, 6)}}
    assert all(layer.rank == 4 for layer in layers)  # back to the serving rank


def test_exports_as_a_plain_lora_at_the_serving_rank(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "dylora", r=4, alpha=8, rank=3, targets=["query", "value", "dense"])
    randomise_B(adapter)
    expected = logits(model)
    peftlab.export_hf(adapter, tmp_path / "hf", task_type="SEQ_CLS")
    theirs = PeftModel.from_pretrained(tiny_classifier(), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-6)


def test_an_interrupted_run_resumes_exactly(tiny_model_dir, tiny_csv, tmp_path):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    data = prepare_data(options, quiet=True)

    def train(folder, crash_after=None, resume=False):
        adapter = peftlab.attach(build_model(options, data, 0), "dylora", r=4, dropout=0.1)
        settings = TrainSettings(max_steps=8, batch_size=8, lr=1e-2, warmup=0, checkpoint_every=3, seed=0)
        fit_tiny(adapter, data, folder, settings, resume, crash_after=crash_after)
        return adapter

    straight = train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", crash_after=3)
    resumed = train(tmp_path / "b", resume=True)
    for key, value in straight.state().items():
        assert torch.equal(resumed.state()[key], value), key
