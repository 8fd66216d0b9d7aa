"""Proxy-tuning on tiny Llamas: the decoded logits are exactly base + alpha (expert - anti-expert) at every step
(checked against plain full forwards), batching with left padding changes nothing, and models that do not share a
vocabulary are refused in one line."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from peftlab.errors import InputError
from peftlab.evaluate.generation import generate
from peftlab.evaluate.proxy import check_shared_vocabulary, combine, proxy_generate

PROMPTS = [
    [{"role": "user", "content": "hello how are you"}],
    [{"role": "user", "content": "classify the sentiment the movie was great and funny"}],
]


@pytest.fixture(scope="module")
def variants(tiny_llama_dir, tmp_path_factory):
    """Two more tiny Llamas with the same tokenizer and other weights (another expert and anti-expert)."""
    folders = []
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"tiny-llama-{seed}")
        torch.manual_seed(seed)
        model = LlamaForCausalLM(base.config)
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0, 0.3)
        model.save_pretrained(folder)
        for f in tiny_llama_dir.iterdir():
            if "token" in f.name or f.suffix == ".jinja":
                shutil.copy(f, folder / f.name)
        folders.append(folder)
    return folders


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_combine_is_base_plus_alpha_times_expert_minus_anti():
    base, expert, anti = torch.randn(3, 2, 7).unbind(0)
    torch.testing.assert_close(combine(base, expert, anti, 5, 0.5), base[:, :5] + 0.5 * (expert[:, :5] - anti[:, :5]))


def test_every_step_is_the_proxy_of_full_forwards(tiny_llama_dir, variants):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base, expert, anti = load(tiny_llama_dir), load(variants[0]), load(variants[1])
    trace: list[torch.Tensor] = []
    replies = proxy_generate(base, expert, anti, tok, PROMPTS, max_new_tokens=5, batch_size=2, alpha=1.5, trace=trace)
    from peftlab.data.lm import render

    for row, prompt in enumerate(PROMPTS):  # reference: each model reads the unpadded text from scratch
        ids = render(tok, prompt, generation_prompt=True)
        start = len(ids)
        for logits in trace:
            with torch.no_grad():
                full = [m(torch.tensor([ids])).logits[0, -1] for m in (base, expert, anti)]
            want = full[0] + 1.5 * (full[1] - full[2])
            torch.testing.assert_close(logits[row], want, rtol=1e-4, atol=1e-4)
            token = int(want.argmax())
            if token == tok.eos_token_id:
                break
            ids = ids + [token]
        assert tok.decode(ids[start:], skip_special_tokens=True) == replies[row]
    one_by_one = [proxy_generate(base, expert, anti, tok, [p], max_new_tokens=5, alpha=1.5)[0] for p in PROMPTS]
    assert one_by_one == replies


def test_expert_equal_to_anti_expert_leaves_the_base(tiny_llama_dir, variants):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base, other = load(tiny_llama_dir), load(variants[0])
    assert proxy_generate(base, other, other, tok, PROMPTS, max_new_tokens=6) == generate(base, tok, PROMPTS, 6)


def test_vocabularies_must_match(tiny_llama_dir, tiny_model_dir, cli, tmp_path):
    llama, bert = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert check_shared_vocabulary({"a": llama, "b": llama}) == len(llama)
    with pytest.raises(InputError, match="a and b do not share a vocabulary"):
        check_shared_vocabulary({"a": llama, "b": bert})
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    code, _, err = cli("generate", "--model", tiny_llama_dir, "--proxy-base", tiny_model_dir, "--prompts", prompts)
    assert code == 2 and "do not share a vocabulary" in err and len(err.strip().splitlines()) == 1


def test_generate_and_chat_with_a_proxy_tuned_base(tiny_llama_dir, variants, cli, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello how are you\n")
    args = ["--prompts", prompts, "--max-new-tokens", "4", "--json"]
    code, plain, err = cli("generate", "--model", variants[0], *args)
    assert code == 0, err
    # base + (expert - anti) with base == anti-expert is the expert itself
    code, steered, err = cli("generate", "--model", variants[0], "--proxy-base", tiny_llama_dir, *args,
                             "--anti-expert", tiny_llama_dir)  # fmt: skip
    assert code == 0, err
    assert steered == plain
    lines = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = cli("chat", "--model", variants[0], "--proxy-base", variants[1], "--max-new-tokens", "3")
    assert code == 0, err
    assert "proxy-tuned" in out and out.count("bot>") == 1


@pytest.mark.real
def test_smollm2_and_qwen_do_not_share_a_vocabulary():
    from peftlab.assets import ASSETS, is_pulled
    from peftlab.models import load_tokenizer, resolve_model

    if not all(is_pulled(ASSETS[n]) for n in ("smollm2-135m", "qwen2.5-coder-0.5b")):
        pytest.skip("the decoder assets are not pulled here (qwen2.5-coder-0.5b is a 478 MB download)")
    toks = {n: load_tokenizer(resolve_model(n)) for n in ("smollm2-135m", "qwen2.5-coder-0.5b")}
    with pytest.raises(InputError, match=r"smollm2-135m and qwen2.5-coder-0.5b do not share a vocabulary \(49152 vs"):
        check_shared_vocabulary(toks)
