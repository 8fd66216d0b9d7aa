"""UniPELT: each gated submodule against a few lines of direct torch (LoRA, sequential adapter, prefix attention of
one layer), every gate shut (bias -> -inf) gives the plain model, the prefix MLP folded on save with the gates kept,
unloading nested wrappers, bad options, the CLI and SFT on a tiny Llama."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.core.adapter import AdapterLayer
from peftlab.methods import get_method
from peftlab.methods.unipelt import GatedLoraLinear, GatedPrefixAttention, GatedSequentialAdapter
from tests.conftest import tiny_classifier
from tests.test_attention import tiny_llama
from tests.test_prompt_tuning import randomise, tokens

P = 3
# LoRA on the paper's query and value projections keeps these layer-by-layer checks short; the default
# (all-linear) is checked in test_lora_by_default_adapts_every_linear_layer_the_adapter_does_not_wrap.
SMALL = {"num_virtual_tokens": P, "encoder_hidden": 8, "bottleneck": 4, "lora_r": 2, "lora_targets": ["auto"]}


def gated(make, **options):
    adapter = peftlab.attach(make(), "unipelt", **(SMALL | options))
    randomise(adapter.model)  # nonzero B and W_up: every submodule contributes
    return adapter


def layers_of(adapter, kind):
    return [layer for layer in adapter.layers().values() if type(layer) is kind]


def gate(layer, h):
    return torch.sigmoid(h @ layer.gate.weight.T + layer.gate.bias)  # (..., 1)


def test_gated_lora_and_gated_adapter_equal_their_equations():
    adapter = gated(tiny_classifier)
    x = torch.randn(2, 5, 32)
    for lora in layers_of(adapter, GatedLoraLinear):  # the query and value projections
        update = (16 / 2) * (x @ lora.lora_A.T @ lora.lora_B.T)  # s B A x with s = alpha / r
        expected = x @ lora.base.weight.T + lora.base.bias + gate(lora, x) * update
        torch.testing.assert_close(lora(x), expected)
    u = torch.randn(2, 5, 64)
    for layer in layers_of(adapter, GatedSequentialAdapter):  # after each FFN output projection
        a = layer.adapter
        y = u @ layer.base.weight.T + layer.base.bias
        bottleneck = F.relu(y @ a.down_weight.T + a.down_bias) @ a.up_weight.T + a.up_bias
        torch.testing.assert_close(layer(u), y + gate(layer, y) * bottleneck)


def test_lora_by_default_adapts_every_linear_layer_the_adapter_does_not_wrap():
    model = tiny_classifier()
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("classifier")}
    adapter = peftlab.attach(model, "unipelt", num_virtual_tokens=P, encoder_hidden=8, bottleneck=4, lora_r=2)
    # (names as in the plain model: the prefix wrapper around each attention.self adds a ".base")
    with_lora = {n.replace(".base.", ".") for n, m in adapter.model.named_modules() if isinstance(m, GatedLoraLinear)}
    with_adapter = {n for n, m in adapter.model.named_modules() if isinstance(m, GatedSequentialAdapter)}
    assert with_adapter == {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}
    assert with_lora == linear - with_adapter  # query, key, value, attention output, intermediate, pooler


def test_gated_prefix_attention_of_one_layer_by_direct_computation():
    adapter = gated(tiny_classifier, projection=False)
    attention = adapter.model.bert.encoder.layer[0].attention.self  # GatedPrefixAttention around BertSelfAttention
    assert isinstance(attention, GatedPrefixAttention)
    x = torch.randn(2, 5, 32)  # the attention input
    heads, d = 4, 8
    split = lambda t: t.view(2, -1, heads, d).transpose(1, 2)  # noqa: E731  (B, T, 32) -> (B, heads, T, d)
    with torch.no_grad():
        q, k, v = split(attention.query(x)), split(attention.key(x)), split(attention.value(x))  # gated LoRA on q, v
        keys = torch.cat([attention.prefix_keys.expand(2, -1, -1, -1), k], 2)  # (B, heads, P + T, d)
        values = torch.cat([attention.prefix_values.expand(2, -1, -1, -1), v], 2)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(d)  # (B, heads, T, P + T)
        scores[..., :P] += torch.log(gate(attention, x)).unsqueeze(1)  # log g_P(x_t) on the prefix columns
        expected = (scores.softmax(-1) @ values).transpose(1, 2).reshape(2, 5, 32)
        got = attention(x)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_classifier, tiny_llama])
def test_every_gate_shut_gives_the_plain_model(make):
    adapter = gated(make, shift_positions=False)  # shifted positions would move the real tokens even without prefixes
    with torch.no_grad():
        for layer in adapter.layers().values():
            layer.gate.weight.zero_()
            layer.gate.bias.fill_(-1e4)  # g = sigmoid(-1e4) = 0, log g = -1e4
    ids, mask = tokens()
    plain = make()
    if hasattr(plain, "classifier"):
        plain.classifier.load_state_dict(adapter.model.classifier.state_dict())
    got = adapter.model.eval()(ids, attention_mask=mask).logits
    expected = plain(ids, attention_mask=mask).logits
    keep = mask.bool() if got.dim() == 3 else slice(None)
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-5)
    with torch.no_grad():  # open gates: now every submodule changes the outputs
        for layer in adapter.layers().values():
            layer.gate.bias.fill_(0.0)
    assert not torch.allclose(adapter.model(ids, attention_mask=mask).logits[keep], expected[keep], atol=1e-3)


@pytest.mark.parametrize("make", [tiny_classifier, tiny_llama])
def test_save_folds_the_prefix_mlp_keeps_the_gates_and_round_trips(make, tmp_path):
    adapter = gated(make)
    ids, mask = tokens()
    expected = adapter.model.eval()(ids, attention_mask=mask).logits
    adapter.save(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert not any(".mlp.hidden." in k or ".mlp.out." in k or ".mlp.inputs" in k for k in saved)
    assert sum(k.endswith("gate.weight") for k in saved) == 2 * (2 + 1 + 1)  # per layer: LoRA q, v; prefix; adapter
    assert sum(k.endswith("prefix_keys") for k in saved) == 2
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["config"]["projection"] is False and meta["trained_as"]["projection"] is True
    loaded = peftlab.load_adapter(make(), tmp_path / "adapter")
    keep = mask.bool() if expected.dim() == 3 else slice(None)
    got = loaded.model.eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)
    assert adapter.fold()  # in place, with LoRA wrappers nested inside the prefix wrappers
    assert peftlab.parameter_counts(adapter) == peftlab.parameter_counts(loaded)
    torch.testing.assert_close(adapter.model(ids, attention_mask=mask).logits[keep], expected[keep], rtol=0, atol=1e-6)
    plain = loaded.unload()  # inner wrappers go first, so the nested ones unload too
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    reference = make()
    if hasattr(reference, "classifier"):
        reference.classifier.load_state_dict(plain.classifier.state_dict())
    torch.testing.assert_close(plain(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


def test_houlsby_sites_and_explicit_lora_targets():
    adapter = peftlab.attach(tiny_llama(), "unipelt", adapter_sites="attention_and_ffn", lora_targets=["k_proj"])
    names = adapter.targets
    assert [n for n in names if n.endswith(("o_proj", "down_proj"))] == [
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")
    ]
    assert [n for n in names if n.endswith("k_proj")] == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lora_r": 0}, "lora_r: expected a positive integer"),
        ({"lora_r": 64}, "r: rank 64 is larger than layer"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens: expected a positive integer"),
        ({"bottleneck": 4, "reduction_factor": 2.0}, "bottleneck: expected bottleneck or reduction_factor, not both"),
        ({"adapter_sites": "everywhere"}, "adapter_sites: expected one of ffn, attention_and_ffn"),
        ({"lora_targets": ["auto", "query"]}, "lora_targets: expected 'auto' alone"),
        ({"lora_targets": ["quer"]}, "targets: pattern 'quer' matches no module"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_field(options, message):
    with pytest.raises(peftlab.InputError, match=message):
        peftlab.attach(tiny_classifier(), "unipelt", **options)


def test_cli_trains_and_lists_the_flags(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, out, _ = cli("methods", "unipelt")
    assert code == 0 and "arXiv:2110.07577" in out
    for flag in ("--lora-r", "--lora-alpha", "--num-virtual-tokens", "--bottleneck", "--adapter-sites"):
        assert flag in out
    code, _, err = cli(
        "train", "--method", "unipelt", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run",
        "--max-steps", "3", "--batch-size", "8", "--max-length", "32", "--num-virtual-tokens", "4",
        "--bottleneck", "8", "--encoder-hidden", "16", "--lora-r", "4",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["lr"] == get_method("unipelt").lr == 1e-3


def test_sft_on_a_tiny_llama(tiny_llama_dir, tmp_path, cli):
    rows = [{"instruction": "classify the sentiment", "input": f"the movie {w}", "output": label}
            for w, label in [("great", "positive"), ("awful", "negative")] * 20]  # fmt: skip
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code, _, err = cli("train", "--task", "sft", "--model", tiny_llama_dir, "--data", data, "--out", run,
                       "--method", "unipelt", "--bottleneck", "8", "--num-virtual-tokens", "4", "--lora-r", "4",
                       "--encoder-hidden", "16", "--epochs", "3", "--batch-size", "8", "--max-length", "32",
                       "--eval-generate", "2")  # fmt: skip
    assert code == 0, err
    history = json.loads((run / "results.json").read_text())["history"]
    assert history[-1]["validation"]["loss"] < history[0]["validation"]["loss"]
