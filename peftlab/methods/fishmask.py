"""FishMask: a fixed sparse mask of the highest-Fisher parameters (Sung, Nair and Raffel, 2021, arXiv:2111.09839).

Once, before training, the diagonal empirical Fisher information of every pretrained parameter is estimated from
``--fisher-examples`` training examples (per-example gradients of the log-likelihood of the observed label)::

    F_i = 1/N * sum_{n=1..N} (d log p(y_n | x_n; theta) / d theta_i)^2

and the ``keep`` share of all entries with the largest ``F_i`` (one global threshold; the paper keeps 0.5%) is the
mask ``M``. Only those entries ever change::

    theta = theta_0 + M * delta,       |M| = round(keep * number of pretrained entries)

The task head is new and trains in full. The mechanism is Child-Tuning_D's with a far smaller share (the two
share ``peftlab.methods.gradient_masks``): the core zeroes masked-out gradients, restores masked-out entries after
every step, counts ``trainable`` from the mask, and saves the update sparse, as flat indices and values; the
changed count is the mask entries that moved plus the head. The optimiser still holds state for every pretrained
weight during training (memory of full fine-tuning); the saved file is small. Merging is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.registry import Method, register
from ..errors import require


@dataclass
class FishMaskConfig:
    keep: float = field(
        default=0.005, metadata={"help": "share of the pretrained entries, highest Fisher first, that train"}
    )
    fisher_examples: int = field(
        default=1024, metadata={"help": "training examples that estimate the Fisher information, one at a time"}
    )

    def __post_init__(self):
        require(0 < self.keep <= 1, "keep", "a share in (0, 1] (0.005 keeps 0.5%)", self.keep)
        require(
            isinstance(self.fisher_examples, int) and self.fisher_examples > 0,
            "fisher_examples",
            "a positive integer",
            self.fisher_examples,
        )


def apply(model: nn.Module, config: FishMaskConfig, protected: Sequence[str] = ()) -> list[str]:
    model.requires_grad_(True)
    return []


def hooks(attachment, config: FishMaskConfig):
    from .gradient_masks import FisherMask  # here, not at the top: peftlab.train imports the registry

    return FisherMask(attachment, config.keep, config.fisher_examples)


METHOD = register(
    Method(
        name="fishmask",
        config=FishMaskConfig,
        apply=apply,
        family="selective",
        summary="a fixed sparse mask of the highest-Fisher pretrained entries (e.g. 0.5%) trains; saved sparse",
        paper="Sung et al. 2021, Training Neural Networks with Fixed Sparse Masks (arXiv:2111.09839)",
        lr=1e-4,
        mergeable=True,
        hooks=hooks,
    )
)
