"""One mechanism for soft prompts: virtual tokens inserted into a model's input, for any Hugging Face model.

A forward pre-hook on the task model (``BertForSequenceClassification``, ``LlamaForCausalLM``, ...) turns
``input_ids`` into ``inputs_embeds`` and inserts ``m`` vectors from a provider at token position ``at`` (0: in
front of everything; 1: after the first token, e.g. BERT's [CLS]). Everything aligned with the tokens is widened to
match: ``attention_mask`` (the virtual tokens are always visible), ``token_type_ids`` (segment 0),
``position_ids`` and ``cache_position`` (the real tokens move m places on), and language-model ``labels`` (-100,
no loss on virtual tokens). With a KV cache (passed as ``cache`` or ``past_key_values``, see ``core.kv_cache``),
only the first forward pass inserts the vectors; later passes (generation) only shift positions and widen the mask,
since the cache holds the virtual tokens already.

With ``trim_outputs`` a forward hook also takes the m virtual positions back out of the token-level outputs
(``logits``, ``last_hidden_state``, ``hidden_states``, a span model's ``start_logits`` and ``end_logits``) of a
pass that inserted them, so a token classifier's, a span model's or a language model's outputs line up with the
caller's tokens again; sequence-level outputs (a classifier's logits,
the loss computed from widened labels) are left as they are.

Prompt tuning and P-tuning v1 use this; the model's source is not touched. A provider is called as
``provider(batch_size) -> (B, m, hidden)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .kv_cache import cache_length

Provider = Callable[[int], torch.Tensor]


def _insert(tensor: torch.Tensor, block: torch.Tensor, at: int) -> torch.Tensor:
    return torch.cat([tensor[:, :at], block, tensor[:, at:]], dim=1)


class Handles:
    """Several hook handles removed together."""

    def __init__(self, *handles: RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


TOKEN_OUTPUTS = ("logits", "last_hidden_state")
SPAN_OUTPUTS = ("start_logits", "end_logits")  # (B, T): a span (question answering) model's per-token scores


def insert_virtual_tokens(
    model: nn.Module, provider: Provider, count: int, at: int = 0, trim_outputs: bool = False
) -> RemovableHandle | Handles:
    """Insert ``count`` virtual tokens from ``provider`` at position ``at`` of every input; returns the hook
    handle(s) (``handle.remove()`` undoes it). ``trim_outputs`` removes the virtual positions from token-level
    outputs again."""
    positional = [p for p in inspect.signature(model.forward).parameters if p not in ("self", "kwargs")]
    embed = model.get_input_embeddings()
    inserted = {"width": 0, "at": at}  # widened length and insertion point of the pass in flight (width 0: none)

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        for name, value in zip(positional, args, strict=False):  # fold positional arguments into keywords
            kwargs[name] = value
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = embed(ids)  # (B, T, hidden)
        batch = embeds.shape[0]
        continuing = cache_length(kwargs) > 0  # the cache already holds the virtual tokens
        where = at if continuing else min(at, embeds.shape[1])  # an input shorter than ``at`` gets them at its end
        inserted["width"], inserted["at"] = 0, where
        if not continuing:
            virtual = provider(batch).to(embeds.dtype)  # (B, m, hidden)
            embeds = _insert(embeds, virtual, where)
            inserted["width"] = embeds.shape[1]
            if kwargs.get("token_type_ids") is not None:
                types = kwargs["token_type_ids"]
                kwargs["token_type_ids"] = _insert(types, types.new_zeros(batch, count), where)
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() == 2:  # token-level labels (language modelling, tagging)
                kwargs["labels"] = _insert(labels, labels.new_full((batch, count), -100), where)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = _insert(mask, mask.new_ones(batch, count), where)
        positions = kwargs.get("position_ids")
        if positions is not None:
            if continuing:
                kwargs["position_ids"] = positions + count
            else:
                front = torch.arange(count, device=positions.device).expand(positions.shape[0], count)
                before, after = positions[:, :where], positions[:, where:] + count
                kwargs["position_ids"] = torch.cat([before, front + where, after], 1)
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

    def trim(tensor: torch.Tensor, least: int = 3) -> torch.Tensor:
        if tensor.dim() < least or tensor.shape[1] != inserted["width"]:
            return tensor
        where = inserted["at"]
        return torch.cat([tensor[:, :where], tensor[:, where + count :]], dim=1)  # (B, T, ...)

    def trim_hook(module: nn.Module, args: tuple, kwargs: dict, output):
        if not inserted["width"] or not hasattr(output, "keys"):  # nothing inserted, or a plain tuple
            return output
        for key in TOKEN_OUTPUTS:
            if output.get(key) is not None:
                output[key] = trim(output[key])
        for key in SPAN_OUTPUTS:
            if output.get(key) is not None:
                output[key] = trim(output[key], least=2)
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(trim(h) for h in output["hidden_states"])
        inserted["width"] = 0
        return output

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    if not trim_outputs:
        return handle
    return Handles(handle, model.register_forward_hook(trim_hook, with_kwargs=True))
