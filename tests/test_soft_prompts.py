"""The four soft-prompt methods on a decoder (tiny Llama): supervised fine-tuning through the command line, and
generation with a KV cache, one prompt at a time or left-padded in a batch."""

import json

import pytest
import torch

import peftlab
from peftlab.evaluate.generation import generate
from peftlab.models import load_causal_lm, load_tokenizer
from tests.test_prompt_tuning import randomise
from tests.test_sft import instruction_rows

METHODS = {
    "prompt_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3, "encoder": "mlp"},
    "prefix_tuning": {"num_virtual_tokens": 3, "encoder_hidden": 16},
    "p_tuning_v2": {"num_virtual_tokens": 3},
}


def flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(80)))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_sft_trains_evaluates_and_generates(method, tiny_llama_dir, sft_data, cli, tmp_path):
    out = tmp_path / method
    code, _, err = cli(
        "train", "--task", "sft", "--model", tiny_llama_dir, "--data", sft_data, "--out", out, "--method", method,
        *flags(METHODS[method]), "--epochs", "2", "--batch-size", "16", "--max-length", "48", "--eval-generate", "4",
        "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    test = results["metrics"]["test"]
    assert {"loss", "perplexity", "exact_match"} <= test.keys()
    assert results["history"][-1]["validation"]["loss"] < results["history"][0]["validation"]["loss"] + 1e-6
    code, printed, err = cli("eval", out, "--json")
    assert code == 0, err
    assert json.loads(printed)["test"]["loss"] == pytest.approx(test["loss"], rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_generation_with_a_kv_cache_and_left_padding(method, tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    model = load_causal_lm(tiny_llama_dir).eval()
    adapter = peftlab.attach(model, method, **METHODS[method])
    randomise(adapter.model)
    ids = torch.tensor([tok("classify the sentiment of the movie", add_special_tokens=False)["input_ids"]])
    cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    prompts = [[{"role": "user", "content": text}] for text in ("hello", "what is the answer to this review", "hi")]
    batched = generate(model, tok, prompts, max_new_tokens=4, batch_size=3)
    one_by_one = [generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == one_by_one
    assert any(reply.strip() for reply in batched)
