"""The speed benchmark (benchmarks/speed.py) in --quick mode: its output structure, and that the floor computes no
weight gradient. Timings are never asserted (the machine is shared)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from peftlab.bench.measure import FloorStep
from peftlab.train.loop import ClassificationTask, TrainSettings
from tests.conftest import tiny_classifier

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("speed_bench", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_section(tmp_path):
    speed = load_script()
    out_json, out_md = tmp_path / "speed.json", tmp_path / "speed.md"
    results = speed.main(["--quick", "--repeats", "2", "--json", str(out_json), "--markdown", str(out_md)])
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(results))
    assert [r["model"] for r in results["models"]] == ["tiny-bert", "tiny-llama"]
    for record in results["models"]:
        assert set(record["train"]) == {"floor", "lora", "peft", "full"}
        assert set(record["inference"]) == {"base", "unmerged", "merged", "peft"}
        assert all(len(t["times"]) == 2 and t["median_s"] > 0 for t in record["train"].values())
        assert set(record["targets"]) == set(speed.TARGETS)
        floor, lora, full = (record["memory"][n] for n in ("floor", "lora", "full"))
        assert floor["gradients"] == floor["optimizer"] == 0
        assert 0 < lora["gradients"] < full["gradients"]
        assert record["memory"]["lora"]["total"] <= record["memory"]["peft"]["total"] * 1.01
        assert record["trainable"]["lora"] == record["trainable"]["peft"]
    text = out_md.read_text()
    assert "### tiny-bert" in text and "lora/floor" in text and "merged/base" in text


def test_floor_computes_activation_gradients_only():
    model = tiny_classifier()
    model.train()
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(g))  # would fire for any weight gradient
    reached = []
    model.bert.embeddings.register_forward_hook(lambda m, i, out: out.register_hook(reached.append) and None)
    flags = [p.requires_grad for p in model.parameters()]
    batch = {
        "input_ids": torch.randint(5, 64, (3, 8)),
        "attention_mask": torch.ones(3, 8, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0]),
    }
    FloorStep(model, ClassificationTask(2), TrainSettings(), torch.device("cpu"))(batch)
    assert not seen and all(p.grad is None for p in model.parameters())
    assert len(reached) == 1 and reached[0].shape == (3, 8, 32)  # the backward reached the embeddings
    assert [p.requires_grad for p in model.parameters()] == flags  # the freeze is undone


def test_fused_lora_layers_match_plain_autograd():
    from torch import nn

    from peftlab.methods.lora import FusedLoraLinear, LoraLinear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: FusedLoraLinear.apply(*t, 0.7), (x, w, b, a, bb))

    base = nn.Linear(6, 4).requires_grad_(False)
    layers = [LoraLinear(base, r=3, alpha=6.0) for _ in range(2)]  # fused, plain autograd
    nn.init.normal_(layers[0].lora_B)
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    layers[1].fused = False
    x = torch.randn(2, 5, 6, requires_grad=True)
    outs, grads = [], []
    for layer in layers:
        assert layer.fusable(x) == layer.fused
        out = layer(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append([x.grad.clone(), layer.lora_A.grad, layer.lora_B.grad])
        x.grad = None
    for other, other_grads in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(outs[0], other)
        for g0, g1 in zip(grads[0], other_grads, strict=True):
            torch.testing.assert_close(g0, g1)


def test_a_whole_model_trains_the_same_through_the_fused_and_the_plain_lora_path():
    """Outputs and LoRA gradients of a whole model equal between FusedLoraLinear and the plain autograd formula."""
    import peftlab

    tokens = torch.randint(5, 64, (8, 40), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        attachment = peftlab.attach(tiny_classifier(), "lora", r=4)
        for layer in attachment.layers().values():
            torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
            layer.fused = fused
        attachment.model.train()
        logits = attachment.model(tokens).logits
        logits.square().sum().backward()
        grads = [p.grad for p in attachment.trainable_parameters()]
        results.append((logits, grads))
    for logits, grads in results[1:]:
        torch.testing.assert_close(logits, results[0][0], rtol=1e-5, atol=1e-6)
        for g, g0 in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)
