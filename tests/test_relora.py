"""ReLoRA: a reset is an identity on the outputs, the history grows the rank by r per reset, Adam's moments of the
LoRA parameters are magnitude-pruned, the learning rate restarts on a jagged schedule, the adapter file holds the
whole change (loading onto a fresh pretrained base reproduces the outputs), and a resumed run is exact."""

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.errors import InputError
from peftlab.methods.relora import ReLoraHooks, ReLoraLinear, prune_smallest_
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import TrainSettings
from tests.conftest import tiny_classifier
from tests.short_fit import fit_tiny
from tests.test_lora import TOKENS


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def randomise_B(layers, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def test_layer_computes_history_plus_lora():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = ReLoraLinear(base, r=2, alpha=4.0)
    randomise_B([layer], 0)
    first = (4.0 / 2) * layer.lora_B.detach() @ layer.lora_A.detach()
    layer.restart()
    randomise_B([layer], 1)
    x = torch.randn(5, 12)
    second = 2.0 * layer.lora_B @ layer.lora_A
    expected = x @ (base.weight + first + second).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), first + second)


def test_a_reset_leaves_the_outputs_unchanged_and_restarts_the_lora():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "relora", r=2, targets=["query", "value"])
    layers = list(adapter.layers().values())
    randomise_B(layers, 0)
    before, deltas = logits(model), [layer.delta_weight().detach().clone() for layer in layers]
    old_A = [layer.lora_A.detach().clone() for layer in layers]
    for layer in layers:
        layer.restart()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)
    for layer, delta, A in zip(layers, deltas, old_A, strict=True):
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-7)
        assert layer.history_rank == 2
        assert torch.count_nonzero(layer.lora_B) == 0  # B = 0
        assert not torch.equal(layer.lora_A, A)  # A re-drawn (Kaiming-uniform)
        bound = 1 / 32**0.5  # kaiming_uniform_(a=sqrt(5)) on fan-in 32
        assert layer.lora_A.abs().max() <= bound


def test_the_difference_reaches_rank_resets_plus_one_times_r():
    torch.manual_seed(0)
    layer = ReLoraLinear(nn.Linear(32, 24), r=3, alpha=3.0)
    for k in range(4):
        randomise_B([layer], k)
        assert torch.linalg.matrix_rank(layer.delta_weight().detach()) == (k + 1) * 3
        layer.restart()
    # past min(out, in) = 24 columns the history is re-factored exactly into 24
    for k in range(5):
        randomise_B([layer], 10 + k)
        delta = layer.delta_weight().detach().clone()
        layer.restart()
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-5)
    assert layer.history_rank == 24


def test_magnitude_pruning_zeroes_the_smallest_share():
    values = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.0, -4.0, 0.3, 0.7])
    pruned = values.clone()
    prune_smallest_(pruned, 0.8)
    assert pruned.tolist() == [0, -3.0, 0, 0, 0, 0, 0, -4.0, 0, 0]
    pruned = values.clone()
    prune_smallest_(pruned, 0.0)
    assert torch.equal(pruned, values)
    prune_smallest_(pruned, 1.0)
    assert torch.count_nonzero(pruned) == 0


def keep_largest(values: torch.Tensor, share: float) -> torch.Tensor:
    kept = values.numel() - int((1 - share) * values.numel())
    order = values.abs().reshape(-1).argsort(descending=True)[:kept]
    out = torch.zeros(values.numel())
    out[order] = values.reshape(-1)[order]
    return out.reshape(values.shape)


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    return options, prepare_data(options, quiet=True)


def train(prepared, folder, steps, crash_after=None, resume=False, hooks_factory=ReLoraHooks, **options):
    run_options, data = prepared
    adapter = peftlab.attach(build_model(run_options, data, 0), "relora", **options)
    hooks = hooks_factory(adapter, adapter.config)
    settings = TrainSettings(max_steps=steps, batch_size=8, lr=1e-2, warmup=0, checkpoint_every=3, seed=0)
    on_best = lambda m, s: adapter.save(folder / "adapter")  # noqa: E731
    fit_tiny(adapter, data, folder / "ckpt", settings, resume, hooks, crash_after, on_best)
    return adapter, hooks


def snapshot(optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {id(p): {k: v.clone() for k, v in state.items()} for p, state in optimizer.state.items()}


class Spy(ReLoraHooks):
    """ReLoRA's hooks, recording the optimiser state around each reset and the lr of every step."""

    def __init__(self, attachment, config):
        super().__init__(attachment, config)
        self.lrs, self.before, self.after = [], [], []

    def before_step(self, step):
        rates = {g["name"]: g["lr"] for g in self.optimizer.param_groups} if hasattr(self, "optimizer") else {}
        self.lrs.append(rates.get("*"))  # LoRA's rate (the head has its own group)

    def reset(self, optimizer):
        self.before.append(snapshot(optimizer))
        super().reset(optimizer)
        self.after.append(snapshot(optimizer))

    def after_step(self, step, optimizer, scheduler):
        self.optimizer = optimizer
        super().after_step(step, optimizer, scheduler)


def test_resets_prune_the_lora_optimiser_state_and_restart_the_learning_rate(prepared, tmp_path):
    options = {"r": 2, "reset_every": 4, "restart_warmup": 3, "optimizer_reset": 0.9, "targets": ["query", "value"]}
    adapter, hooks = train(prepared, tmp_path, steps=12, hooks_factory=Spy, **options)
    assert hooks.resets == 2  # after steps 4 and 8 (never after the last step)
    assert all(layer.history_rank == 4 for layer in adapter.layers().values())
    lora = {id(p) for layer in adapter.layers().values() for p in layer.adapter_parameters().values()}
    for before, after in zip(hooks.before, hooks.after, strict=True):
        for pid, state in before.items():
            if pid not in lora:  # the head keeps its moments
                assert all(torch.equal(value, after[pid][key]) for key, value in state.items())
                continue
            # reference: keep the 10 % largest magnitudes of each moment, and the first moment only where the
            # second survives
            second = keep_largest(state["exp_avg_sq"], 0.1)
            first = keep_largest(state["exp_avg"], 0.1) * (second != 0)
            assert torch.equal(after[pid]["exp_avg_sq"], second)
            assert torch.equal(after[pid]["exp_avg"], first)
            assert torch.equal(after[pid]["step"], state["step"])
    # linear decay from 1e-2 over 12 steps, times k / 3 for the 3 steps after each reset
    schedule = [1e-2 * (12 - s) / 12 for s in range(12)]
    ramp = {4: 1 / 3, 5: 2 / 3, 8: 1 / 3, 9: 2 / 3}
    expected = [schedule[s] * ramp.get(s, 1.0) for s in range(1, 12)]
    assert hooks.lrs[1:] == pytest.approx(expected)


def test_the_adapter_file_holds_the_whole_change(prepared, tmp_path):
    adapter, hooks = train(prepared, tmp_path, steps=10, r=2, reset_every=3, restart_warmup=1)
    assert hooks.resets == 3
    tensors = read_tensors(tmp_path / "adapter" / WEIGHTS_FILE)
    assert tensors["bert.encoder.layer.0.attention.self.query.history_A"].shape == (6, 32)
    fresh_options, data = prepared
    batch = data.splits["test"].batch(range(8))
    batch.pop("labels")
    with torch.no_grad():
        expected = adapter.model.eval()(**batch).logits
    ranks = peftlab.delta_ranks(adapter)
    assert set(ranks.values()) == {8}  # (3 resets + 1) * r
    loaded = peftlab.load_adapter(build_model(fresh_options, data, 5), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(**batch).logits, expected, rtol=0, atol=1e-6)
    assert peftlab.delta_ranks(loaded) == ranks
    assert hooks.report(lambda: {})["resets"] == 3


def test_a_resumed_run_is_exact_across_resets(prepared, tmp_path):
    options = {"r": 2, "reset_every": 4, "restart_warmup": 2, "dropout": 0.1}
    straight, _ = train(prepared, tmp_path / "a", steps=10, **options)
    with pytest.raises(KeyboardInterrupt):
        train(prepared, tmp_path / "b", steps=10, crash_after=6, **options)  # between the resets at 4 and 8
    resumed, hooks = train(prepared, tmp_path / "b", steps=10, resume=True, **options)
    assert hooks.resets == 2
    for key, value in straight.state().items():
        assert torch.equal(resumed.state()[key], value), key


def test_a_history_of_the_wrong_width_is_refused(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "relora", r=2, targets=["query"])
    adapter.save(tmp_path / "a")
    tensors = read_tensors(tmp_path / "a" / WEIGHTS_FILE)
    key = "bert.encoder.layer.0.attention.self.query.history_A"
    tensors[key] = torch.zeros(2, 31)
    with pytest.raises(InputError, match=f"tensor '{key}' has shape \\(2, 31\\), expected \\(0, 32\\)"):
        peftlab.core.attach.load_state(adapter, tensors, tmp_path / "a")
    tensors[key] = torch.zeros(2, 32)  # a history of length 2 in A but 0 in B
    with pytest.raises(InputError, match="history factors disagree"):
        peftlab.core.attach.load_state(adapter, tensors, tmp_path / "a")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"reset_every": 0}, "reset_every: expected a positive integer"),
        ({"optimizer_reset": 1.5}, "optimizer_reset: expected a share in"),
        ({"restart_warmup": -1}, "restart_warmup: expected an integer >= 0"),
        ({"r": 40}, "r: rank 40 is larger than layer"),
    ],
)
def test_bad_options_name_the_field(options, match):
    with pytest.raises(InputError, match=match):
        peftlab.attach(tiny_classifier(), "relora", **options)
