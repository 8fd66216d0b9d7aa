"""Child-Tuning_D: only a Fisher-selected "child network" of the pretrained weights updates (Xu et al., 2021,
arXiv:2109.05687).

Before the first step, the diagonal empirical Fisher information of every pretrained weight is measured on the
task's training data (the mean squared per-example gradient of the log-likelihood)::

    F_i = 1/|D| * sum_{(x, y) in D} (d log p(y | x; theta) / d theta_i)^2

and the entries with the top ``p_D`` share of F over the whole model (one global threshold) form the child network
``C``. Training then updates only ``C``: ``g_t <- g_t * 1[i in C]`` after every backward pass, unscaled. The task
head is new and trains in full. ``--fisher-examples`` caps the examples that estimate F (the paper uses the whole
training set).

The mask is static, so the core enforces it (``attachment.masks``): masked-out gradients are zeroed, masked-out
entries are restored after every step (AdamW's decoupled weight decay would move them otherwise), only the
``p_D`` share counts as trainable, and the file stores just those entries (indices + values). The optimiser still
holds state for every pretrained weight, so memory is that of full fine-tuning. Merging is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.registry import Method, register
from ..errors import require


@dataclass
class ChildTuningDConfig:
    p_d: float = field(
        default=0.2, metadata={"help": "share of the pretrained entries, highest Fisher first, that train (0.1-0.3)"}
    )
    fisher_examples: int = field(
        default=1024, metadata={"help": "training examples that estimate the Fisher information, one at a time"}
    )

    def __post_init__(self):
        require(0 < self.p_d <= 1, "p_d", "a share in (0, 1]", self.p_d)
        require(
            isinstance(self.fisher_examples, int) and self.fisher_examples > 0,
            "fisher_examples",
            "a positive integer",
            self.fisher_examples,
        )


def apply(model: nn.Module, config: ChildTuningDConfig, protected: Sequence[str] = ()) -> list[str]:
    model.requires_grad_(True)
    return []


def hooks(attachment, config: ChildTuningDConfig):
    from .gradient_masks import FisherMask  # here, not at the top: peftlab.train imports the registry

    return FisherMask(attachment, config.p_d, config.fisher_examples)


METHOD = register(
    Method(
        name="child_tuning_d",
        config=ChildTuningDConfig,
        apply=apply,
        family="selective",
        summary="only the top p_D share of pretrained entries by empirical Fisher (a child network) trains",
        paper="Xu et al. 2021, Raise a Child in Large Language Model: Towards Effective and Generalizable "
        "Fine-tuning (arXiv:2109.05687)",
        lr=5e-5,
        mergeable=True,
        hooks=hooks,
    )
)
