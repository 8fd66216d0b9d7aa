"""MAM adapter (He, Zhou, Ma, Berg-Kirkpatrick and Neubig, 2022, Towards a Unified View of Parameter-Efficient
Transfer Learning, https://arxiv.org/abs/2110.04366).

He et al. view prefix tuning and adapters as one operation, a modification Δh added to a hidden state, and find the
best combination ("Mix-And-Match", MAM): prefix tuning in the attention sublayers and a scaled parallel adapter at
the feed-forward sublayers. In every transformer layer l, with x_l the attention input and u_l the feed-forward
block's input::

    attention_l(x) = softmax(q [K_l; k(x)]^T / sqrt(d_head)) [V_l; v(x)]      K_l, V_l: (kv_heads, P, d_head)
    ffn_l(u)       = FFN(u) + s * (W_up act(W_down u + b_down) + b_up)         W_down: (m, d), W_up: (d, m)

The first line is ``prefix_tuning`` (the prefixes' mechanism, positions and Li & Liang's MLP reparameterisation
``[K_1; V_1; ...] = W2 tanh(W1 P' + b1) + b2``, folded away when the adapter is saved: see prefixes.py and
prefix_tuning.py), the second ``parallel`` (placement per architecture: see bottleneck.py). This module only
composes the two, with the paper's settings as defaults: P = 30 prefix positions and s = 4. The paper's adapter has
m = 512 units on 1024-wide BART-large / mBART-large, half the hidden size; the default here keeps that ratio,
m = d / 2 (192 on the 384-wide MiniLM), unless ``bottleneck`` or ``reduction_factor`` is given.

Saved form: the prefix MLP is folded into each layer's (kv_heads, P, d_head) keys and values (config saved with
``projection = false``, training config under ``trained_as``); the parallel adapters are saved as they are.

Not the identity at step 0: the prefixes are random, as in prefix tuning (the parallel adapters alone would be:
their W_up and biases start at zero). Nothing merges into the weights. Hugging Face PEFT has no MAM adapter, so
there is no PEFT parity test or export; tests/test_mam.py checks that MAM equals prefix tuning and a parallel
adapter attached together with the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.registry import Method, register
from ..errors import require
from .bottleneck import AUTO, Activation
from .parallel import ParallelConfig
from .parallel import apply as apply_parallel
from .prefix_tuning import apply as apply_prefixes
from .prefixes import PrefixOptions, fold_hybrid

# The paper's adapter is half as wide as the model (512 units in 1024-wide BART-large).
DEFAULT_REDUCTION = 2.0


@dataclass
class MamConfig(PrefixOptions):
    """The prefix-tuning part (attention): ``PrefixOptions``, with the paper's 30 positions; then the parallel
    adapter's options."""

    num_virtual_tokens: int = field(default=30, metadata={"help": "prefix length P: key/value positions per layer"})
    # The parallel-adapter part (feed-forward blocks).
    bottleneck: int | None = field(
        default=None, metadata={"help": "parallel adapter size m (give this or reduction_factor; default d / 2)"}
    )
    reduction_factor: float | None = field(
        default=None, metadata={"help": "parallel adapter size as hidden size / factor (give this or bottleneck)"}
    )
    activation: Activation = field(default="relu", metadata={"help": "non-linearity inside the parallel adapter"})
    scale: float = field(default=4.0, metadata={"help": "s: the parallel adapter's output is multiplied by s"})
    targets: list[str] = field(
        default_factory=lambda: [AUTO],
        metadata={"help": "where the parallel adapters go: 'auto' (known layouts) or feed-forward module patterns"},
    )

    def __post_init__(self):
        super().__post_init__()  # each part validates its own fields, naming them
        self.adapter_config()
        require(math.isfinite(self.scale) and self.scale != 0, "scale", "a finite non-zero number", self.scale)

    def adapter_config(self) -> ParallelConfig:
        default = self.bottleneck is None and self.reduction_factor is None
        return ParallelConfig(
            bottleneck=self.bottleneck,
            reduction_factor=DEFAULT_REDUCTION if default else self.reduction_factor,
            activation=self.activation,
            targets=list(self.targets),
            scale=self.scale,
        )


def apply(model: nn.Module, config: MamConfig, protected: Sequence[str] = ()) -> list[str]:
    """A parallel adapter beside every feed-forward block, then prefixes in every attention module (in this order:
    the prefix MLP is a module called ``mlp`` too, which Llama's ``mlp`` pattern would otherwise find)."""
    adapted = apply_parallel(model, config.adapter_config(), protected)
    return adapted + apply_prefixes(model, config, protected)


def fold(attachment) -> tuple[MamConfig, dict[str, torch.Tensor]] | None:
    """The prefix MLP computed once into every layer's prefixes; the parallel adapters' tensors unchanged."""
    folded = attachment.config.folded()
    return None if folded is None else (folded, fold_hybrid(attachment))


METHOD = register(
    Method(
        name="mam",
        config=MamConfig,
        apply=apply,
        family="hybrid",
        summary="prefix tuning in attention plus a scaled parallel adapter beside each feed-forward block",
        paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366)",
        # chosen on validation accuracy by `peftlab bench --suite methods --lr-grid` (docs/results.md):
        # at 2e-3 the prefixes swamp attention and every review reads alike (57.3 %, the majority class);
        # 6e-4 gave 80.2 % validation
        lr=6e-4,
        mergeable=False,
        identity_at_init=False,
        fold=fold,
        param_groups=MamConfig.param_groups,
    )
)
