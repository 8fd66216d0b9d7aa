"""MAM adapter: equal to prefix tuning plus a parallel adapter attached together with the same tensors (tiny BERT and
tiny Llama), the prefix MLP folded away on save with the parallel adapters kept, the paper's defaults, bad options."""

import json

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.core.adapter import adapter_layers
from peftlab.methods import get_method, parallel
from peftlab.methods.parallel import ParallelConfig
from tests.conftest import tiny_classifier
from tests.test_attention import tiny_llama
from tests.test_prompt_tuning import randomise, tokens

P = 3


def reference(make, mam):
    """prefix_tuning attached to a fresh model, a parallel adapter applied beside it, and MAM's tensors copied in."""
    model = make()
    peftlab.attach(model, "prefix_tuning", num_virtual_tokens=P, projection=False)
    parallel.apply(model, ParallelConfig(bottleneck=mam.config.bottleneck, scale=mam.config.scale))
    theirs = {
        f"{name}.{key}": tensor
        for name, layer in adapter_layers(model).items()
        for key, tensor in layer.adapter_parameters().items()
    }
    ours = mam.layer_state()
    assert sorted(theirs) == sorted(ours)
    with torch.no_grad():
        for key, tensor in ours.items():
            theirs[key].copy_(tensor)
        if hasattr(model, "classifier"):
            model.classifier.load_state_dict(mam.model.classifier.state_dict())
    return model.eval()


@pytest.mark.parametrize("make", [tiny_classifier, tiny_llama])
def test_mam_is_prefix_tuning_plus_a_parallel_adapter(make):
    mam = peftlab.attach(make(), "mam", num_virtual_tokens=P, projection=False, bottleneck=4, scale=2.5)
    randomise(mam.model)  # nonzero adapters: W_up starts at zero
    ids, mask = tokens()
    got = mam.model.eval()(ids, attention_mask=mask).logits
    expected = reference(make, mam)(ids, attention_mask=mask).logits
    keep = mask.bool() if got.dim() == 3 else slice(None)
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)
    kinds = {type(layer).__name__ for layer in mam.layers().values()}
    assert kinds == {"PrefixAttention", "ParallelAdapter"}


def test_the_saved_adapter_folds_the_prefix_mlp_and_keeps_the_parallel_adapters(tmp_path):
    mam = peftlab.attach(tiny_llama(), "mam", num_virtual_tokens=P, encoder_hidden=8, bottleneck=4)
    randomise(mam.model)
    ids, mask = tokens()
    expected = mam.model.eval()(ids, attention_mask=mask).logits
    mam.save(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    blocks = [f"model.layers.{i}" for i in range(2)]
    assert sorted(saved) == sorted(
        [f"{b}.self_attn.prefix_{kv}" for b in blocks for kv in ("keys", "values")]
        + [f"{b}.mlp.adapter.{t}" for b in blocks for t in ("down_weight", "down_bias", "up_weight", "up_bias")]
    )
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["config"]["projection"] is False and meta["trained_as"]["projection"] is True
    loaded = peftlab.load_adapter(tiny_llama(), tmp_path / "adapter")
    keep = mask.bool()
    got = loaded.model.eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)
    assert mam.fold()
    assert peftlab.parameter_counts(mam) == peftlab.parameter_counts(loaded)
    # 2 layers x (keys + values: 2 kv heads x P x 8) + 2 adapters x (4 x 32 + 4 + 32 x 4 + 32)
    assert peftlab.parameter_counts(loaded)["adapter"] == 2 * 2 * 2 * P * 8 + 2 * (4 * 32 + 4 + 32 * 4 + 32)


def test_defaults_are_the_papers():
    mam = peftlab.attach(tiny_classifier(), "mam")
    assert mam.config.num_virtual_tokens == 30 and mam.config.scale == 4.0
    adapters = [layer for layer in mam.layers().values() if type(layer).__name__ == "ParallelAdapter"]
    assert [layer.adapter.size for layer in adapters] == [16, 16]  # d / 2 of the 32-wide tiny BERT
    assert all(layer.scale == 4.0 for layer in adapters)
    assert peftlab.get_method("mam").identity_at_init is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens: expected a positive integer"),
        ({"bottleneck": 4, "reduction_factor": 2.0}, "bottleneck: expected bottleneck or reduction_factor, not both"),
        ({"scale": 0.0}, "scale: expected a finite non-zero number"),
        ({"bottleneck": 64}, "bottleneck: gives an adapter of 64 units for layer"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_field(options, message):
    with pytest.raises(peftlab.InputError, match=message):
        peftlab.attach(tiny_classifier(), "mam", **options)


def test_cli_trains_and_lists_the_flags(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, out, _ = cli("methods", "mam")
    assert code == 0 and "arXiv:2110.04366" in out
    for flag in ("--num-virtual-tokens", "--encoder-hidden", "--bottleneck", "--reduction-factor", "--scale"):
        assert flag in out
    code, _, err = cli(
        "train", "--method", "mam", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run",
        "--max-steps", "3", "--batch-size", "8", "--max-length", "32", "--num-virtual-tokens", "4",
        "--bottleneck", "8", "--encoder-hidden", "16",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["lr"] == get_method("mam").lr == 6e-4


def test_sft_on_a_tiny_llama(tiny_llama_dir, tmp_path, cli):
    rows = [{"instruction": "classify the sentiment", "input": f"the movie {w}", "output": label}
            for w, label in [("great", "positive"), ("awful", "negative")] * 20]  # fmt: skip
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code, _, err = cli("train", "--task", "sft", "--model", tiny_llama_dir, "--data", data, "--out", run,
                       "--method", "mam", "--bottleneck", "8", "--num-virtual-tokens", "4", "--encoder-hidden", "16",
                       "--epochs", "3", "--batch-size", "8", "--max-length", "32", "--eval-generate", "0")  # fmt: skip
    assert code == 0, err
    history = json.loads((run / "results.json").read_text())["history"]
    assert history[-1]["validation"]["loss"] < history[0]["validation"]["loss"]
