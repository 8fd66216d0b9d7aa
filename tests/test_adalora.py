"""AdaLoRA: the SVD-form equation, importance scores, the cubic budget and global pruning, the orthogonality
penalty, exact resume, and parity with Hugging Face PEFT both ways."""

import dataclasses

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn

import peftlab
from peftlab.core.adapter_file import read_tensors
from peftlab.errors import InputError
from peftlab.methods.adalora import AdaLoraHooks, AdaLoraLinear
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import TrainSettings
from tests.conftest import tiny_classifier
from tests.short_fit import fit_tiny
from tests.test_lora import TOKENS


def randomise(attachment, seed=0, kept=None):
    """Random P, Lambda, Q; ``kept`` (int) leaves only that many non-zero singular values per layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in attachment.layers().values():
            for p in layer.adapter_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if kept is not None:
                layer.lora_E[kept:] = 0
        attachment.model.classifier.weight.mul_(-2)


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_layer_computes_the_svd_form_equation():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = AdaLoraLinear(base, r=3, alpha=6.0)
    nn.init.normal_(layer.lora_E)
    P, E, Q = layer.lora_B, layer.lora_E.reshape(-1), layer.lora_A
    x = torch.randn(5, 12)
    s = 6.0 / (3 + 1e-5)
    expected = x @ base.weight.T + base.bias + s * (x @ Q.T @ torch.diag(E) @ P.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), s * P @ torch.diag(E) @ Q)


def test_merged_difference_has_the_rank_of_the_kept_singular_values():
    model = tiny_classifier()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = peftlab.attach(model, "adalora", init_r=6, target_r=2, targets=["query", "value"])
    randomise(adapter)
    for k, layer in enumerate(adapter.layers().values()):
        with torch.no_grad():
            layer.lora_E[torch.arange(6) % (k + 2) != 0] = 0  # keeps 3, 2, 2, 2 of 6
    kept = {name: int(layer.kept().sum()) for name, layer in adapter.layers().items()}
    assert sorted(kept.values()) == [2, 2, 2, 3]
    assert peftlab.delta_ranks(adapter) == kept
    adapter.merge()
    for name, layer in adapter.layers().items():
        difference = layer.base.weight - original[f"{name}.weight"]
        assert int(torch.linalg.matrix_rank(difference, rtol=1e-5)) == kept[name]


def test_cubic_budget_schedule():
    adapter = peftlab.attach(tiny_classifier(), "adalora", init_r=8, target_r=2, tinit=10, tfinal=20)
    hooks = AdaLoraHooks(adapter, adapter.config)
    hooks.total_steps = 100
    n = len(adapter.layers())
    assert (hooks.initial_budget, hooks.target_budget) == (8 * n, 2 * n)
    for t in range(101):
        if t <= 10:
            expected = 8 * n
        elif t >= 80:
            expected = 2 * n
        else:
            expected = int(2 * n + 6 * n * (1 - (t - 10) / 70) ** 3)
        assert hooks.budget(t) == expected, t
    default = AdaLoraHooks(adapter, peftlab.get_method("adalora").config())  # tinit 10%, tfinal 30% of the run
    default.total_steps = 200
    assert default.phases() == (20, 140)


def test_importance_scores_follow_the_paper():
    adapter = peftlab.attach(
        tiny_classifier(), "adalora", init_r=4, target_r=2, targets=["query"], beta1=0.7, beta2=0.6
    )
    randomise(adapter)
    hooks = AdaLoraHooks(adapter, adapter.config)
    hooks.total_steps = 100
    ibar, ubar = {}, {}
    for step in range(3):
        adapter.model.zero_grad()
        loss = adapter.model((TOKENS + step) % 64, labels=torch.tensor([0, 1, 0])).loss
        loss.backward()
        hooks.after_backward(step)
        for name, layer in adapter.layers().items():  # reference: the paper's Eq. 8-10
            for k, p in layer.adapter_parameters().items():
                i = (p * p.grad).abs().detach()
                key = (name, k)
                ibar[key] = 0.7 * ibar.get(key, 0) + 0.3 * i
                ubar[key] = 0.6 * ubar.get(key, 0) + 0.4 * (i - ibar[key]).abs()
    scores = hooks.triplet_scores()
    for name, layer in adapter.layers().items():
        for k in layer.adapter_parameters():
            torch.testing.assert_close(hooks.sensitivity[name][k], ibar[(name, k)])
            torch.testing.assert_close(hooks.uncertainty[name][k], ubar[(name, k)])
        s = {k: ibar[(name, k)] * ubar[(name, k)] for k in ("lora_A", "lora_E", "lora_B")}
        expected = s["lora_E"][:, 0] + s["lora_A"].mean(1) + s["lora_B"].mean(0)
        torch.testing.assert_close(scores[name], expected)


def test_allocation_keeps_the_best_triplets_across_layers():
    adapter = peftlab.attach(tiny_classifier(), "adalora", init_r=4, target_r=1, targets=["query", "value"])
    randomise(adapter)
    hooks = AdaLoraHooks(adapter, adapter.config)
    g = torch.Generator().manual_seed(3)
    for name in adapter.layers():
        for k in hooks.sensitivity[name]:
            hooks.sensitivity[name][k].copy_(torch.rand(hooks.sensitivity[name][k].shape, generator=g))
            hooks.uncertainty[name][k].fill_(1.0)
    scores = hooks.triplet_scores()
    flat = torch.cat(list(scores.values()))
    threshold = flat.sort(descending=True).values[5]
    hooks.allocate(6)
    for name, layer in adapter.layers().items():
        assert torch.equal(layer.kept(), scores[name] >= threshold)
        assert torch.equal(hooks.allocation[name], scores[name] >= threshold)
    assert sum(int(layer.kept().sum()) for layer in adapter.layers().values()) == 6


def test_orthogonality_penalty():
    adapter = peftlab.attach(
        tiny_classifier(), "adalora", init_r=3, target_r=1, targets=["query", "value"], orth_reg=0.25
    )
    randomise(adapter)
    hooks = AdaLoraHooks(adapter, adapter.config)
    terms = []
    for layer in adapter.layers().values():
        P, Q, eye = layer.lora_B, layer.lora_A, torch.eye(3)
        terms.append(torch.linalg.matrix_norm(P.T @ P - eye) ** 2 + torch.linalg.matrix_norm(Q @ Q.T - eye) ** 2)
    torch.testing.assert_close(hooks.penalty(), 0.25 * torch.stack(terms).mean())
    with torch.no_grad():  # orthonormal P and Q cost nothing
        for layer in adapter.layers().values():
            layer.lora_B.copy_(torch.linalg.qr(torch.randn(32, 3))[0])
            layer.lora_A.copy_(torch.linalg.qr(torch.randn(32, 3))[0].T)
    assert hooks.penalty().item() < 1e-10


def test_peft_form_of_the_penalty_is_what_peft_adds_to_the_loss():
    """orth_form='peft': the same weights cost the same in peft's forward (loss with the penalty minus without)."""
    ours = peftlab.attach(
        tiny_classifier(), "adalora", init_r=3, target_r=1, targets=["query", "value"], orth_reg=0.25, orth_form="peft"
    )
    randomise(ours)
    config = AdaLoraConfig(
        init_r=3, target_modules=["query", "value"], total_step=10, orth_reg_weight=0.25, task_type="SEQ_CLS"
    )
    theirs = get_peft_model(tiny_classifier(), config)
    theirs_params = dict(theirs.base_model.model.named_parameters())
    with torch.no_grad():
        for name, layer in ours.layers().items():
            for k, p in layer.adapter_parameters().items():
                theirs_params[f"{name}.{k}.default"].copy_(p)
    labels = torch.zeros(TOKENS.shape[0], dtype=torch.long)
    with_penalty = theirs(input_ids=TOKENS, labels=labels).loss
    theirs.peft_config["default"].orth_reg_weight = 0.0
    without = theirs(input_ids=TOKENS, labels=labels).loss
    penalty = AdaLoraHooks(ours, ours.config).penalty()
    torch.testing.assert_close(penalty, with_penalty - without, rtol=1e-5, atol=1e-6)
    paper = AdaLoraHooks(ours, dataclasses.replace(ours.config, orth_form="paper"))
    assert paper.penalty() > 2 * penalty  # the squared norms, summed per layer, weigh far more here


# --- training ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    return options, prepare_data(options, quiet=True)


def train(prepared, folder, steps, resume=False, crash_after=None, **options):
    """``steps`` optimiser steps of AdaLoRA on the tiny task; ``crash_after`` interrupts the run after that
    step's checkpoint (checkpoints every 3 steps)."""
    run_options, data = prepared
    adapter = peftlab.attach(build_model(run_options, data, 0), "adalora", **options)
    hooks = AdaLoraHooks(adapter, adapter.config)
    settings = TrainSettings(max_steps=steps, batch_size=8, lr=1e-2, warmup=0, checkpoint_every=3, seed=0)
    fit_tiny(adapter, data, folder / "ckpt", settings, resume, hooks, crash_after)
    return adapter, hooks


OPTIONS = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 2, "targets": ["query", "value"]}


def test_training_prunes_to_the_target_budget_and_reports_the_ranks(prepared, tmp_path):
    adapter, hooks = train(prepared, tmp_path, steps=9, **OPTIONS)
    ranks = {name: int(layer.kept().sum()) for name, layer in adapter.layers().items()}
    assert sum(ranks.values()) == 2 * len(ranks)  # target_r per layer on average
    report = hooks.report(lambda: {})
    assert report["rank_per_module"] == ranks and report["total_rank"] == 8
    assert peftlab.delta_ranks(adapter) == ranks


def test_a_resumed_run_is_exact(prepared, tmp_path):
    straight, straight_hooks = train(prepared, tmp_path / "a", steps=9, **OPTIONS)
    with pytest.raises(KeyboardInterrupt):  # after the checkpoint at step 6, in the pruning phase
        train(prepared, tmp_path / "b", steps=9, crash_after=6, **OPTIONS)
    resumed, resumed_hooks = train(prepared, tmp_path / "b", steps=9, resume=True, **OPTIONS)
    for key, value in straight.state().items():
        assert torch.equal(resumed.state()[key], value), key
    for key, value in straight_hooks.state_dict().items():
        assert torch.equal(resumed_hooks.state_dict()[key], value), key


@pytest.mark.parametrize(
    "options, match",
    [
        ({"target_r": 20}, "target_r: expected an integer from 1 to init_r = 12"),
        ({"init_r": 0}, "init_r: expected a positive integer"),
        ({"beta1": 1.0}, "beta1"),
        ({"orth_reg": -1.0}, "orth_reg"),
        ({"orth_form": "frobenius"}, "orth_form"),
        ({"init_r": 40, "target_r": 2}, "init_r: rank 40 is larger than layer .* allows"),
    ],
)
def test_bad_options_name_the_field(options, match):
    with pytest.raises(InputError, match=match):
        peftlab.attach(tiny_classifier(), "adalora", **options)


def test_a_schedule_without_a_pruning_phase_is_refused(prepared, tmp_path):
    with pytest.raises(InputError, match="tinit/tfinal: tinit 5 and tfinal 5 leave no pruning phase in a run of 9"):
        train(prepared, tmp_path, steps=9, init_r=4, target_r=2, tinit=5, tfinal=5)


# --- Hugging Face PEFT parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kept", [None, 2, 0])
def test_peftlab_adalora_loads_in_peft_with_the_same_outputs(tmp_path, kept):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "adalora", init_r=4, target_r=2, alpha=8, targets=["query", "value", "dense"])
    randomise(adapter, kept=kept)
    expected = logits(model)
    peftlab.export_hf(adapter, tmp_path / "hf", task_type="SEQ_CLS")
    if kept is not None:  # only the kept triplets are written, as peft writes them
        tensors = read_tensors(tmp_path / "hf" / "adapter_model.safetensors")
        assert tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_E"].shape == (kept, 1)
    theirs = PeftModel.from_pretrained(tiny_classifier(), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-6)
    again = peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
    torch.testing.assert_close(logits(again.model), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pruned", [False, True])
def test_peft_adalora_loads_here_with_the_same_outputs(tmp_path, pruned):
    config = AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=6,
        target_modules=["query", "key", "intermediate.dense"],
        total_step=10,
        init_lora_weights=False,
        task_type="SEQ_CLS",
    )
    theirs = get_peft_model(tiny_classifier(), config)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:  # the adapter and the trained head
                p.copy_(torch.randn_like(p) * 0.3)
    if pruned:  # what peft's RankAllocator leaves after training: zeroed values and their rank pattern
        pattern = {}
        for name, p in theirs.base_model.model.named_parameters():
            if "lora_E" in name:
                keep = torch.rand(4) < 0.5
                with torch.no_grad():
                    p[~keep] = 0
                pattern[name] = keep.tolist()
        theirs.peft_config["default"].rank_pattern = pattern
    theirs.eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
    assert ours.method.name == "adalora" and ours.trainable_modules == ["classifier"]
    torch.testing.assert_close(logits(ours.model), expected, rtol=0, atol=1e-6)
    ours.save(tmp_path / "ours")
    again = peftlab.load_adapter(tiny_classifier(), tmp_path / "ours")
    torch.testing.assert_close(logits(again.model), expected, rtol=0, atol=1e-6)


def test_the_same_weights_give_the_same_outputs_in_both_libraries():
    """No conversion at all: peft's SVDLinear and ours, fed the same tensors, compute the same thing."""
    config = AdaLoraConfig(init_r=5, lora_alpha=3, target_modules=["query", "value"], total_step=10)
    theirs = get_peft_model(tiny_classifier(), config).eval()
    ours = peftlab.attach(tiny_classifier(), "adalora", init_r=5, target_r=2, alpha=3, targets=["query", "value"])
    randomise(ours, kept=3)
    theirs_params = dict(theirs.base_model.model.named_parameters())
    with torch.no_grad():
        for name, layer in ours.layers().items():
            for k, p in layer.adapter_parameters().items():
                theirs_params[f"{name}.{k}.default"].copy_(p)
        theirs.base_model.model.classifier.weight.copy_(ours.model.classifier.weight)
    torch.testing.assert_close(logits(theirs), logits(ours.model), rtol=0, atol=1e-6)
