"""Child-Tuning_F: every step updates a fresh random "child network" (Xu et al., 2021, arXiv:2109.05687).

All pretrained parameters train, but after every backward pass the gradient is masked by a new Bernoulli draw and
rescaled so that it stays unbiased::

    M_t ~ Bernoulli(p_F)  (one draw per entry, per optimiser step),     g_t <- g_t * M_t / p_F

then the optimiser steps as usual (the paper's Child-Tuning_F, task-free: no data decides the child network). The
draws come from a generator seeded by the step (``StepRandom``), so data-parallel processes draw the same masks and
``--resume`` retraces them exactly. The new task head
is not masked. With gradient accumulation the mask is drawn once per optimiser step, after the last micro-batch.

Accounting: every pretrained entry may change, so all of them count as trainable, and the adapter file holds the
whole model (dense, like full fine-tuning); merging is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.registry import Method, register
from ..errors import require


@dataclass
class ChildTuningFConfig:
    p_f: float = field(
        default=0.3, metadata={"help": "probability that a gradient entry is kept each step (paper: 0.2 to 0.4)"}
    )

    def __post_init__(self):
        require(0 < self.p_f <= 1, "p_f", "a probability in (0, 1]", self.p_f)


def apply(model: nn.Module, config: ChildTuningFConfig, protected: Sequence[str] = ()) -> list[str]:
    model.requires_grad_(True)
    return []


def hooks(attachment, config: ChildTuningFConfig):
    from .gradient_masks import BernoulliGradientMask  # here, not at the top: peftlab.train imports the registry

    return BernoulliGradientMask(attachment, config.p_f)


METHOD = register(
    Method(
        name="child_tuning_f",
        config=ChildTuningFConfig,
        apply=apply,
        family="selective",
        summary="all weights train, each step through a fresh Bernoulli(p_F) gradient mask rescaled by 1/p_F",
        paper="Xu et al. 2021, Raise a Child in Large Language Model: Towards Effective and Generalizable "
        "Fine-tuning (arXiv:2109.05687)",
        lr=5e-5,
        mergeable=True,
        hooks=hooks,
    )
)
