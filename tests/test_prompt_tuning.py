"""Prompt tuning: the prompt equals literally prepended tokens, the initialisations, parity with Hugging Face PEFT."""

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model

import peftlab
from peftlab.errors import InputError
from peftlab.models import load_causal_lm, load_classifier, load_tokenizer
from tests.conftest import tiny_classifier
from tests.test_attention import tiny_llama

M = 4


def tokens(seed=0, batch=2, length=6, padded=True):
    ids = torch.randint(5, 30, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[1, length - 2 :] = 0  # right padding
    return ids, mask


def randomise(model):
    """Trained-looking values in every trainable tensor (prompt, encoder, task head)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


def test_a_prompt_from_text_equals_the_text_put_in_front_of_the_input(tiny_model_dir):
    model = load_classifier(tiny_model_dir, ["neg", "pos"]).eval()
    tok = load_tokenizer(tiny_model_dir)
    text = "the film was"
    prompt_ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])  # 3 tokens, repeated to 4
    ids, mask = tokens()
    literal = torch.cat([prompt_ids.repeat(2)[:M].expand(2, -1), ids], 1)
    literal_mask = torch.cat([torch.ones(2, M, dtype=torch.long), mask], 1)
    expected = model(literal, attention_mask=literal_mask).logits
    peftlab.attach(model, "prompt_tuning", num_virtual_tokens=M, init="text", init_text=text)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)


def test_decoder_outputs_line_up_with_the_callers_tokens(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir).eval()
    tok = load_tokenizer(tiny_llama_dir)
    prompt_ids = torch.tensor(tok("classify the sentiment", add_special_tokens=False)["input_ids"])[:3]
    ids, _ = tokens(padded=False)
    literal = torch.cat([prompt_ids.expand(2, -1), ids], 1)
    expected = model(literal).logits[:, 3:]  # (B, T, V)
    expected_loss = model(literal, labels=torch.cat([torch.full((2, 3), -100), ids], 1)).loss
    peftlab.attach(model, "prompt_tuning", num_virtual_tokens=3, init="text", init_text="classify the sentiment")
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(ids, labels=ids).loss, expected_loss, rtol=0, atol=1e-6)  # no loss on the prompt


def test_initialisations(tiny_model_dir):
    model = load_classifier(tiny_model_dir, ["boring", "great"])
    table = model.get_input_embeddings().weight.detach().clone()
    adapter = peftlab.attach(model, "prompt_tuning", num_virtual_tokens=5, init="labels")
    prompt = adapter.state()["bert.embeddings.word_embeddings.prompt"].detach()
    tok = load_tokenizer(tiny_model_dir)
    for row, label in enumerate(["boring", "great"]):  # one slot per class, then sampled vocabulary
        torch.testing.assert_close(prompt[row], table[tok.convert_tokens_to_ids(label)])
    assert all(any(torch.equal(r, t) for t in table) for r in prompt[2:])

    vocab = peftlab.attach(load_classifier(tiny_model_dir, ["a", "b"]), "prompt_tuning", num_virtual_tokens=8)
    rows = vocab.state()["bert.embeddings.word_embeddings.prompt"].detach()
    picked = [next(i for i, t in enumerate(table) if torch.equal(r, t)) for r in rows]
    assert len(set(picked)) == 8  # distinct tokens while the vocabulary allows

    torch.manual_seed(0)
    random = peftlab.attach(tiny_classifier(), "prompt_tuning", num_virtual_tokens=400, init="random")
    std = tiny_classifier().get_input_embeddings().weight.detach().std()
    prompt = random.state()["bert.embeddings.word_embeddings.prompt"].detach()
    assert float(prompt.std()) == pytest.approx(float(std), rel=0.05)


def test_initialisation_errors_name_the_field():
    with pytest.raises(InputError, match="init: 'labels' needs a classifier whose config names its classes"):
        peftlab.attach(tiny_classifier(), "prompt_tuning", init="labels")
    with pytest.raises(InputError, match="init: init 'text' needs the model's tokenizer"):
        peftlab.attach(tiny_classifier(), "prompt_tuning", init="text", init_text="hello")
    with pytest.raises(InputError, match="init_text: expected a text when init is 'text'"):
        peftlab.attach(tiny_classifier(), "prompt_tuning", init="text")
    with pytest.raises(InputError, match="init_text: expected no text unless init is 'text'"):
        peftlab.attach(tiny_classifier(), "prompt_tuning", init_text="hello")
    with pytest.raises(InputError, match="num_virtual_tokens: expected a positive integer, got 0"):
        peftlab.attach(tiny_classifier(), "prompt_tuning", num_virtual_tokens=0)


def test_unload_gives_the_plain_model_back():
    model = tiny_classifier()
    ids, mask = tokens()
    expected = model(ids, attention_mask=mask).logits
    adapter = peftlab.attach(model, "prompt_tuning", num_virtual_tokens=M, init="random")
    assert not torch.allclose(model(ids, attention_mask=mask).logits, expected)
    plain = adapter.unload()
    torch.testing.assert_close(plain(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("make", "task_type"), [(tiny_classifier, "SEQ_CLS"), (tiny_llama, "CAUSAL_LM")])
def test_peft_prompt_tuning_loads_here_and_back_with_the_same_outputs(tmp_path, make, task_type):
    theirs = get_peft_model(make(), PromptTuningConfig(task_type=task_type, num_virtual_tokens=M))
    randomise(theirs)
    theirs.eval()
    ids, mask = tokens()
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    expected = expected[:, M:] if expected.dim() == 3 else expected  # PEFT's LM logits include the prompt
    keep = mask.bool() if expected.dim() == 3 else slice(None)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftlab.import_hf(make(), tmp_path / "theirs")
    assert ours.method.name == "prompt_tuning"
    got = ours.model.eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)
    peftlab.export_hf(ours, tmp_path / "ours", task_type=task_type)
    back = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    again = back(input_ids=ids, attention_mask=mask).logits
    again = again[:, M:] if again.dim() == 3 else again
    torch.testing.assert_close(again[keep], expected[keep], rtol=0, atol=1e-6)
