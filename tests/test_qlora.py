"""QLoRA: LoRA on an NF4 base. The exact identity claim (a fresh QLoRA equals the *quantised* base), the equation,
deterministic re-quantisation on load, both merge modes, HF PEFT export as plain LoRA, the report and the CLI."""

import json
import math

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import BertForSequenceClassification

import peftlab
from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.errors import InputError
from peftlab.methods.qlora import QLoraLinear, quantization_report, requantized_merge_report
from peftlab.quant.nf4 import NF4Linear, quantize_nf4
from tests.conftest import tiny_classifier
from tests.test_lora import TOKENS, randomise_B


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def dequantised_base(targets=None, **quant) -> nn.Module:
    """The tiny classifier with every (or every named) linear layer's weight replaced by its NF4 round trip,
    computed with the quantisation functions directly (not through NF4Linear)."""
    model = tiny_classifier()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "classifier" and (targets is None or name in targets):
                module.weight.copy_(quantize_nf4(module.weight, **quant).dequantize())
    return model


def test_a_fresh_qlora_equals_the_quantised_base_exactly_and_not_the_fp32_base():
    model = tiny_classifier()
    fp32 = logits(model)
    adapter = peftlab.attach(model, "qlora", r=4)
    assert not peftlab.get_method("qlora").identity_at_init
    assert torch.equal(logits(model), logits(dequantised_base(adapter.targets)))
    assert not torch.allclose(logits(model), fp32, rtol=0, atol=1e-6)


def test_double_quant_off_and_other_block_sizes_follow_the_options():
    model = tiny_classifier()
    peftlab.attach(model, "qlora", r=4, double_quant=False, quant_block_size=32)
    assert torch.equal(logits(model), logits(dequantised_base(double_quant=False, block_size=32)))
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.base.absmax.dtype == torch.float32 and layer.base.absmax.numel() == 32 * 32 // 32


@pytest.mark.parametrize("rslora", [False, True])
def test_layer_computes_the_qlora_equation(rslora):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    layer = QLoraLinear(NF4Linear.from_linear(linear), r=3, alpha=6.0, rslora=rslora)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64)
    w = quantize_nf4(linear.weight).dequantize()
    s = 6.0 / math.sqrt(3) if rslora else 6.0 / 3
    expected = x @ w.T + linear.bias + s * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.pretrained_weight(), w)


def test_the_base_is_packed_and_only_lora_and_the_head_train():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "qlora", r=4)
    for name in adapter.targets:
        base = model.get_submodule(name).base
        assert isinstance(base, NF4Linear) and not hasattr(base, "weight")
        assert base.codes.dtype == torch.uint8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{t}.lora_{ab}" for t in adapter.targets for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    model.train()
    model(TOKENS, labels=torch.tensor([0, 1, 0])).loss.backward()
    assert all(model.get_submodule(t).lora_A.grad is not None for t in adapter.targets)
    # the packed weights count as the parameters they stand for: the same totals as LoRA
    lora = peftlab.parameter_counts(peftlab.attach(tiny_classifier(), "lora", r=4))
    assert peftlab.parameter_counts(adapter)["total"] == lora["total"]


def test_the_adapter_file_holds_only_lora_and_the_head_and_loading_requantises_exactly(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "qlora", r=4)
    randomise_B(adapter)
    expected = logits(adapter.model)
    adapter.save(tmp_path / "a")
    keys = set(read_tensors(tmp_path / "a" / WEIGHTS_FILE))
    assert keys == {f"{t}.lora_{ab}" for t in adapter.targets for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "a")
    assert torch.equal(logits(loaded.model), expected)
    for name in adapter.targets:
        ours, theirs = adapter.model.get_submodule(name).base, loaded.model.get_submodule(name).base
        assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), theirs.buffers(), strict=True))


def test_dequantized_merge_is_exact_and_unloads_to_a_plain_model():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "qlora", r=4)
    randomise_B(adapter)
    layer = model.bert.encoder.layer[0].attention.self.query
    codes = layer.base.codes.clone()
    expected = logits(model)
    counts = peftlab.parameter_counts(adapter)
    adapter.merge()
    assert type(layer.base) is nn.Linear and not layer.base.weight.requires_grad
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    assert peftlab.parameter_counts(adapter) == counts  # the dense weight now counts where the NF4 one did
    adapter.unmerge()
    assert isinstance(layer.base, NF4Linear) and torch.equal(layer.base.codes, codes)
    assert torch.equal(logits(model), expected)
    adapter.merge()
    plain = adapter.unload()
    assert not any(isinstance(m, (NF4Linear, QLoraLinear)) for m in plain.modules())
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


def test_requantized_merge_is_4bit_lossy_and_reported(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "qlora", r=4, merge_into="requantized")
    randomise_B(adapter)
    expected = logits(model)
    layers = adapter.layers()
    exact = {name: layer.pretrained_weight() + layer.delta_weight() for name, layer in layers.items()}
    adapter.merge()
    for name, layer in layers.items():
        assert isinstance(layer.base, NF4Linear)
        assert torch.equal(layer.base.dequantized_weight(), quantize_nf4(exact[name]).dequantize())
        assert 0 < layer.base.error["relative_frobenius"] < 0.1
    error = (logits(model) - expected).abs().max().item()
    assert 0 < error < 0.5
    # saved through plain transformers, the re-quantised model gives its own outputs
    merged = logits(model)
    adapter.unmerge()
    assert torch.equal(logits(model), expected)
    adapter.merge()
    adapter.unload().save_pretrained(tmp_path / "merged")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again), merged, rtol=0, atol=1e-6)


def test_the_report_gives_bits_sizes_errors_and_the_requantisation_cost():
    adapter = peftlab.attach(tiny_classifier(), "qlora", r=4)
    randomise_B(adapter)
    report = quantization_report(adapter)
    bases = [adapter.model.get_submodule(t).base for t in adapter.targets]
    weights = sum(base.in_features * base.out_features for base in bases)
    assert report["nf4_layers"] == len(adapter.targets) and report["nf4_parameters"] == weights
    assert report["dense_weight_bytes"] == 4 * weights
    assert report["bits_per_parameter"] == pytest.approx(8 * report["nf4_weight_bytes"] / weights)
    assert 4.12 < report["bits_per_parameter"] < 4.2  # 32x32 layers: one group scale per 16 blocks
    assert report["base_bytes_dense"] - report["base_bytes_nf4"] == 4 * weights - report["nf4_weight_bytes"]
    errors = report["quantization_error"]
    assert set(errors["per_layer"]) == set(adapter.targets)
    assert 0.05 < errors["relative_frobenius_mean"] <= errors["relative_frobenius_max"] < 0.1
    json.dumps(report)  # plain numbers for results.json
    expected = logits(adapter.model)
    calls = []

    def evaluate():
        calls.append(logits(adapter.model))
        return {"accuracy": 0.5, "loss": float(calls[-1].sum())}

    merge = requantized_merge_report(adapter, evaluate)
    assert len(calls) == 2 and torch.equal(calls[0], expected) and not torch.equal(calls[1], expected)
    assert merge["validation_unmerged"]["loss"] != merge["validation_requantized"]["loss"]
    assert 0 < merge["weight_relative_frobenius_mean"] < 0.1
    assert not adapter.merged and torch.equal(logits(adapter.model), expected)  # unmerged again


def test_hf_export_is_plain_lora_with_the_same_outputs_on_the_dequantised_base(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "qlora", r=4, alpha=8)
    randomise_B(adapter)
    with torch.no_grad():
        adapter.model.classifier.weight.mul_(-2)
    expected = logits(adapter.model)
    peftlab.export_hf(adapter, tmp_path / "hf", task_type="SEQ_CLS")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    theirs = PeftModel.from_pretrained(dequantised_base(adapter.targets), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-6)
    back = peftlab.import_hf(dequantised_base(adapter.targets), tmp_path / "hf")
    assert back.method.name == "lora"
    torch.testing.assert_close(logits(back.model), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"quant_block_size": 0}, "quant_block_size"),
        ({"double_quant_block_size": -1}, "double_quant_block_size"),
        ({"merge_into": "fp16"}, "merge_into"),
        ({"r": 0}, "r"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(InputError, match=f"{field}: expected"):
        peftlab.attach(tiny_classifier(), "qlora", **options)


def test_rank_larger_than_the_layer_and_non_finite_weights_are_refused():
    with pytest.raises(InputError, match="rank 40 is larger than layer"):
        peftlab.attach(tiny_classifier(), "qlora", r=40, targets=["query"])
    model = tiny_classifier()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="'bert.encoder.layer.0.attention.self.query' has non-finite weights"):
        peftlab.attach(model, "qlora", r=2, targets=["query"])


def test_the_cli_lists_the_quantisation_flags(cli):
    code, out, _ = cli("methods", "qlora")
    assert code == 0
    for flag in ("--quant-block-size", "--double-quant", "--double-quant-block-size", "--merge-into", "--r"):
        assert flag in out


def test_a_run_reports_the_quantisation_in_results(cli, tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(
        "train", "--model", tiny_model_dir, "--data", tiny_csv, "--method", "qlora", "--r", "4", "--out", out,
        "--max-steps", "3", "--batch-size", "16", "--max-length", "32",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    report = results["method_report"]
    assert 4.12 < report["bits_per_parameter"] < 4.2
    assert {"validation_unmerged", "validation_requantized"} <= set(report["requantized_merge"])
    dense = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert results["params"]["base"] == sum(p.numel() for p in dense.parameters())  # NF4 weights counted in full
    code, _, err = cli("merge", out, "--out", tmp_path / "merged")
    assert code == 0, err
