"""LoRA: low-rank adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685), with rsLoRA scaling.

A frozen linear layer ``h = W0 x + b`` gains a trainable low-rank update::

    h = W0 x + b + s * B A x,      A: (r, in),  B: (out, r),  B = 0 at the start, so h is unchanged at step 0

with ``s = alpha / r``, or ``s = alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732), which keeps the update's scale stable as r grows. A is initialised
Kaiming-uniform (as ``nn.Linear`` is) or Gaussian with std 1/r. Merging adds ``s * B @ A`` into ``W0``; the merged
layer is a plain linear layer again and the weight difference has rank at most r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer, replace_module
from ..core.targets import find_targets, matches
from ..errors import InputError, require
from .registry import Method, register


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "rank of the update B A"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: the update is multiplied by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0 skips the op)"})
    rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r) instead of alpha / r"})
    init: Literal["kaiming", "gaussian"] = field(default="kaiming", metadata={"help": "initialisation of A"})
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module name patterns to adapt (glob over names; 'all-linear' = every linear layer)"},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "per-module rank overrides, PATTERN=R (same glob rule)"}
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "per-module alpha overrides, PATTERN=ALPHA (same glob rule)"}
    )

    def __post_init__(self):
        require(isinstance(self.r, int) and self.r > 0, "r", "a positive integer", self.r)
        require(self.alpha > 0, "alpha", "a positive number", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)", self.dropout)
        for pattern, r in self.rank_pattern.items():
            require(isinstance(r, int) and r > 0, f"rank_pattern.{pattern}", "a positive integer", r)
        for pattern, a in self.alpha_pattern.items():
            require(a > 0, f"alpha_pattern.{pattern}", "a positive number", a)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module: the last matching pattern wins, else the global values."""
        r = next((v for p, v in reversed(self.rank_pattern.items()) if matches(p, module_name)), self.r)
        a = next((v for p, v in reversed(self.alpha_pattern.items()) if matches(p, module_name)), self.alpha)
        return r, a


class LoraLinear(AdapterLayer):
    """``base(x) + scaling * B(A(dropout(x)))`` around a frozen ``nn.Linear``."""

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "kaiming"
    ):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        dtype, device = self.factor_dtype_and_device()
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def factor_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """Where the factors live: the base weight's dtype and device (a base without ``.weight`` overrides this)."""
        return self.base.weight.dtype, self.base.weight.device

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)


def select_layers(model: nn.Module, config: LoraConfig, protected: Sequence[str] = ()) -> list[tuple[str, int, float]]:
    """The linear layers ``config.targets`` selects, each with its rank and alpha; a rank larger than the layer
    allows is an error naming the layer."""
    selected = []
    for name in find_targets(model, config.targets, (nn.Linear,), protected):
        base = model.get_submodule(name)
        r, alpha = config.rank_and_alpha(name)
        if r > min(base.in_features, base.out_features):
            raise InputError(
                f"r: rank {r} is larger than layer {name!r} allows "
                f"(in {base.in_features}, out {base.out_features}; at most {min(base.in_features, base.out_features)})"
            )
        selected.append((name, r, alpha))
    return selected


def apply(model: nn.Module, config: LoraConfig, protected: Sequence[str] = ()) -> list[str]:
    selected = select_layers(model, config, protected)
    for name, r, alpha in selected:
        base = model.get_submodule(name)
        replace_module(model, name, LoraLinear(base, r, alpha, config.dropout, config.rslora, config.init))
    return [name for name, _, _ in selected]


METHOD = register(
    Method(
        name="lora",
        config=LoraConfig,
        apply=apply,
        family="reparameterised",
        summary="low-rank update B A added to frozen linear layers; merges into the weights",
        paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)",
        lr=1e-3,
        mergeable=True,
    )
)
