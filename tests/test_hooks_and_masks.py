"""The core's extension points for methods: static masks with sparse saving, and training hooks."""

import torch

import peftlab
from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.core.hooks import HookList, TrainingHooks, empirical_fisher
from peftlab.core.registry import Method
from peftlab.run import RunOptions, build_model, prepare_data
from tests.short_fit import run_fit as short_fit

DENSE = "bert.encoder.layer.0.output.dense.weight"


def setup(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    data = prepare_data(options, quiet=True)
    return options, data, build_model(options, data, 0)


def run_fit(adapter, data, tmp_path, steps=5, hooks=None, resume=False):
    return short_fit(adapter, data, tmp_path, steps, resume=resume, hooks=hooks, schedule="linear")


def test_a_masked_parameter_changes_only_where_the_mask_allows_and_saves_sparse(tiny_model_dir, tiny_csv, tmp_path):
    options, data, model = setup(tiny_model_dir, tiny_csv)
    adapter = peftlab.attach(model, "full")
    weight = dict(model.named_parameters())[DENSE]
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[::3, ::5] = True
    adapter.masks[DENSE] = mask
    before = weight.detach().clone()
    run_fit(adapter, data, tmp_path)
    assert torch.equal(weight[~mask], before[~mask])  # weight decay too is kept off the masked-out entries
    assert torch.count_nonzero(weight[mask] != before[mask]) == int(mask.sum())
    assert adapter.trainable_count() == peftlab.parameter_counts(adapter)["trainable"]
    assert peftlab.parameter_counts(adapter)["trainable"] < peftlab.parameter_counts(adapter)["total"]
    adapter.save(tmp_path / "a")
    tensors = read_tensors(tmp_path / "a" / WEIGHTS_FILE)
    assert DENSE not in tensors and tensors[f"{DENSE}::indices"].numel() == int(mask.sum())
    assert tensors[f"{DENSE}::indices"].dtype == torch.int32  # positions fit in 32 bits: half the index bytes
    loaded = peftlab.load_adapter(build_model(options, data, 5), tmp_path / "a")
    assert torch.equal(dict(loaded.model.named_parameters())[DENSE], weight)
    assert torch.equal(loaded.masks[DENSE], mask)


class Recorder(TrainingHooks):
    """Counts calls, adds a penalty, and keeps a tensor that must survive a resume."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.calls = []
        self.counter = torch.zeros(())

    def prepare(self, ctx):
        self.calls.append("prepare")
        params = {k: p for k, p in ctx.attachment.state().items() if p.requires_grad}
        self.fisher = empirical_fisher(ctx, params, examples=6, batch_size=2)

    def before_step(self, step):
        self.calls.append(f"before {step}")

    def penalty(self):
        return sum((p**2).sum() for p in self.adapter.trainable_parameters()) * 0.0

    def after_backward(self, step):
        assert all(p.grad is not None for p in self.adapter.trainable_parameters())
        self.calls.append(f"backward {step}")

    def after_step(self, step, optimizer, scheduler):
        self.counter += 1
        self.calls.append(f"step {step}")

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, tensors):
        self.counter = tensors["counter"].clone()


def test_hooks_run_in_order_and_their_state_survives_a_resume(tiny_model_dir, tiny_csv, tmp_path):
    _, data, model = setup(tiny_model_dir, tiny_csv)
    adapter = peftlab.attach(model, "lora", r=2)
    hooks = Recorder(adapter)
    run_fit(adapter, data, tmp_path, steps=2, hooks=hooks)
    assert hooks.calls == ["prepare", "before 0", "backward 0", "step 0", "before 1", "backward 1", "step 1"]
    assert set(hooks.fisher) == set(k for k, p in adapter.state().items() if p.requires_grad)
    assert all(torch.all(f >= 0) for f in hooks.fisher.values())
    again = Recorder(adapter)
    run_fit(adapter, data, tmp_path, steps=4, hooks=again, resume=True)
    assert "prepare" not in again.calls and again.calls[0] == "before 2"
    assert int(again.counter) == 4


def test_method_hooks_factory_is_used_by_fit(tiny_model_dir, tiny_csv, tmp_path):
    _, data, model = setup(tiny_model_dir, tiny_csv)
    made = []
    lora = peftlab.get_method("lora")
    method = Method(
        name="lora",
        config=lora.config,
        apply=lora.apply,
        family="test",
        summary="",
        paper="",
        lr=1e-3,
        mergeable=True,
        hooks=lambda attachment, config: made.append(Recorder(attachment)) or made[-1],
    )
    adapter = peftlab.attach(model, method, r=2)
    run_fit(adapter, data, tmp_path, steps=1)
    assert made and made[0].calls[:2] == ["prepare", "before 0"]


class NeverFinal(TrainingHooks):
    """Hooks whose model never reaches its final form (to check the loop's rule for the best state)."""

    def final_form(self, step):
        return False


def test_an_evaluation_before_the_final_form_is_never_the_best_unless_the_run_ends_without_one(
    tiny_model_dir, tiny_csv, tmp_path
):
    _, data, model = setup(tiny_model_dir, tiny_csv)
    adapter = peftlab.attach(model, "lora", r=2)
    assert not HookList([TrainingHooks(), NeverFinal()]).final_form(3) and HookList([TrainingHooks()]).final_form(3)
    result = short_fit(adapter, data, tmp_path, 30, hooks=NeverFinal(), batch_size=16)  # 12 steps an epoch
    assert [h["step"] for h in result.history] == [12, 24, 30]
    assert result.best_step == 30  # the last evaluation, since no earlier one could be the best
