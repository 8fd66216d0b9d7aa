"""One mechanism for methods that act inside attention: extra key/value positions through transformers' attention
interface.

transformers routes the attention of most architectures (BERT, RoBERTa, Llama, Qwen2, Mistral, Gemma, ...)
through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, calling it with the attention module and the
projected ``query, key, value`` of shape (B, heads, T, head_dim), keys already rotated where the model uses RoPE.
peftlab registers one implementation, ``"peftlab"``, which

1. looks up the attention module in its table of *key/value extensions* (``extend_keys_values``): a callable that
   returns extra keys and values of shape (B, kv_heads, P, head_dim), and optionally a third tensor, log-weights
   broadcastable to (B, heads, T, P) that are added to the extra positions' attention logits (so their unnormalised
   attention weights are multiplied by exp(log-weight): UniPELT's prefix gate);
2. prepends them to the keys and values, and widens the attention mask so every query may attend to the P extra
   positions (padding and causality among the real tokens are kept; with a KV cache the real keys grow, the extra
   positions are prepended again at every step);
3. computes attention with PyTorch's scaled dot-product attention (transformers' ``sdpa`` implementation).

Prefix tuning, P-tuning v2 and the prefix parts of MAM and UniPELT all use this: nothing in the model's source
changes, and the same code serves BERT-family encoders and Llama/Qwen decoders. A model must route its attention
through the interface (MPNet, for example, computes attention in its own code) -- ``attention_modules`` finds the
modules that do with one probe forward pass, and says clearly when there are none.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

NAME = "peftlab"
# attention module -> callable(batch size, dtype, device) -> (extra keys, extra values), each (B, kv_heads, P, D),
# optionally followed by log-weights for the extra positions, broadcastable to (B, heads, T, P)
_EXTENSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ORIGINAL = "_peftlab_original_attn_implementation"
_registered = False

Extension = Callable[[int, torch.dtype, torch.device], tuple[torch.Tensor, ...]]


@dataclass
class AttentionModule:
    name: str
    module: nn.Module
    kv_heads: int
    head_dim: int


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same mask format sdpa gets (bool or None)
    _registered = True


def _widen_mask(mask: torch.Tensor | None, extra: int, query: torch.Tensor, key: torch.Tensor, causal: bool):
    """The attention mask with ``extra`` always-visible positions in front of the keys."""
    q_len, k_len = query.shape[2], key.shape[2]
    if mask is None:
        if not causal or q_len == 1:
            return None  # every query sees every key already
        # Real keys stay causal, aligned to the end (with a cache the queries are the last q_len positions).
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=query.device)[None, :] <= rows).view(1, 1, q_len, k_len)
    front_shape = (*mask.shape[:-1], extra)
    if mask.dtype == torch.bool:
        front = torch.ones(front_shape, dtype=torch.bool, device=mask.device)
    else:  # additive float mask: 0 where attending is allowed
        front = torch.zeros(front_shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=-1)


def _weigh_front(mask: torch.Tensor | None, log_weights: torch.Tensor, extra: int, query: torch.Tensor, total: int):
    """The (widened) mask as an additive float mask with ``log_weights`` added to its first ``extra`` columns."""
    if mask is None:
        mask = torch.zeros((1, 1, query.shape[2], total), dtype=query.dtype, device=query.device)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    front = mask[..., :extra] + log_weights.to(mask.dtype)  # (B, heads | 1, T, P)
    rest = mask[..., extra:].expand(*front.shape[:-1], -1)  # (B, heads | 1, T, K)
    return torch.cat([front, rest], dim=-1)


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    extension = _EXTENSIONS.get(module)
    if extension is not None:
        extra_k, extra_v, *log_weights = extension(query.shape[0], key.dtype, key.device)  # (B, kv_heads, P, D)
        causal = kwargs.pop("is_causal", None)
        causal = getattr(module, "is_causal", False) if causal is None else causal
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[2]:
            attention_mask = attention_mask[..., : key.shape[2]]
        attention_mask = _widen_mask(attention_mask, extra_k.shape[2], query, key, causal)
        if log_weights:
            total = extra_k.shape[2] + key.shape[2]
            attention_mask = _weigh_front(attention_mask, log_weights[0], extra_k.shape[2], query, total)
        key = torch.cat([extra_k.to(key.dtype), key], dim=2)
        value = torch.cat([extra_v.to(value.dtype), value], dim=2)
        kwargs["is_causal"] = False  # causality is in the mask now
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_modules(model: nn.Module, config=None) -> list[AttentionModule]:
    """The modules that compute attention through transformers' interface, in call order, with their key shapes.

    Found by one probe forward pass on two tokens with a recording attention function; raises InputError when the
    model computes attention in its own code.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = config if config is not None else model.config
    seen: list[tuple[nn.Module, int, int]] = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        if all(m is not module for m, _, _ in seen):
            seen.append((module, key.shape[1], key.shape[3]))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("peftlab_probe", probe)
    ALL_MASK_ATTENTION_FUNCTIONS.register("peftlab_probe", sdpa_mask)
    previous = config._attn_implementation
    config._attn_implementation = "peftlab_probe"
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            model(input_ids=torch.ones((1, 2), dtype=torch.long, device=device))
    finally:
        config._attn_implementation = previous
        model.train(was_training)
    if not seen:
        raise InputError(
            f"model type {getattr(config, 'model_type', '?')!r} computes attention in its own code, not through "
            "transformers' attention interface; methods that act inside attention cannot reach it"
        )
    names = {id(m): n for n, m in model.named_modules()}
    return [AttentionModule(names[id(m)], m, heads, dim) for m, heads, dim in seen]


def extend_keys_values(model: nn.Module, config, module: nn.Module, extension: Extension) -> None:
    """Give ``module`` extra key/value positions from ``extension`` and route the model's attention through
    peftlab's implementation (remembering the previous one for ``restore``)."""
    _register()
    if config._attn_implementation != NAME:
        setattr(model, _ORIGINAL, config._attn_implementation)
        config._attn_implementation = NAME
    _EXTENSIONS[module] = extension


def remove_extension(module: nn.Module) -> None:
    _EXTENSIONS.pop(module, None)


def restore(model: nn.Module, config) -> None:
    """Put the model's own attention implementation back (after every extension was removed)."""
    original = getattr(model, _ORIGINAL, None)
    if original is not None:
        config._attn_implementation = original
        delattr(model, _ORIGINAL)
