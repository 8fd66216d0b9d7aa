"""The language-modelling task: next-token cross-entropy on the target tokens (assistant replies, or every token
of raw text), and its evaluation as mean loss per target token and perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.lm import IGNORE, LMEncoded
from .distributed import SINGLE, Distributed


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over the batch's target tokens, number of target tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    shifted = logits[:, :-1].float()  # position t predicts token t + 1
    targets = batch["labels"][:, 1:]
    total = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, int((targets != IGNORE).sum())


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
        for start in range(0, len(order), batch_size):
            batch = data.batch(order[start : start + batch_size], device)
            with autocast():
                loss_sum, n = token_losses(model, batch)
            total += float(loss_sum)
            count += n
        model.train(was_training)
        parts = dist.gather((total, count))  # every process's share, on every process
        total, count = sum(t for t, _ in parts), sum(c for _, c in parts)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(data)}
