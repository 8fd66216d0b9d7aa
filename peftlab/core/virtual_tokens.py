"""One mechanism for soft prompts: virtual tokens inserted into a model's input, for any Hugging Face model.

A forward pre-hook on the task model (``BertForSequenceClassification``, ``LlamaForCausalLM``, ...) turns
``input_ids`` into ``inputs_embeds`` and inserts ``m`` vectors from a provider at token position ``at`` (0: in
front of everything; 1: after the first token, e.g. BERT's [CLS]). Everything aligned with the tokens is widened to
match: ``attention_mask`` (the virtual tokens are always visible), ``token_type_ids`` (segment 0),
``position_ids`` and ``cache_position`` (the real tokens move m places on), and language-model ``labels`` (-100,
no loss on virtual tokens). With a KV cache, only the first forward pass inserts the vectors; later passes
(generation) only shift positions and widen the mask, since the cache holds the virtual tokens already.

Prompt tuning and P-tuning v1 use this; the model's source is not touched. A provider is called as
``provider(batch_size) -> (B, m, hidden)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Provider = Callable[[int], torch.Tensor]


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("past_key_values")
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def _insert(tensor: torch.Tensor, block: torch.Tensor, at: int) -> torch.Tensor:
    return torch.cat([tensor[:, :at], block, tensor[:, at:]], dim=1)


def insert_virtual_tokens(model: nn.Module, provider: Provider, count: int, at: int = 0) -> RemovableHandle:
    """Insert ``count`` virtual tokens from ``provider`` at position ``at`` of every input; returns the hook handle
    (``handle.remove()`` undoes it)."""
    positional = [p for p in inspect.signature(model.forward).parameters if p not in ("self", "kwargs")]
    embed = model.get_input_embeddings()

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        for name, value in zip(positional, args, strict=False):  # fold positional arguments into keywords
            kwargs[name] = value
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = embed(ids)  # (B, T, hidden)
        batch = embeds.shape[0]
        continuing = _cache_length(kwargs) > 0  # the cache already holds the virtual tokens
        if not continuing:
            virtual = provider(batch).to(embeds.dtype)  # (B, m, hidden)
            embeds = _insert(embeds, virtual, at)
            if kwargs.get("token_type_ids") is not None:
                types = kwargs["token_type_ids"]
                kwargs["token_type_ids"] = _insert(types, types.new_zeros(batch, count), at)
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() == 2:  # token-level labels (language modelling, tagging)
                kwargs["labels"] = _insert(labels, labels.new_full((batch, count), -100), at)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = _insert(mask, mask.new_ones(batch, count), at)
        positions = kwargs.get("position_ids")
        if positions is not None:
            if continuing:
                kwargs["position_ids"] = positions + count
            else:
                front = torch.arange(count, device=positions.device).expand(positions.shape[0], count)
                kwargs["position_ids"] = torch.cat([positions[:, :at], front + at, positions[:, at:] + count], 1)
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            if continuing:
                kwargs["cache_position"] = cache_position + count
            else:
                kwargs["cache_position"] = torch.arange(
                    cache_position[0], cache_position[-1] + 1 + count, device=cache_position.device
                )
        kwargs["inputs_embeds"] = embeds
        return (), kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)
