"""DoRA: the paper's equation, the detached norm, merging, and parity with Hugging Face PEFT's ``use_dora=True``."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import peftlab
from peftlab.methods.dora import DoraLinear
from tests.conftest import tiny_classifier
from tests.test_lora import TOKENS

QV = ["query", "value"]
LABELS = torch.tensor([0, 1, 0])


def randomise(layers, seed=0):
    """A stand-in for training: random B, magnitudes moved off ||W0||."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for B, magnitude in layers:
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)
            magnitude.mul_(1 + torch.randn(magnitude.shape, generator=g) * 0.1)


def ours(adapter):
    return [(layer.lora_B, layer.magnitude) for layer in adapter.layers().values()]


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def reference(layer: DoraLinear, x: torch.Tensor) -> torch.Tensor:
    """W' x + b with W' = m (W0 + s B A) / ||W0 + s B A||, the norm per output row and treated as a constant."""
    W0, A, B, m = layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude
    direction = W0 + layer.scaling * B @ A  # (out, in)
    norm = direction.norm(dim=1, keepdim=True).detach()  # (out, 1)
    return x @ (m[:, None] * direction / norm).T + layer.base.bias


def test_magnitude_starts_at_the_row_norms_of_the_pretrained_weight():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = DoraLinear(base, r=2, alpha=4.0)
    torch.testing.assert_close(layer.magnitude, base.weight.norm(dim=1))
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("rslora", [False, True])
def test_layer_computes_the_dora_equation_and_its_gradients(rslora):
    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(10, 6), r=2, alpha=4.0, rslora=rslora)
    randomise([(layer.lora_B, layer.magnitude)])
    x = torch.randn(4, 10)
    out = layer(x)
    expected = reference(layer, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the norm passes no gradient (the paper's section 4.3): the same gradients as the reference with it detached
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_only_lora_the_magnitude_and_the_head_train():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "dora", r=4, targets=QV)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{t}.{p}" for t in adapter.targets for p in ("lora_A", "lora_B", "magnitude")}
    assert trainable == expected | {"classifier.weight", "classifier.bias"}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["bert.encoder.layer.0.attention.self.query.magnitude"] == (32,)


def test_merge_replaces_the_weight_and_unmerge_restores_it():
    model = tiny_classifier()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = peftlab.attach(model, "dora", r=2, targets=["all-linear"])
    randomise(ours(adapter))
    unmerged = logits(model)
    changed = peftlab.changed_parameters(adapter)
    ranks = peftlab.delta_ranks(adapter)
    adapter.merge()
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    for name, layer in adapter.layers().items():
        W = layer.base.weight
        direction = pretrained[f"{name}.weight"] + layer.lora_weight()
        merged = layer.magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
        torch.testing.assert_close(W, merged, rtol=0, atol=1e-6)
        torch.testing.assert_close(W.norm(dim=1), layer.magnitude.detach().abs(), rtol=1e-5, atol=0)
    assert peftlab.changed_parameters(adapter) == changed
    adapter.unmerge()
    for name, layer in adapter.layers().items():
        torch.testing.assert_close(layer.base.weight, pretrained[f"{name}.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-6)
    # a rescaling of every row: the weight difference has full rank, not r = 2
    assert all(rank == min(pretrained[f"{n}.weight"].shape) for n, rank in ranks.items())


def test_save_load_round_trips_exactly(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "dora", r=4, targets=QV)
    randomise(ours(adapter))
    adapter.save(tmp_path / "adapter")
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "adapter")
    assert torch.equal(logits(loaded.model), logits(model))


# --- parity with PEFT ------------------------------------------------------------------------------------------


def peft_dora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector]


@pytest.mark.parametrize(
    "options",
    [
        {"r": 4, "alpha": 8, "targets": QV},
        {"r": 2, "alpha": 4, "rslora": True, "targets": ["all-linear"], "rank_pattern": {"layer.1.*": 1}},
        {"r": 2, "alpha": 4, "init": "pissa", "targets": QV},
    ],
)
def test_peftlab_dora_loads_in_peft_with_the_same_outputs(tmp_path, options):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "dora", **options)
    randomise(ours(adapter))
    expected = logits(model)
    peftlab.export_hf(adapter, tmp_path / "hf", task_type="SEQ_CLS")
    cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    theirs = PeftModel.from_pretrained(tiny_classifier(), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-6)


def test_peft_dora_loads_here_with_the_same_outputs_and_gradients(tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "key", "dense"], use_dora=True, task_type="SEQ_CLS",
        init_lora_weights=False,
    )  # fmt: skip
    theirs = get_peft_model(tiny_classifier(), config)
    randomise(
        [(m.lora_B["default"].weight, m.lora_magnitude_vector["default"].weight) for m in peft_dora_layers(theirs)]
    )
    theirs.eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    adapter = peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
    assert adapter.method.name == "dora"
    torch.testing.assert_close(logits(adapter.model), expected, rtol=0, atol=1e-6)
    # the same training signal: gradients of A, B and the magnitude agree (the norm is detached in both)
    theirs(input_ids=TOKENS, labels=LABELS).loss.backward()
    adapter.model(input_ids=TOKENS, labels=LABELS).loss.backward()
    for layer, m in zip(adapter.layers().values(), peft_dora_layers(theirs), strict=True):
        torch.testing.assert_close(layer.lora_A.grad, m.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, m.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            layer.magnitude.grad, m.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-6
        )
    # and it round-trips through peftlab's own format
    adapter.save(tmp_path / "ours")
    again = peftlab.load_adapter(tiny_classifier(), tmp_path / "ours")
    torch.testing.assert_close(logits(again.model), expected, rtol=0, atol=1e-6)


def test_dropout_in_training_matches_peft():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_dora=True, lora_dropout=0.3, init_lora_weights=False)
    theirs = get_peft_model(tiny_classifier(), config)
    randomise(
        [(m.lora_B["default"].weight, m.lora_magnitude_vector["default"].weight) for m in peft_dora_layers(theirs)]
    )
    adapter = peftlab.attach(tiny_classifier(), "dora", r=4, alpha=8, dropout=0.3, targets=QV)
    with torch.no_grad():
        for layer, m in zip(adapter.layers().values(), peft_dora_layers(theirs), strict=True):
            layer.lora_A.copy_(m.lora_A["default"].weight)
            layer.lora_B.copy_(m.lora_B["default"].weight)
            layer.magnitude.copy_(m.lora_magnitude_vector["default"].weight)
    theirs.train()
    adapter.model.train()
    torch.manual_seed(5)
    expected = theirs(input_ids=TOKENS).logits
    torch.manual_seed(5)
    torch.testing.assert_close(adapter.model(input_ids=TOKENS).logits, expected, rtol=0, atol=1e-6)
