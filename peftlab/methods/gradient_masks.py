"""Training hooks shared by the selective methods that mask the gradients of the pretrained weights.

- ``BernoulliGradientMask`` (Child-Tuning_F): after every backward pass, each gradient entry of a pretrained
  parameter is multiplied by a fresh Bernoulli(p_F) draw and divided by p_F.
- ``FisherMask`` (Child-Tuning_D, FishMask): once, before the first step, the diagonal empirical Fisher information
  of every pretrained parameter is measured, and the ``share`` of all entries with the highest Fisher (one global
  threshold over the whole model) becomes a static mask, ``attachment.masks``. The core then zeroes masked-out
  gradients, restores masked-out entries after every step, counts only masked-in entries as trainable and saves
  the parameters sparse. An adapter loaded to be trained further brings its mask along, and keeps it.

The task head is never masked: it is new and trains in full. Parameters are found through the attachment
(``peftlab.core.hooks.pretrained_parameters``), never by name.

The method files import this module inside their hook factories, not at the top: ``peftlab.train`` imports the
method registry, so a method module cannot import it while the registry is being built.
"""

from __future__ import annotations

import time

import torch

from ..core.attach import Attachment
from ..core.hooks import StepRandom, TrainContext, TrainingHooks, measured_fisher, pretrained_parameters


class BernoulliGradientMask(TrainingHooks):
    """``grad <- grad * Bernoulli(p) / p`` on every pretrained parameter, a fresh mask each optimiser step.

    The draws come from ``StepRandom`` (seeded by the step), so every data-parallel process masks alike and a
    resumed run draws the same masks.
    """

    def __init__(self, attachment: Attachment, p: float):
        self.p = p
        self.params = pretrained_parameters(attachment)
        self.random = StepRandom()

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        generator = None
        for param in self.params.values():
            if param.grad is not None:
                generator = generator or self.random.generator(step, param.grad.device)
                # 1 with probability p, else 0
                keep = torch.bernoulli(torch.full_like(param.grad, self.p), generator=generator)
                param.grad.mul_(keep).div_(self.p)


def top_share_masks(scores: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """Boolean masks, one per tensor, that select the ``share`` of all entries with the highest score.

    One global threshold over every tensor together (not a share per tensor), so some matrices keep many entries
    and others none. Exactly ``round(share * total)`` entries are chosen (at least one); ties at the threshold are
    broken by ``torch.topk``.
    """
    flat = torch.cat([s.reshape(-1) for s in scores.values()])  # (N,)
    keep = max(1, round(share * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return masks


class FisherMask(TrainingHooks):
    """Before training: the top ``share`` of the pretrained entries by empirical Fisher become the static mask."""

    def __init__(self, attachment: Attachment, share: float, examples: int):
        self.attachment = attachment
        self.share = share
        self.examples = examples
        self.seconds: float | None = None
        self.seen: int | None = None

    def prepare(self, ctx: TrainContext) -> None:
        if self.attachment.masks:  # loaded with the adapter (train --adapter): keep training the same entries
            return
        started = time.perf_counter()
        params = pretrained_parameters(self.attachment)
        fisher, self.seen = measured_fisher(ctx, params, self.examples)  # per-example gradients, squared, averaged
        self.attachment.masks.update(top_share_masks(fisher, self.share))
        self.seconds = time.perf_counter() - started

    def report(self, evaluate) -> dict:
        masks = self.attachment.masks
        selected = {k: int(m.sum()) for k, m in masks.items()}
        total = sum(m.numel() for m in masks.values())
        report = {
            "share": self.share,
            "fisher_examples": self.examples,
            "selected": sum(selected.values()),
            "of": total,
            "selected_by_parameter": {k: n for k, n in selected.items() if n},
        }
        if self.seconds is not None:  # not after a resume, which restores the masks instead of measuring them
            report["fisher_examples_used"] = self.seen
            report["fisher_seconds"] = self.seconds
        return {"mask": report}
