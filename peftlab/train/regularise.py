"""Regularisation toward the pretrained weights, against forgetting: L2-SP and EWC as training hooks.

Both add a penalty to the task loss over the *pretrained parameters that train* (``theta``; their values when the
method was attached are ``theta_0 = attachment.initial``). The new task head has no pretrained value and is left
out, and so are parameters a method adds (LoRA's factors): they start at their own initialisation, not at theta_0.

- L2-SP (Li, Grandvalet and Davoine, 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
  Networks", arXiv:1802.01483)::

      Omega(theta) = lambda * ||theta - theta_0||^2                       (--l2sp LAMBDA)

  The paper's second term, a plain L2 penalty on the new head, is left to AdamW's weight decay.

- EWC, elastic weight consolidation (Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural
  networks", arXiv:1612.00796)::

      Omega(theta) = lambda * sum_i F_i * (theta_i - theta_0_i)^2          (--ewc LAMBDA, --ewc-examples N)

  with F the diagonal empirical Fisher information at theta_0 (``peftlab.core.hooks.empirical_fisher``: the mean
  squared per-example gradient of the log-likelihood). Where F comes from, honestly: EWC's Fisher should measure
  the *old* task, the one not to forget. peftlab has only the new task's data, so F here is the empirical Fisher of
  the new task's loss at theta_0 (with the freshly initialised head), over ``--ewc-examples`` training examples
  before the first step. That approximates EWC: it anchors the weights the new task's loss is most sensitive to at
  the start, not the weights the pretraining objective depends on. F is small (squared gradients), so useful
  lambdas are much larger than for L2-SP; ``results.json`` reports F's mean and maximum under ``method_report``.

Setting either with a method that trains no pretrained parameter (LoRA, the head-only probe) is an error: there
is nothing to pull back toward theta_0.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.attach import Attachment
from ..core.hooks import TrainContext, TrainingHooks, measured_fisher, pretrained_parameters
from ..errors import InputError, PeftlabError


def _trained_pretrained(attachment: Attachment, flag: str) -> dict[str, nn.Parameter]:
    params = pretrained_parameters(attachment)
    if not params:
        raise InputError(
            f"{flag}: method {attachment.method.name!r} trains no pretrained parameter, so there is nothing to "
            "regularise toward the pretrained weights (use it with full, last_k, bitfit, child tuning or fishmask)"
        )
    return params


class L2SP(TrainingHooks):
    """``lambda * ||theta - theta_0||^2`` over the pretrained parameters that train."""

    def __init__(self, attachment: Attachment, strength: float):
        self.strength = strength
        self.params = _trained_pretrained(attachment, "l2sp")
        self.start = {k: attachment.initial[k].to(p.device) for k, p in self.params.items()}

    def squared_distance(self) -> torch.Tensor:
        return sum(((p.float() - self.start[k].float()) ** 2).sum() for k, p in self.params.items())

    def penalty(self) -> torch.Tensor:
        return self.strength * self.squared_distance()

    def report(self, evaluate) -> dict:
        with torch.no_grad():
            distance = float(self.squared_distance())
        return {"l2sp": {"lambda": self.strength, "squared_distance_to_pretrained": distance}}


class EWC(TrainingHooks):
    """``lambda * sum_i F_i (theta_i - theta_0_i)^2`` with F the diagonal empirical Fisher at theta_0."""

    def __init__(self, attachment: Attachment, strength: float, examples: int):
        self.strength = strength
        self.examples = examples
        self.params = _trained_pretrained(attachment, "ewc")
        self.start = {k: attachment.initial[k].to(p.device) for k, p in self.params.items()}
        self.fisher: dict[str, torch.Tensor] | None = None
        self.seen: int | None = None  # examples the Fisher was measured on (None after a resume restored it)

    def prepare(self, ctx: TrainContext) -> None:
        self.fisher, self.seen = measured_fisher(ctx, self.params, self.examples)

    def weighted_distance(self) -> torch.Tensor:
        if self.fisher is None:
            raise PeftlabError("ewc: the Fisher information was neither computed (prepare) nor restored")
        return sum((self.fisher[k] * (p.float() - self.start[k].float()) ** 2).sum() for k, p in self.params.items())

    def penalty(self) -> torch.Tensor:
        return self.strength * self.weighted_distance()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"fisher.{k}": f for k, f in (self.fisher or {}).items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.params if f"fisher.{k}" not in tensors]
        if missing:
            raise InputError(f"ewc: the checkpoint holds no Fisher information for {missing[0]!r}")
        self.fisher = {k: tensors[f"fisher.{k}"].to(p.device) for k, p in self.params.items()}

    def report(self, evaluate) -> dict:
        with torch.no_grad():
            distance = float(self.weighted_distance())
            values = torch.cat([f.reshape(-1) for f in self.fisher.values()])
        return {
            "ewc": {
                "lambda": self.strength,
                "fisher_examples": self.examples,
                "fisher_examples_used": self.seen,
                "fisher_mean": float(values.mean()),
                "fisher_max": float(values.max()),
                "fisher_weighted_squared_distance": distance,
            }
        }


def regularisers(attachment: Attachment, settings) -> list[TrainingHooks]:
    """The regulariser hooks ``settings`` (a TrainSettings) asks for: L2-SP, then EWC."""
    hooks: list[TrainingHooks] = []
    if settings.l2sp > 0:
        hooks.append(L2SP(attachment, settings.l2sp))
    if settings.ewc > 0:
        hooks.append(EWC(attachment, settings.ewc, settings.ewc_examples))
    return hooks
