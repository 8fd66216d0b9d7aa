"""The attention mechanism for methods that act inside attention (prefix tuning and kin), on BERT and Llama."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from peftlab.core.attention import attention_modules, extend_keys_values, remove_extension, restore
from peftlab.errors import InputError
from tests.conftest import tiny_classifier

P = 3


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def prefixes(modules, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, m.kv_heads, P, m.head_dim, generator=g),
            torch.randn(batch, m.kv_heads, P, m.head_dim, generator=g),
        )
        for m in modules
    ]


def install(model, modules, pairs):
    for m, (k, v) in zip(modules, pairs, strict=True):
        extend_keys_values(model, model.config, m.module, lambda b, dtype, device, k=k, v=v: (k[:b], v[:b]))


def test_attention_modules_are_found_with_their_key_shapes():
    model = tiny_classifier()
    bert = attention_modules(model)
    assert [m.name for m in bert] == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    assert {(m.kv_heads, m.head_dim) for m in bert} == {(4, 8)}
    llama = tiny_llama()
    found = attention_modules(llama)
    assert [m.name for m in found] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert {(m.kv_heads, m.head_dim) for m in found} == {(2, 8)}


def test_a_model_without_the_interface_is_refused():
    from transformers import MPNetConfig, MPNetModel

    model = MPNetModel(
        MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(InputError, match="computes attention in its own code"):
        attention_modules(model)


def test_empty_extensions_leave_outputs_unchanged_and_restore_undoes_the_switch():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    expected = model(ids, attention_mask=mask).logits
    original = model.config._attn_implementation
    for m in attention_modules(model):
        empty = torch.zeros(2, m.kv_heads, 0, m.head_dim)
        extend_keys_values(model, model.config, m.module, lambda b, dtype, device, e=empty: (e[:b], e[:b]))
    assert model.config._attn_implementation == "peftlab"
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5)
    for m in attention_modules(model):
        remove_extension(m.module)
    restore(model, model.config)
    assert model.config._attn_implementation == original


@pytest.mark.parametrize("padded", [False, True])
def test_llama_prefixes_equal_a_prefilled_kv_cache(padded):
    model = tiny_llama()
    modules = attention_modules(model)
    pairs = prefixes(modules, batch=2)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(pairs):
        cache.update(k.clone(), v.clone(), layer)
    reference = model(
        ids,
        attention_mask=torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1),
        past_key_values=cache,
        position_ids=positions,
    ).logits
    install(model, modules, pairs)
    ours = model(ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], reference[keep], rtol=0, atol=1e-5)


def test_bert_prefixes_equal_a_prefilled_kv_cache_and_gradients_reach_them():
    model = tiny_classifier()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # right padding
    modules = attention_modules(model)
    pairs = [(k.requires_grad_(), v.requires_grad_()) for k, v in prefixes(modules, batch=2)]
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(pairs):
        cache.update(k.detach().clone(), v.detach().clone(), layer)
    reference = model(
        ids,
        attention_mask=torch.cat([torch.ones(2, P, dtype=torch.long), mask], 1),
        past_key_values=cache,
        position_ids=torch.arange(5).expand(2, 5),
    ).logits
    install(model, modules, pairs)
    ours = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    ours.sum().backward()
    assert all(k.grad is not None and v.grad is not None for k, v in pairs)


def test_generation_with_a_kv_cache_sees_the_prefix_at_every_step():
    model = tiny_llama()
    modules = attention_modules(model)
    install(model, modules, prefixes(modules, batch=1))
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(4))
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
