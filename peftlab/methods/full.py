"""Full fine-tuning: every parameter of the model trains (the baseline every PEFT method is measured against).

There is no adapter layer: the "adapter" saved for this method is the complete set of weights, so its file is as
large as the model and its changed-parameter count is (almost) the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..core.registry import Method, register


@dataclass
class FullConfig:
    pass


def apply(model: nn.Module, config: FullConfig, protected: Sequence[str] = ()) -> list[str]:
    model.requires_grad_(True)
    return []


METHOD = register(
    Method(
        name="full",
        config=FullConfig,
        apply=apply,
        family="baseline",
        summary="every parameter trains (the reference for quality, memory and speed)",
        paper="Devlin et al. 2019, BERT: fine-tuning all parameters (arXiv:1810.04805)",
        lr=5e-5,
        mergeable=True,
    )
)
