"""The language-modelling task: next-token cross-entropy on the target tokens (assistant replies, or every token
of raw text), and its evaluation as mean loss per target token and perplexity.

The full-vocabulary logits are never held for every position: the model runs with its output layer set aside (it
returns its final hidden states where it would return logits), the positions that predict a target are picked out,
and the output layer and the cross-entropy run over them ``LOSS_CHUNK`` positions at a time. In training each chunk
runs under activation checkpointing, so its logits are recomputed in the backward pass instead of kept: at most one
chunk's logits exist at once, in training and in evaluation. (Qwen2.5's 151,665-token vocabulary over 8 x 1024
positions would otherwise take 5 GB of fp32 logits, most of them for prompt tokens that have no target.) Models whose
logits are more than the output layer's product (Gemma's soft-capping, Cohere's and Granite's logit scaling) take
the plain path with full logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import progress
from ..data.lm import IGNORE, LMEncoded, model_inputs
from .distributed import SINGLE, Distributed

LOSS_CHUNK = 1024  # target positions whose full-vocabulary logits are computed at once
# Config fields of models whose logits are more than the output layer's product (applied after it in forward).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_model(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # under torch.compile, the module it wraps


def output_layer_separable(model: nn.Module) -> bool:
    """Whether the logits are exactly the output layer applied to the final hidden states."""
    plain = plain_model(model)
    config = getattr(plain, "config", None)
    if config is None or not hasattr(plain, "get_output_embeddings") or not hasattr(plain, "set_output_embeddings"):
        return False
    if plain.get_output_embeddings() is None:
        return False
    return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


@contextmanager
def output_layer_set_aside(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` returns its final hidden states as ``logits``; yields the output layer to apply to them."""
    plain = plain_model(model)
    head = plain.get_output_embeddings()
    plain.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        plain.set_output_embeddings(head)


def _chunk_loss(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="sum")  # (n, V) logits, summed over n


def token_losses(model, batch: dict[str, torch.Tensor], chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over the batch's target tokens, number of target tokens)."""
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    count = int((targets != IGNORE).sum()) if not targets.is_meta else targets.numel()  # meta: shapes only
    if not output_layer_separable(model):
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        shifted = logits[:, :-1].float()
        total = F.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return total, count
    with output_layer_set_aside(model) as head:
        hidden = model(**model_inputs(batch)).logits  # (B, T, H)
        keep = targets != IGNORE
        if keep.is_meta:  # shapes only (memory estimates): every position a target
            states, wanted = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        else:
            states, wanted = hidden[:, :-1][keep], targets[keep]  # (N, H), (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(wanted), chunk):
            part = (head, states[start : start + chunk], wanted[start : start + chunk])
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, *part, use_reentrant=False)
            else:
                total = total + _chunk_loss(*part)
    return total, count


class LanguageModelTask:
    """Mean next-token loss over the batch's target tokens; validation reports loss and perplexity."""

    metric = "loss"  # lower is better

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total, count = token_losses(model, batch)
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, model, data: LMEncoded, batch_size: int, device, autocast, dist: Distributed = SINGLE) -> dict:
        was_training = model.training
        model.eval()
        order = sorted(dist.shard(list(range(len(data)))), key=lambda i: len(data.input_ids[i]))
        total, count = 0.0, 0
        with progress.track(len(order)) as advance:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = data.batch(idx, device)
                with autocast():
                    loss_sum, n = token_losses(model, batch)
                total += float(loss_sum)
                count += n
                advance(len(idx))
        model.train(was_training)
        parts = dist.gather((total, count))  # every process's share, on every process
        total, count = sum(t for t, _ in parts), sum(c for _, c in parts)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(data)}
