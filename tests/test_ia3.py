"""(IA)^3: the paper's rescaling, the default layers for BERT and Llama/Qwen, merging, and parity with Hugging Face
PEFT's IA3 in both directions."""

import json

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

import peftlab
from peftlab.errors import InputError
from peftlab.methods.ia3 import Ia3Linear
from tests.conftest import tiny_classifier
from tests.test_lora import TOKENS

BERT_KV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("key", "value")]
BERT_FFN = [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]


def randomise(vectors, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in vectors:
            v.add_(torch.randn(v.shape, generator=g) * 0.3)


def scales(adapter):
    return [layer.scale for layer in adapter.layers().values()]


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_layer_scales_outputs_or_inputs():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    out_layer = Ia3Linear(base, scale_input=False)
    in_layer = Ia3Linear(base, scale_input=True)
    assert torch.equal(out_layer(x), base(x)) and torch.equal(in_layer(x), base(x))
    randomise([out_layer.scale, in_layer.scale])
    torch.testing.assert_close(out_layer(x), out_layer.scale * (x @ base.weight.T + base.bias))
    torch.testing.assert_close(in_layer(x), (in_layer.scale * x) @ base.weight.T + base.bias)
    assert out_layer.scale.shape == (4,) and in_layer.scale.shape == (6,)


def test_bert_defaults_scale_keys_values_and_the_ffn_input_only():
    adapter = peftlab.attach(tiny_classifier(), "ia3")
    layers = adapter.layers()
    assert sorted(layers) == sorted(BERT_KV + BERT_FFN)
    assert {n for n, layer in layers.items() if layer.scale_input} == set(BERT_FFN)
    # the attention block's output.dense shares the suffix and stays untouched
    assert "bert.encoder.layer.0.attention.output.dense" not in layers
    assert peftlab.parameter_counts(adapter)["trainable"] == 2 * (32 + 32 + 64) + 2 * 32 + 2


def test_llama_defaults_scale_k_v_and_down_proj():
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    before = logits(model)
    adapter = peftlab.attach(model, "ia3")
    layers = adapter.layers()
    assert sorted(layers) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert layers["model.layers.0.self_attn.k_proj"].scale.shape == (16,)  # 2 key-value heads of 8
    assert layers["model.layers.0.mlp.down_proj"].scale.shape == (48,)
    assert torch.equal(logits(model), before)


def test_explicit_patterns_and_none():
    adapter = peftlab.attach(tiny_classifier(), "ia3", targets=["value"], feedforward=["none"])
    assert sorted(adapter.layers()) == [f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"targets": ["query"], "feedforward": ["query"]}, "feedforward: module .*query.* is also selected by targets"),
        ({"targets": ["none"], "feedforward": ["none"]}, "targets: expected some layers to scale"),
        ({"targets": ["auto", "query"]}, "targets: expected 'auto' or 'none' alone"),
        ({"feedforward": ["ouput.dense"]}, "feedforward: pattern 'ouput.dense' matches no module"),
    ],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(InputError, match=message):
        peftlab.attach(tiny_classifier(), "ia3", **options)


def test_auto_on_an_unknown_architecture_says_what_to_give():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(InputError, match="targets: 'auto' knows the layer names of .*give --targets and --feedforward"):
        peftlab.attach(model, "ia3", trainable_modules=[])
    adapter = peftlab.attach(model, "ia3", targets=["0"], feedforward=["2"], trainable_modules=[])
    assert sorted(adapter.layers()) == ["0", "2"]


def test_merge_rescales_rows_bias_and_columns_and_unmerge_restores():
    model = tiny_classifier()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = peftlab.attach(model, "ia3")
    randomise(scales(adapter))
    unmerged = logits(model)
    changed = peftlab.changed_parameters(adapter)
    adapter.merge()
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    for name, layer in adapter.layers().items():
        W0, b0, l = pretrained[f"{name}.weight"], pretrained[f"{name}.bias"], layer.scale.detach()
        if layer.scale_input:
            torch.testing.assert_close(layer.base.weight, W0 * l[None, :])
            torch.testing.assert_close(layer.base.bias, b0)
        else:
            torch.testing.assert_close(layer.base.weight, l[:, None] * W0)
            torch.testing.assert_close(layer.base.bias, l * b0)
    assert peftlab.changed_parameters(adapter) == changed
    adapter.unmerge()
    for name, layer in adapter.layers().items():
        torch.testing.assert_close(layer.base.weight, pretrained[f"{name}.weight"], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.base.bias, pretrained[f"{name}.bias"], rtol=0, atol=1e-6)


def test_a_zero_scale_cannot_be_merged():
    adapter = peftlab.attach(tiny_classifier(), "ia3")
    with torch.no_grad():
        scales(adapter)[0][3] = 0
    with pytest.raises(peftlab.PeftlabError, match="zero"):
        adapter.merge()


# --- parity with PEFT ------------------------------------------------------------------------------------------


def peft_vectors(model):
    return [p for n, p in model.named_parameters() if n.endswith("ia3_l.default")]


def test_peftlab_ia3_loads_in_peft_with_the_same_outputs(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "ia3")
    randomise(scales(adapter))
    with torch.no_grad():
        model.classifier.weight.mul_(-2)
    expected = logits(model)
    peftlab.export_hf(adapter, tmp_path / "hf", task_type="SEQ_CLS")
    cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and sorted(cfg["feedforward_modules"]) == sorted(BERT_FFN)
    theirs = PeftModel.from_pretrained(tiny_classifier(), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-6)
    # PEFT's merge of the same vectors gives the same outputs as ours
    adapter.merge()
    torch.testing.assert_close(logits(theirs.merge_and_unload()), logits(model), rtol=0, atol=1e-5)


def test_peft_ia3_loads_here_with_the_same_outputs(tmp_path):
    # PEFT's own BERT default: "output.dense" also catches the attention block's output projection (input-scaled)
    config = IA3Config(
        target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"], task_type="SEQ_CLS"
    )
    theirs = get_peft_model(tiny_classifier(), config)
    randomise(peft_vectors(theirs))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "classifier" in name and p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    adapter = peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
    assert adapter.method.name == "ia3" and adapter.trainable_modules == ["classifier"]
    inputs = {n for n, layer in adapter.layers().items() if layer.scale_input}
    assert "bert.encoder.layer.0.attention.output.dense" in inputs and len(inputs) == 4
    torch.testing.assert_close(logits(adapter.model), expected, rtol=0, atol=1e-6)
    adapter.save(tmp_path / "ours")
    again = peftlab.load_adapter(tiny_classifier(), tmp_path / "ours")
    torch.testing.assert_close(logits(again.model), expected, rtol=0, atol=1e-6)


def test_peft_ia3_with_a_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    config = IA3Config(target_modules=["key"], feedforward_modules=[], task_type="SEQ_CLS")
    get_peft_model(tiny_classifier(), config).save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("ia3_l"))
    tensors[key] = torch.ones(5, 1)
    save_file(tensors, str(path))
    with pytest.raises(InputError, match=r"ia3_l has shape \(5, 1\); expected \(32, 1\) or \(1, 32\)"):
        peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
