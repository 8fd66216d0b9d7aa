"""Prefix tuning: prefixes equal a prefilled KV cache, decoding step by step from a KV cache, the MLP
reparameterisation's equation, the MLP folded away when saving, and parity with Hugging Face PEFT's prefix tuning
(with and without its projection), both ways."""

import inspect
import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import DynamicCache

import peftlab
from peftlab.errors import InputError
from tests.conftest import skip_if_peft_prefix_tuning_fails_on_bert, tiny_classifier
from tests.test_attention import tiny_llama
from tests.test_prompt_tuning import randomise, tokens

P = 3


def prefix_layers(adapter):
    return list(adapter.layers().values())


def kv_cache_reference(model, adapter, ids, mask, position_ids=None):
    """The plain model's outputs with every layer's prefixes given as a prefilled KV cache (PEFT's way)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for index, layer in enumerate(prefix_layers(adapter)):
            keys, values = layer.prefixes()  # (kv_heads, P, head_dim)
            cache.update(keys.expand(len(ids), -1, -1, -1).clone(), values.expand(len(ids), -1, -1, -1).clone(), index)
        full_mask = torch.cat([torch.ones(len(ids), P, dtype=torch.long), mask], 1)
        return model(ids, attention_mask=full_mask, past_key_values=cache, position_ids=position_ids).logits


@pytest.mark.parametrize("make", [tiny_classifier, tiny_llama])
@pytest.mark.parametrize("projection", [False, True])
def test_prefixes_equal_a_prefilled_kv_cache(make, projection):
    ids, mask = tokens()
    adapter = peftlab.attach(make(), "prefix_tuning", num_virtual_tokens=P, projection=projection, encoder_hidden=8)
    randomise(adapter.model)
    got = adapter.model.eval()(ids, attention_mask=mask).logits
    plain = make()  # the cache moves positions on by P, as the default shift_positions does
    if hasattr(plain, "classifier"):
        plain.classifier.load_state_dict(adapter.model.classifier.state_dict())
    expected = kv_cache_reference(plain, adapter, ids, mask)
    keep = mask.bool() if got.dim() == 3 else slice(None)
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-5)


def test_without_shift_the_real_tokens_keep_their_positions(tmp_path):
    ids, mask = tokens()
    adapter = peftlab.attach(tiny_llama(), "p_tuning_v2", num_virtual_tokens=P, shift_positions=False)
    got = adapter.model(ids, attention_mask=mask).logits
    expected = kv_cache_reference(tiny_llama(), adapter, ids, mask, position_ids=torch.arange(6).expand(2, 6))
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="shift_positions: PEFT's prefixes move the real tokens' positions on"):
        peftlab.export_hf(adapter, tmp_path / "hf")


def test_decoding_from_a_cache_without_position_ids_equals_one_full_pass():
    """The shifted positions count on from the cache's length, under whichever keyword the cache comes: the old
    ``past_key_values`` or ``cache`` (the name transformers 5.24 gave it, which ``generate`` passes from then on)."""
    adapter = peftlab.attach(tiny_llama(), "prefix_tuning", num_virtual_tokens=P, encoder_hidden=8)
    randomise(adapter.model)
    model = adapter.model.eval()
    ids = torch.randint(5, 30, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        keywords = {"past_key_values"} | ({"cache"} & set(inspect.signature(model.forward).parameters))
        for keyword in sorted(keywords):
            cache = DynamicCache(config=model.config)
            model(ids[:, :4], use_cache=True, **{keyword: cache})
            steps = [model(ids[:, t : t + 1], use_cache=True, **{keyword: cache}).logits for t in (4, 5)]
            torch.testing.assert_close(torch.cat(steps, 1), full[:, 4:], rtol=0, atol=1e-5, msg=keyword)


def test_the_mlp_computes_every_layers_prefixes_at_once():
    adapter = peftlab.attach(tiny_llama(), "prefix_tuning", num_virtual_tokens=P, encoder_hidden=8)
    layers = prefix_layers(adapter)
    mlp = layers[0].mlp
    flat = torch.tanh(mlp.inputs @ mlp.hidden.weight.T + mlp.hidden.bias) @ mlp.out.weight.T + mlp.out.bias
    per_layer = flat.view(P, len(layers), 2, 2, 8)  # (P, layers, keys|values, kv_heads, head_dim): PEFT's layout
    for index, layer in enumerate(layers):
        keys, values = layer.prefixes()  # (kv_heads, P, head_dim)
        torch.testing.assert_close(keys, per_layer[:, index, 0].transpose(0, 1))
        torch.testing.assert_close(values, per_layer[:, index, 1].transpose(0, 1))
    assert all(layer.mlp is None for layer in layers[1:])  # one MLP, owned (and saved) by the first layer


def test_the_saved_adapter_holds_only_the_prefixes(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "prefix_tuning", num_virtual_tokens=P, encoder_hidden=8)
    randomise(adapter.model)
    ids, mask = tokens()
    expected = adapter.model.eval()(ids, attention_mask=mask).logits
    trained = peftlab.parameter_counts(adapter)
    adapter.save(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    layers = [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    assert sorted(saved) == sorted(
        [f"{n}.prefix_{kv}" for n in layers for kv in ("keys", "values")] + ["classifier.bias", "classifier.weight"]
    )
    assert {tuple(saved[f"{n}.prefix_keys"].shape) for n in layers} == {(4, P, 8)}  # (heads, P, head_dim)
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["config"]["projection"] is False and meta["trained_as"]["projection"] is True
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "adapter")
    assert not any(layer.shared for layer in prefix_layers(loaded))  # no MLP after loading
    torch.testing.assert_close(loaded.model.eval()(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
    counts = peftlab.parameter_counts(loaded)
    assert counts["adapter"] == 2 * 2 * P * 32 < trained["adapter"]
    assert adapter.fold()
    assert peftlab.parameter_counts(adapter) == counts
    torch.testing.assert_close(adapter.model(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("make", "task_type"), [(tiny_classifier, "SEQ_CLS"), (tiny_llama, "CAUSAL_LM")])
def test_the_mlp_trains_as_peft_prefix_encoder_does(make, task_type):
    config = PrefixTuningConfig(
        task_type=task_type, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=8
    )
    theirs = get_peft_model(make(), config)
    randomise(theirs)
    theirs.eval()
    ids, mask = tokens()
    with skip_if_peft_prefix_tuning_fails_on_bert():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
    ours = peftlab.attach(make(), "prefix_tuning", num_virtual_tokens=P, encoder_hidden=8)
    mlp, encoder = prefix_layers(ours)[0].mlp, theirs.prompt_encoder["default"]
    with torch.no_grad():
        mlp.inputs.copy_(encoder.embedding.weight)
        mlp.hidden.load_state_dict(encoder.transform[0].state_dict())
        mlp.out.load_state_dict(encoder.transform[2].state_dict())
        if task_type == "SEQ_CLS":
            ours.model.classifier.load_state_dict(theirs.base_model.classifier.modules_to_save["default"].state_dict())
    got = ours.model.eval()(ids, attention_mask=mask).logits
    keep = mask.bool() if got.dim() == 3 else slice(None)
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("make", "task_type"), [(tiny_classifier, "SEQ_CLS"), (tiny_llama, "CAUSAL_LM")])
@pytest.mark.parametrize("projection", [False, True])
def test_peft_prefixes_load_here_and_back_with_the_same_outputs(tmp_path, make, task_type, projection):
    config = PrefixTuningConfig(
        task_type=task_type, num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8
    )
    theirs = get_peft_model(make(), config)
    randomise(theirs)
    theirs.eval()
    ids, mask = tokens()
    with skip_if_peft_prefix_tuning_fails_on_bert():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool() if expected.dim() == 3 else slice(None)
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT saves the MLP's output too
    ours = peftlab.import_hf(make(), tmp_path / "theirs")
    assert ours.method.name == "prefix_tuning" and not ours.config.projection
    got = ours.model.eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)
    peftlab.export_hf(ours, tmp_path / "ours", task_type=task_type)
    back = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits[keep], expected[keep], rtol=0, atol=1e-6)


def test_unload_restores_the_models_attention():
    model = tiny_classifier()
    ids, mask = tokens()
    expected = model(ids, attention_mask=mask).logits
    original = model.config._attn_implementation
    adapter = peftlab.attach(model, "prefix_tuning", num_virtual_tokens=P, encoder_hidden=8)
    assert model.config._attn_implementation == "peftlab"
    plain = adapter.unload()
    assert plain.config._attn_implementation == original
    torch.testing.assert_close(plain(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


def test_a_position_table_too_short_for_the_shift_is_named():
    adapter = peftlab.attach(tiny_classifier(), "p_tuning_v2", num_virtual_tokens=40)  # 64 learned positions
    ids = torch.randint(5, 30, (1, 30))
    with pytest.raises(InputError, match="num_virtual_tokens: 30 tokens after a prefix of 40 need 70 positions"):
        adapter.model(ids)
