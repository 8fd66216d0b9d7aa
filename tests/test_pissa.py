"""PiSSA and MiLoRA initialisation of LoRA: the SVD factors, unchanged outputs at step 0, exact save/load onto a fresh
pretrained base, merging and accounting, and parity with Hugging Face PEFT's ``init_lora_weights="pissa"``."""

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import peftlab
from peftlab.errors import InputError
from peftlab.methods.lora import LoraLinear
from tests.conftest import tiny_classifier
from tests.test_lora import TOKENS

QV = ["query", "value"]


def perturb(pairs, seed=0):
    """Add the same small random change to every (A, B) pair: a stand-in for some training steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for A, B in pairs:
            A.add_(torch.randn(A.shape, generator=g) * 0.05)
            B.add_(torch.randn(B.shape, generator=g) * 0.05)


def our_pairs(adapter):
    return [(layer.lora_A, layer.lora_B) for layer in adapter.layers().values()]


def peft_pairs(model):
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    return [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in layers]


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("init, minor", [("pissa", False), ("milora", True)])
def test_factors_are_the_principal_or_minor_singular_components(init, minor):
    torch.manual_seed(0)
    base = nn.Linear(12, 9)
    layer = LoraLinear(base, r=3, alpha=6.0, init=init)
    s = 6.0 / 3
    U, S, Vh = torch.linalg.svd(base.weight.detach())
    keep = slice(6, 9) if minor else slice(0, 3)
    expected_A = torch.diag(torch.sqrt(S[keep] / s)) @ Vh[keep]  # (r, in)
    expected_B = U[:, keep] @ torch.diag(torch.sqrt(S[keep] / s))  # (out, r)
    torch.testing.assert_close(layer.lora_A, expected_A, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.lora_B, expected_B, rtol=0, atol=1e-5)
    torch.testing.assert_close(s * layer.lora_B @ layer.lora_A, U[:, keep] @ torch.diag(S[keep]) @ Vh[keep])
    assert torch.equal(layer.lora_A0, layer.lora_A) and torch.equal(layer.lora_B0, layer.lora_B)
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("init", ["pissa", "milora"])
def test_fresh_adapter_leaves_outputs_unchanged_and_the_base_untouched(init):
    model = tiny_classifier()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model)
    adapter = peftlab.attach(model, "lora", r=4, init=init)
    # s (B A x - B0 A0 x) is zero in exact arithmetic; the two products are separate kernel calls on equal values,
    # whose rounding may differ with memory alignment on some CPUs (seen here: 2e-9 on logits of 1e-2)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-7)
    for name, layer in adapter.layers().items():
        assert torch.equal(layer.base.weight, original[f"{name}.weight"])


@pytest.mark.parametrize("rslora", [False, True])
def test_layer_computes_the_pissa_equation(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoraLinear(base, r=3, alpha=6.0, rslora=rslora, init="pissa")
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    perturb([(layer.lora_A, layer.lora_B)])
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    s = 6.0 / math.sqrt(3) if rslora else 6.0 / 3
    x = torch.randn(5, 12)
    expected = x @ base.weight.T + base.bias + s * (x @ A.T @ B.T - x @ A0.T @ B0.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), s * (B @ A - B0 @ A0))
    assert layer.adapter_buffers().keys() == {"lora_A0", "lora_B0"}


def test_dropout_leaves_the_frozen_initial_product_on_the_full_input():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 16), r=4, alpha=4, dropout=0.9, init="pissa").train()
    x = torch.randn(4, 16)
    # B A = B0 A0 here: with the same input in both terms the update would cancel; dropout on B A only means it
    # does not, exactly as in a residual base layer W0 - s B0 A0 with dropout on the LoRA branch.
    expected = layer.base(x) - layer.scaling * (x @ layer.lora_A0.T @ layer.lora_B0.T)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.9, training=True)
    expected = expected + layer.scaling * (dropped @ layer.lora_A.T @ layer.lora_B.T)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "milora"])
def test_save_load_onto_a_fresh_pretrained_base_is_exact(tmp_path, init):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", r=4, init=init, targets=["all-linear"])
    perturb(our_pairs(adapter))
    expected = logits(model)
    adapter.save(tmp_path / "adapter")
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "adapter")
    assert torch.equal(logits(loaded.model), expected)
    for key, value in adapter.state().items():
        assert torch.equal(loaded.state()[key], value), key
    assert any(k.endswith(".lora_A0") for k in loaded.state())


def test_loading_uses_the_saved_initial_factors_not_a_new_svd(tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = peftlab.attach(tiny_classifier(), "lora", r=2, init="pissa", targets=QV)
    path = adapter.save(tmp_path / "adapter")
    tensors = load_file(str(path / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith(".lora_A0"))
    tensors[key] = tensors[key] * 2  # a factor no SVD would give
    save_file(tensors, str(path / "adapter.safetensors"))
    loaded = peftlab.load_adapter(tiny_classifier(), path)
    assert torch.equal(loaded.state()[key], tensors[key])


@pytest.mark.parametrize("init", ["pissa", "milora"])
def test_merge_unmerge_and_accounting_are_relative_to_the_pretrained_weights(init):
    model = tiny_classifier()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = peftlab.attach(model, "lora", r=4, init=init, targets=QV)
    assert peftlab.parameter_counts(adapter)["changed"] == 0
    perturb(our_pairs(adapter))
    unmerged = logits(model)
    changed = peftlab.changed_parameters(adapter)
    ranks = peftlab.delta_ranks(adapter)
    assert all(r <= 8 for r in ranks.values()) and max(ranks.values()) > 4  # BA - B0A0: rank up to 2r
    adapter.merge()
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    for name, layer in adapter.layers().items():
        torch.testing.assert_close(layer.pretrained_weight(), pretrained[f"{name}.weight"], rtol=0, atol=1e-6)
    assert peftlab.changed_parameters(adapter) == changed
    adapter.unmerge()
    for name, layer in adapter.layers().items():
        torch.testing.assert_close(layer.base.weight, pretrained[f"{name}.weight"], rtol=0, atol=1e-6)
    adapter.merge()
    plain = adapter.unload()
    torch.testing.assert_close(logits(plain), unmerged, rtol=0, atol=1e-5)


def test_unload_without_merging_gives_back_the_pretrained_model():
    model = tiny_classifier()
    expected = logits(tiny_classifier())
    adapter = peftlab.attach(model, "lora", r=4, init="pissa", targets=QV, trainable_modules=[])
    perturb(our_pairs(adapter))
    assert torch.equal(logits(adapter.unload()), expected)


# --- parity with PEFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"r": 4, "alpha": 8}, {"r": 4, "lora_alpha": 8}),
        ({"r": 2, "alpha": 3, "rslora": True}, {"r": 2, "lora_alpha": 3, "use_rslora": True}),
    ],
)
def test_same_initial_factors_and_outputs_as_peft_pissa(ours, theirs):
    adapter = peftlab.attach(tiny_classifier(), "lora", init="pissa", targets=QV, **ours)
    peft_model = get_peft_model(
        tiny_classifier(), LoraConfig(target_modules=QV, init_lora_weights="pissa", task_type="SEQ_CLS", **theirs)
    ).eval()
    for (A, B), (pA, pB) in zip(our_pairs(adapter), peft_pairs(peft_model), strict=True):
        torch.testing.assert_close(A, pA, rtol=0, atol=1e-6)
        torch.testing.assert_close(B, pB, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(adapter.model), logits(peft_model), rtol=0, atol=1e-6)
    perturb(our_pairs(adapter))
    perturb(peft_pairs(peft_model))
    # PEFT stores the residual W0 - s B0 A0 in the base; we subtract s B0 A0 x: equal up to float rounding
    torch.testing.assert_close(logits(adapter.model), logits(peft_model), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"init": "pissa", "r": 4, "alpha": 8, "targets": QV},
        {"init": "milora", "r": 2, "alpha": 4, "rslora": True, "targets": ["all-linear"]},
        {
            "init": "pissa",
            "r": 4,
            "alpha": 8,
            "targets": QV,
            "rank_pattern": {"layer.1.*": 2},
            "alpha_pattern": {"value": 3.0},
        },
    ],
)
def test_export_is_a_rank_2r_lora_that_peft_loads_on_the_pretrained_base(tmp_path, options):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", **options)
    perturb(our_pairs(adapter))
    expected = logits(model)
    peftlab.export_hf(adapter, tmp_path / "hf", task_type="SEQ_CLS")
    cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * options["r"] and cfg["init_lora_weights"] is True
    theirs = PeftModel.from_pretrained(tiny_classifier(), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-6)
    # and back: a plain rank-2r LoRA here, with the same outputs
    again = peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
    assert again.config.init == "kaiming" and again.config.r == 2 * options["r"]
    torch.testing.assert_close(logits(again.model), expected, rtol=0, atol=1e-6)


def test_peft_conversion_of_pissa_imports_here_with_the_same_outputs(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="pissa", task_type="SEQ_CLS")
    peft_model = get_peft_model(tiny_classifier(), config)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(tmp_path / "initial")
    perturb(peft_pairs(peft_model))
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    ours = peftlab.import_hf(tiny_classifier(), tmp_path / "converted")
    assert ours.config.r == 8
    torch.testing.assert_close(logits(ours.model), expected, rtol=0, atol=1e-6)


def test_unconverted_peft_pissa_adapter_imports_with_the_svd_redone(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights="pissa", task_type="SEQ_CLS")
    peft_model = get_peft_model(tiny_classifier(), config)
    perturb(peft_pairs(peft_model))
    peft_model.save_pretrained(tmp_path / "hf")
    expected = logits(PeftModel.from_pretrained(tiny_classifier(), tmp_path / "hf").eval())
    ours = peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
    assert ours.config.init == "pissa"
    torch.testing.assert_close(logits(ours.model), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_4", "corda"])
def test_peft_inits_that_change_the_base_are_refused_by_name(tmp_path, init):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=QV, task_type="SEQ_CLS")
    get_peft_model(tiny_classifier(), config).save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"init_lora_weights": init}))
    with pytest.raises(InputError, match=f"init_lora_weights '{init}' changes the base weights"):
        peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
