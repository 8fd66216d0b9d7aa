"""Linear probe: only the task head trains; the pretrained body stays frozen.

The classic baseline below every PEFT method (e.g. Devlin et al. 2019, arXiv:1810.04805, feature-based BERT; the
"linear probing" of Kumar et al. 2022, arXiv:2202.10054): with the body's features ``h = f(x; theta_0)`` frozen,
only the head's ``y = W h + b`` is learnt. peftlab's attach already makes the task head trainable beside every
method, so this method adds nothing: the adapter file holds just the head, and merging is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..core.registry import Method, register
from ..errors import InputError


@dataclass
class HeadConfig:
    pass


def apply(model: nn.Module, config: HeadConfig, protected: Sequence[str] = ()) -> list[str]:
    if not protected:
        raise InputError("head: the model has no task head to train (trainable_modules is empty)")
    return []


METHOD = register(
    Method(
        name="head",
        config=HeadConfig,
        apply=apply,
        family="baseline",
        summary="linear probe: only the task head trains, the pretrained body stays frozen",
        paper="linear probing of frozen features (Devlin et al. 2019, arXiv:1810.04805; Kumar et al. 2022, "
        "arXiv:2202.10054)",
        # the frozen body's features move no more; a new linear layer learns fast (MiniLM, mean pooling, 1,500
        # reviews, one epoch: 67.6 % at 5e-3, 72.1 % at 2e-2, what a logistic regression fitted to the end gives)
        lr=2e-2,
        mergeable=True,
    )
)
