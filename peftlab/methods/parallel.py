"""Parallel adapter (He et al., 2022, Towards a Unified View of Parameter-Efficient Transfer Learning,
https://arxiv.org/abs/2110.04366).

A scaled bottleneck adapter beside each feed-forward block, fed with the block's input x::

    FFN(x) + s * (W_up act(W_down x + b_down) + b_up)

He et al. found this parallel placement at the feed-forward block, with s = 4, the best of the adapter variants
(their "scaled PA"). In Llama/Qwen decoders the wrapper adds the term to ``mlp(x)``; in BERT-style encoders, whose
block output module computes ``LayerNorm(dropout(FFN(x)) + x)``, it hands that module ``x + s A(x)`` as its residual
input, which is the same sum (see ``peftlab.methods.bottleneck``). W_up and the biases start at zero (outputs
unchanged at step 0); not mergeable. ``mam`` and ``unipelt`` reuse ``ParallelAdapter``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.registry import Method, register
from ..errors import require
from .adapter_drop import AdapterDropHooks
from .bottleneck import BottleneckConfig
from .bottleneck_sites import apply_parallel


@dataclass
class ParallelConfig(BottleneckConfig):
    scale: float = field(default=4.0, metadata={"help": "s: the adapter's output is multiplied by s"})

    def __post_init__(self):
        super().__post_init__()
        require(math.isfinite(self.scale) and self.scale != 0, "scale", "a finite non-zero number", self.scale)


def apply(model: nn.Module, config: ParallelConfig, protected: Sequence[str] = ()) -> list[str]:
    return apply_parallel(model, config, protected)


METHOD = register(
    Method(
        name="parallel",
        config=ParallelConfig,
        apply=apply,
        family="additive",
        summary="scaled bottleneck adapter beside each feed-forward block: FFN(x) + s * A(x)",
        paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366)",
        lr=1e-3,
        mergeable=False,
        hooks=AdapterDropHooks,
    )
)
