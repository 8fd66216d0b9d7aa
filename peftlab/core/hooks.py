"""Training hooks: how a method acts inside the shared training loop without the loop knowing the method.

A method that needs more than "train my parameters" returns a ``TrainingHooks`` from its ``hooks`` factory:

- ``prepare(ctx)``                       once before the first step (not on resume): e.g. compute a Fisher mask;
- ``before_step(step)``                  e.g. DyLoRA samples this step's rank;
- ``penalty()``                          an extra loss term (AdaLoRA's orthogonality, L2-SP, EWC);
- ``after_backward(step)``               e.g. Child-Tuning masks the gradients;
- ``after_step(step, optimizer, scheduler)`` e.g. AdaLoRA prunes ranks, ReLoRA merges and restarts;
- ``final_form(step)``                    whether the model after ``step`` optimiser steps has the form training
                                         ends in, so that an evaluation there may pick the run's best state (diff
                                         pruning's dense diff before its projection may not);
- ``state_dict()`` / ``load_state_dict()`` tensors a checkpoint must carry for an exact resume;
- ``report(evaluate)``                   numbers for ``results.json`` (under ``method_report``) once training
                                         ends, with the best state loaded; ``evaluate()`` gives validation metrics.

Static masks (``attachment.masks``) need no hooks: the loop itself zeroes masked-out gradients after the backward
pass and keeps masked-out entries at their pretrained values after every optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..core.attach import Attachment


@dataclass
class TrainContext:
    attachment: Attachment
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # the task loss of one batch, forward included
    batches: Callable[[int, int], Iterator[dict[str, torch.Tensor]]]  # (examples, batch size) -> training batches
    total_steps: int
    settings: Any  # TrainSettings
    device: torch.device


class StepRandom:
    """Random draws that depend only on a base seed and the optimiser step.

    Hooks that draw something each step (Child-Tuning's gradient masks, DyLoRA's rank, AdapterDrop's n) take it from
    ``generator(step)`` rather than from the global RNG: in a data-parallel run every process then draws the same
    (the global RNG is consumed differently by processes whose batches differ in length), and a resumed run draws
    what the uninterrupted one did. The base seed is drawn once from the global RNG when the hooks are built, which
    every process (and a resume) does at the same point after seeding alike.
    """

    def __init__(self):
        self.seed = int(torch.randint(0, 2**62, ()).item())

    def generator(self, step: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + 1_000_003 * step)


class TrainingHooks:
    """No-op hooks; methods override what they need."""

    def prepare(self, ctx: TrainContext) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        pass

    def final_form(self, step: int) -> bool:
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def report(self, evaluate: Callable[[], dict]) -> dict:
        return {}


class HookList(TrainingHooks):
    """Several hooks run in order (a method's own, then the regularisers)."""

    def __init__(self, hooks: list[TrainingHooks]):
        self.hooks = hooks

    def prepare(self, ctx):
        for h in self.hooks:
            h.prepare(ctx)

    def before_step(self, step):
        for h in self.hooks:
            h.before_step(step)

    def penalty(self):
        terms = [t for t in (h.penalty() for h in self.hooks) if t is not None]
        return sum(terms) if terms else None

    def after_backward(self, step):
        for h in self.hooks:
            h.after_backward(step)

    def after_step(self, step, optimizer, scheduler):
        for h in self.hooks:
            h.after_step(step, optimizer, scheduler)

    def final_form(self, step):
        return all(h.final_form(step) for h in self.hooks)

    def state_dict(self):
        return {f"{i}.{k}": v for i, h in enumerate(self.hooks) for k, v in h.state_dict().items()}

    def load_state_dict(self, tensors):
        for i, h in enumerate(self.hooks):
            prefix = f"{i}."
            h.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def report(self, evaluate):
        out = {}
        for h in self.hooks:
            out.update(h.report(evaluate))
        return out


def empirical_fisher(
    ctx: TrainContext, params: dict[str, torch.Tensor], examples: int = 256, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher information: the mean squared gradient of the log-likelihood of the observed
    labels, over ``examples`` training examples taken ``batch_size`` at a time (1: per-example gradients, the
    textbook estimate; larger batches trade accuracy for speed)."""
    model = ctx.attachment.model
    was_training = model.training
    model.eval()  # no dropout while measuring
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    seen = 0
    for batch in ctx.batches(examples, batch_size):
        model.zero_grad(set_to_none=True)
        ctx.loss(batch).backward()
        n = len(batch["labels"])
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.detach().float() ** 2 * n
        seen += n
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {k: v / max(seen, 1) for k, v in fisher.items()}


def pretrained_parameters(attachment: Attachment) -> dict[str, nn.Parameter]:
    """The pretrained parameters that train, by base name: trainable base parameters outside the task head."""
    heads = tuple(f"{h}." for h in attachment.trainable_modules)
    state = attachment.state()
    return {name: state[name] for name in attachment.initial if not name.startswith(heads)}


def measured_fisher(
    ctx: TrainContext, params: dict[str, torch.Tensor], examples: int
) -> tuple[dict[str, torch.Tensor], int]:
    """``empirical_fisher`` one example at a time, and how many examples it saw (the training set may be smaller
    than ``examples``)."""
    seen = 0

    def counted(n: int, batch_size: int):
        nonlocal seen
        for batch in ctx.batches(n, batch_size):
            seen += len(batch["labels"])
            yield batch

    fisher = empirical_fisher(replace(ctx, batches=counted), params, examples=examples)
    return fisher, seen
