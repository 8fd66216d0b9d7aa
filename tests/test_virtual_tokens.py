"""Virtual tokens (soft prompts): inserting the embeddings of real tokens must equal inserting the tokens."""

import inspect

import pytest
import torch
from transformers import DynamicCache

from peftlab.core.virtual_tokens import insert_virtual_tokens
from tests.conftest import tiny_classifier
from tests.test_attention import tiny_llama

PROMPT = torch.tensor([5, 9, 17])


def provider_from(model, ids):
    table = model.get_input_embeddings()
    return lambda batch: table(ids).unsqueeze(0).expand(batch, -1, -1)


@pytest.mark.parametrize("at", [0, 1])
def test_bert_virtual_tokens_equal_real_tokens(at):
    model = tiny_classifier()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    types = torch.zeros(2, 6, dtype=torch.long)
    literal = torch.cat([ids[:, :at], PROMPT.expand(2, -1), ids[:, at:]], 1)
    literal_mask = torch.cat([mask[:, :at], torch.ones(2, 3, dtype=torch.long), mask[:, at:]], 1)
    expected = model(literal, attention_mask=literal_mask, token_type_ids=torch.zeros_like(literal)).logits
    handle = insert_virtual_tokens(model, provider_from(model, PROMPT), 3, at=at)
    torch.testing.assert_close(
        model(ids, attention_mask=mask, token_type_ids=types).logits, expected, rtol=0, atol=1e-6
    )
    handle.remove()
    assert model(ids, attention_mask=mask).logits.shape == (2, 2)


def test_llama_virtual_tokens_equal_real_tokens_with_labels_masked():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    literal = torch.cat([PROMPT.expand(2, -1), ids], 1)
    expected = model(literal).logits[:, 3:]
    labels_literal = torch.cat([torch.full((2, 3), -100), ids], 1)
    expected_loss = model(literal, labels=labels_literal).loss
    insert_virtual_tokens(model, provider_from(model, PROMPT), 3)
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.logits[:, 3:], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, expected_loss, rtol=0, atol=1e-6)


def test_llama_generation_with_virtual_tokens_equals_generation_after_the_real_tokens():
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    literal = torch.cat([PROMPT[None], ids], 1)
    expected = model.generate(literal, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 3:]
    insert_virtual_tokens(model, provider_from(model, PROMPT), 3)
    for use_cache in (True, False):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=use_cache)
        assert torch.equal(out, expected), use_cache


def test_llama_decoding_from_a_cache_equals_one_pass_over_the_real_tokens():
    """Step-by-step decoding inserts the virtual tokens once, under whichever keyword the cache comes: the old
    ``past_key_values`` or ``cache`` (the name transformers 5.24 gave it, which ``generate`` passes from then on)."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = model(torch.cat([PROMPT.expand(2, -1), ids], 1)).logits[:, 3:]
    insert_virtual_tokens(model, provider_from(model, PROMPT), 3, trim_outputs=True)
    keywords = {"past_key_values"} | ({"cache"} & set(inspect.signature(model.forward).parameters))
    for keyword in sorted(keywords):
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :4], use_cache=True, **{keyword: cache}).logits]
        steps += [model(ids[:, t : t + 1], use_cache=True, **{keyword: cache}).logits for t in (4, 5)]
        torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=0, atol=1e-5, msg=keyword)
