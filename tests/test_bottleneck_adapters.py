"""Bottleneck adapters (houlsby, pfeiffer, parallel): the adapter equation and where it sits, checked against a few
lines of reference code on the unwrapped layers of BERT, MPNet, DistilBERT and Llama; sizes and options; trained
LayerNorms; no merging; AdapterDrop (fixed n, random n per step from the global RNG, exact resume, speed); SFT on a
tiny Llama through the CLI. Hugging Face PEFT has no bottleneck adapters, so there is no parity test."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MPNetConfig,
    MPNetForSequenceClassification,
)

import peftlab
from peftlab.errors import InputError
from peftlab.methods.adapter_drop import AdapterDropHooks, drop_speed, set_drop
from peftlab.methods.bottleneck import Bottleneck
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import TrainSettings
from tests.conftest import tiny_classifier
from tests.short_fit import fit_tiny

TOKENS = torch.tensor([[2, 7, 12, 30, 41, 3, 0], [2, 9, 17, 25, 3, 0, 0]])
MASK = (TOKENS != 0).long()


def randomise(adapter, seed=0, std=0.3):
    """Non-zero up-projections and biases, so every adapter changes its layer's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers().values():
            for name in ("up_weight", "up_bias", "down_bias"):
                t = getattr(layer.adapter, name)
                t.copy_(torch.randn(t.shape, generator=g) * std)


def reference(bottleneck: Bottleneck, h: torch.Tensor) -> torch.Tensor:
    """A(h) = W_up act(W_down h + b_down) + b_up, written out."""
    act = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[bottleneck.activation]
    down = h @ bottleneck.down_weight.T + bottleneck.down_bias
    return act(down) @ bottleneck.up_weight.T + bottleneck.up_bias


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens, attention_mask=(tokens != 0).long()).logits


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_bottleneck_is_down_activation_up(activation):
    torch.manual_seed(0)
    block = Bottleneck(12, 3, activation)
    h = torch.randn(2, 5, 12)
    assert torch.equal(block(h), torch.zeros(2, 5, 12))  # W_up = 0, b_up = 0: the adapter starts as the identity
    with torch.no_grad():
        block.up_weight.normal_()
        block.up_bias.normal_()
        block.down_bias.normal_()
    torch.testing.assert_close(block(h), reference(block, h))
    assert block.down_weight.shape == (3, 12) and block.up_weight.shape == (12, 3)


def test_houlsby_sits_after_both_output_projections_inside_the_residual():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "houlsby", bottleneck=4)
    assert adapter.targets == [
        f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output.dense", "output.dense")
    ]
    randomise(adapter)
    torch.manual_seed(1)
    x, u = torch.randn(2, 5, 32), torch.randn(2, 5, 64)  # a sublayer's residual input; the FFN's inner activation
    for sublayer, inner in ((model.bert.encoder.layer[0].attention.output, x), (model.bert.encoder.layer[1].output, u)):
        wrapper = sublayer.dense
        y = wrapper.base(inner)  # the pretrained projection
        expected = sublayer.LayerNorm(y + reference(wrapper.adapter, y) + x)  # adapter before residual and LayerNorm
        torch.testing.assert_close(sublayer(inner, x), expected)


def test_pfeiffer_sits_after_the_feed_forward_output_only():
    adapter = peftlab.attach(tiny_classifier(), "pfeiffer", bottleneck=4)
    assert adapter.targets == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    counts = peftlab.parameter_counts(adapter)
    assert counts["adapter"] == 2 * (4 * 32 + 4 + 32 * 4 + 32)
    assert counts["trainable"] == counts["adapter"] + 32 * 2 + 2  # plus the head


def test_parallel_adds_the_scaled_adapter_of_the_block_input_in_bert():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "parallel", bottleneck=4, scale=2.5)
    assert adapter.targets == [f"bert.encoder.layer.{i}.output" for i in range(2)]
    randomise(adapter)
    layer = model.bert.encoder.layer[0]
    torch.manual_seed(1)
    x = torch.randn(2, 5, 32)  # the FFN block's input (the attention sublayer's output)
    out = layer.output.base  # the pretrained BertOutput: LayerNorm(dropout(dense(u)) + x)
    ffn = out.dense(layer.intermediate(x))
    expected = out.LayerNorm(ffn + 2.5 * reference(layer.output.adapter, x) + x)
    torch.testing.assert_close(layer.feed_forward_chunk(x), expected)


def tiny_llama():
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_llama_places_houlsby_after_o_proj_and_down_proj_and_parallel_beside_mlp():
    adapter = peftlab.attach(tiny_llama(), "houlsby", bottleneck=4)
    assert adapter.targets == [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]
    y = torch.randn(3, 48)
    down = adapter.layers()["model.layers.0.mlp.down_proj"]
    randomise(adapter)
    torch.testing.assert_close(down(y), down.base(y) + reference(down.adapter, down.base(y)))

    model = tiny_llama()
    before = logits(model)
    adapter = peftlab.attach(model, "parallel", bottleneck=4, activation="silu")
    assert adapter.targets == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert torch.equal(logits(model), before)
    randomise(adapter)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.base(x) + 4.0 * reference(mlp.adapter, x))  # s = 4 by default


@pytest.mark.parametrize(
    "make, houlsby, parallel",
    [
        (
            lambda: MPNetForSequenceClassification(
                MPNetConfig(
                    vocab_size=64,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=64,
                    max_position_embeddings=40,
                )
            ),
            ["mpnet.encoder.layer.0.attention.attn.o", "mpnet.encoder.layer.0.output.dense"],
            ["mpnet.encoder.layer.0.output", "mpnet.encoder.layer.1.output"],
        ),
        (
            lambda: DistilBertForSequenceClassification(
                DistilBertConfig(
                    vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40
                )
            ),
            ["distilbert.transformer.layer.0.attention.out_lin", "distilbert.transformer.layer.0.ffn.lin2"],
            ["distilbert.transformer.layer.0.ffn", "distilbert.transformer.layer.1.ffn"],
        ),
    ],
)
def test_mpnet_and_distilbert_layouts(make, houlsby, parallel):
    for method, expected in (("houlsby", houlsby), ("parallel", parallel)):
        torch.manual_seed(0)
        model = make().eval()
        before = logits(model)
        adapter = peftlab.attach(model, method, bottleneck=4)
        assert adapter.targets[: len(expected)] == expected
        assert torch.equal(logits(model), before)
        randomise(adapter)
        assert not torch.allclose(logits(model), before)


def test_unknown_architecture_names_what_was_looked_for_and_patterns_work():
    toy = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(InputError, match=r"^targets: 'auto' found none .*looked for BERT.*'attention.output.dense'"):
        peftlab.attach(toy, "houlsby")
    adapter = peftlab.attach(toy, "pfeiffer", targets=["2"], bottleneck=2)
    assert adapter.targets == ["2"]
    with pytest.raises(InputError, match="^drop_layers: AdapterDrop needs every adapter inside one list of layers"):
        peftlab.attach(nn.Sequential(nn.Linear(8, 8)), "pfeiffer", targets=["0"], drop_layers=1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bottleneck": 4, "reduction_factor": 8}, "bottleneck: expected bottleneck or reduction_factor, not both"),
        ({"bottleneck": 0}, "bottleneck: expected a positive integer"),
        ({"reduction_factor": 0.5}, "reduction_factor: expected a number >= 1"),
        (
            {"bottleneck": 40},
            "bottleneck: gives an adapter of 40 units for layer 'bert.encoder.layer.0.output.dense' "
            "of width 32; expected 1 to 32",
        ),
        ({"reduction_factor": 64}, "reduction_factor: gives an adapter of 0 units"),
        ({"activation": "swish"}, "activation: expected one of relu, gelu, silu, tanh, got 'swish'"),
        ({"drop_layers": 3}, "drop_layers: expected at most 2 (the model's layers), got 3"),
        ({"drop_train": True, "drop_train_max": 2}, "drop_train_max: expected at most 1"),
        ({"targets": ["auto", "query"]}, "targets: expected 'auto' alone"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_field(options, message):
    with pytest.raises(InputError) as e:
        peftlab.attach(tiny_classifier(), "pfeiffer", **options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reduction_factor_and_default_size():
    layer = peftlab.attach(tiny_classifier(), "pfeiffer", reduction_factor=8).layers()[
        "bert.encoder.layer.0.output.dense"
    ]
    assert layer.adapter.size == 4  # 32 / 8
    layer = peftlab.attach(tiny_classifier(), "pfeiffer").layers()["bert.encoder.layer.0.output.dense"]
    assert layer.adapter.size == 2  # 32 / 16 by default


def test_train_layernorms_trains_and_saves_the_block_norms_only(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "houlsby", bottleneck=4, train_layernorms=True)
    norms = sorted(k for k in adapter.state() if "LayerNorm" in k)
    assert norms == sorted(
        f"bert.encoder.layer.{i}.{p}.LayerNorm.{w}" for i in range(2) for p in ("attention.output", "output")
        for w in ("weight", "bias")
    )  # fmt: skip
    assert not model.bert.embeddings.LayerNorm.weight.requires_grad
    randomise(adapter)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.LayerNorm.weight.mul_(1.5)
    expected = logits(model)
    adapter.save(tmp_path / "a")
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "a")
    torch.testing.assert_close(logits(loaded.model), expected, rtol=0, atol=1e-6)
    assert peftlab.parameter_counts(loaded)["changed"] == peftlab.parameter_counts(adapter)["changed"]

    llama = peftlab.attach(tiny_llama(), "parallel", bottleneck=4, train_layernorms=True)
    trained = {k.rsplit(".", 2)[-2] for k in llama.state() if "norm" in k}
    assert trained == {"input_layernorm", "post_attention_layernorm"}  # the final model.norm stays frozen


def test_adapters_cannot_merge():
    adapter = peftlab.attach(tiny_classifier(), "parallel")
    with pytest.raises(InputError, match="^method 'parallel' has no weight form and cannot be merged$"):
        adapter.merge()


def test_drop_layers_skips_the_lowest_layers_adapters(tmp_path):
    model = tiny_classifier()
    plain = logits(model)
    adapter = peftlab.attach(model, "houlsby", bottleneck=4)
    randomise(adapter)
    full = logits(model)
    set_drop(adapter, 2)
    torch.testing.assert_close(logits(model), plain, rtol=0, atol=0)  # every adapter skipped: the plain model
    set_drop(adapter, 1)
    one = logits(model)
    adapter.save(tmp_path / "a")
    with torch.no_grad():  # the same as zeroing layer 0's adapters
        for name, layer in adapter.layers().items():
            if name.startswith("bert.encoder.layer.0."):
                layer.adapter.up_weight.zero_()
                layer.adapter.up_bias.zero_()
    set_drop(adapter, 0)
    torch.testing.assert_close(logits(model), one, rtol=0, atol=0)
    assert not torch.allclose(one, full)
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "a")  # n = 1 is saved in the config
    assert loaded.config.drop_layers == 1
    torch.testing.assert_close(logits(loaded.model), one, rtol=0, atol=0)


def test_drop_train_draws_n_per_step_from_the_step_generator_and_restores_the_fixed_n():
    adapter = peftlab.attach(tiny_classifier(), "pfeiffer", drop_train=True, drop_layers=1)
    hooks = AdapterDropHooks(adapter, adapter.config)
    layers = adapter.layers()
    # n from 0..layers-1 = 0..1, from each step's generator
    expected = [int(torch.randint(0, 2, (), generator=hooks.random.generator(s)).item()) for s in range(12)]
    torch.manual_seed(3)  # the global RNG plays no part
    for step in range(12):
        hooks.before_step(step)
        dropped = [layers[f"bert.encoder.layer.{i}.output.dense"].dropped for i in range(2)]
        assert dropped == [expected[step] > 0, False]
        hooks.after_step(step, None, None)
        assert [layer.dropped for layer in layers.values()] == [True, False]  # drop_layers = 1 between steps
    assert hooks.drawn == expected and set(expected) == {0, 1}
    seen = []
    hooks.report(lambda: seen.append([layer.dropped for layer in layers.values()]) or {"accuracy": 0.5})
    assert seen == [[False, False], [True, False]]


def test_drop_train_resumes_exactly(tiny_model_dir, tiny_csv, tmp_path):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    data = prepare_data(options, quiet=True)

    def train(folder, crash_after=None, resume=False):
        model = build_model(options, data, 0)
        for m in model.modules():  # dropout draws from the global RNG too
            if isinstance(m, nn.Dropout):
                m.p = 0.1
        adapter = peftlab.attach(model, "houlsby", bottleneck=4, drop_train=True)
        settings = TrainSettings(max_steps=8, batch_size=8, lr=1e-2, warmup=0, checkpoint_every=3, seed=0)
        fit_tiny(adapter, data, folder, settings, resume, crash_after=crash_after)
        return adapter

    straight = train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", crash_after=3)
    resumed = train(tmp_path / "b", resume=True)
    for key, value in straight.state().items():
        assert torch.equal(resumed.state()[key], value), key


def test_drop_speed_times_each_n_and_restores_the_setting():
    adapter = peftlab.attach(tiny_classifier(), "houlsby", drop_layers=1)
    times = drop_speed(adapter, {"input_ids": TOKENS, "attention_mask": MASK}, drops=[0, 2], repeats=3)
    assert set(times) == {0, 2} and all(t > 0 for t in times.values())
    assert [layer.dropped for layer in adapter.layers().values()] == [True, True, False, False]


def test_cli_trains_lists_flags_and_refuses_to_merge(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, out, _ = cli("methods", "houlsby")
    assert code == 0 and "--reduction-factor" in out and "--drop-train" in out and "arXiv:1902.00751" in out
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--method", "pfeiffer", "--out", run,
                       "--max-steps", "3", "--batch-size", "8", "--max-length", "32", "--drop-train")  # fmt: skip
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["lr"] == 1e-3 and results["method_report"]["drop_layers"] == 0
    assert set(results["method_report"]["validation_by_drop_layers"]) == {"0", "1"}
    code, _, err = cli("merge", run, "--out", tmp_path / "merged")
    assert code == 2 and err == "error: method 'pfeiffer' has no weight form and cannot be merged\n"


def test_sft_on_a_tiny_llama(tiny_llama_dir, tmp_path, cli):
    rows = [{"instruction": "classify the sentiment", "input": f"the movie {w}", "output": label}
            for w, label in [("great", "positive"), ("awful", "negative")] * 20]  # fmt: skip
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code, _, err = cli("train", "--task", "sft", "--model", tiny_llama_dir, "--data", data, "--out", run,
                       "--method", "houlsby", "--bottleneck", "8", "--epochs", "3", "--batch-size", "8", "--lr", "0.01",
                       "--max-length", "32", "--eval-generate", "0")  # fmt: skip
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "houlsby" and results["params"]["trainable"] == 2 * 2 * (2 * 8 * 32 + 8 + 32)
    history = results["history"]
    assert history[-1]["validation"]["loss"] < history[0]["validation"]["loss"]
