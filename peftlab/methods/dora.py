"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, https://arxiv.org/abs/2402.09353).

The adapted weight is split into a magnitude and a direction; the direction gets a LoRA update and the magnitude
is a trainable vector with one entry per output row::

    W' = m * (W0 + s B A) / ||W0 + s B A||        m: (out,),  ||.||: the L2 norm of each row (over the inputs)

``m`` starts as ``||W0||``, and B = 0 as in LoRA, so ``W' = W0`` at step 0. As the paper's section 4.3 suggests
(and PEFT does), the norm is treated as a constant in the backward pass: it follows ``B A`` in the forward pass but
passes no gradient. The layer computes, with ``x_d`` the input after LoRA's dropout (``x_d = x`` without it)::

    h = W0 x + b + (m / n - 1) * W0 x_d + (m / n) * s * B A x_d,      n = ||W0 + s B A|| (detached)

which equals ``W' x + b`` when there is no dropout. The low-rank part is LoRA's own layer (``LoraLinear``, so rsLoRA,
per-module ranks and the PiSSA / MiLoRA initialisations carry over: the direction is ``W0 + LoRA's update``).

Merging is not additive: it replaces ``W0`` by ``W'``, a rescaling of every row, so the weight difference ``W' - W0``
is generally of full rank. Unmerging divides the rows by the same ``m / n`` (kept from the merge) and subtracts
``s B A``, which restores ``W0`` up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import Method, PeftFormat, register
from ..errors import PeftlabError
from . import lora


@dataclass
class DoraConfig(lora.LoraConfig):
    """LoRA's options (rank, alpha, dropout, rsLoRA, init, targets and per-module patterns) for the direction."""


class DoraLinear(lora.LoraLinear):
    """LoRA on the direction of a frozen ``nn.Linear``'s weight, a trainable magnitude per output row."""

    def __init__(self, base: nn.Linear, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        self.magnitude = nn.Parameter(self.weight_norm())  # (out,): ||W0 + s B A||, which is ||W0|| here
        self.merge_scale: torch.Tensor | None = None  # m / n at the time of merging, to unmerge with

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``n = ||W0 + s B A||`` per output row, (out,); computed without gradient (the paper's section 4.3)."""
        return torch.linalg.norm(self.pretrained_weight() + self.lora_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out): W0 x + b
        if self.merged:
            return out
        scale = self.magnitude / self.weight_norm()  # (out,): m / n
        if isinstance(self.dropout, nn.Identity) or not self.training:
            dropped = x
            base_out = out if self.base.bias is None else out - self.base.bias  # (..., out): W0 x
        else:
            dropped = self.dropout(x)
            base_out = F.linear(dropped, self.base.weight)  # (..., out): W0 x_d
        return out + (scale - 1) * base_out + scale * self.lora_output(x, dropped)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "magnitude": self.magnitude}

    def pretrained_weight(self) -> torch.Tensor:
        weight = self.base.weight.detach()
        if self.merged:  # W' = (m / n) (W0 + s B A)  =>  W0 = W' / (m / n) - s B A
            weight = weight / self.merge_scale[:, None] - self.lora_weight().detach()
        return weight

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``W' - W0`` (out, in): every row rescaled, so generally of full rank."""
        if self.merged:
            return self.base.weight - self.pretrained_weight()
        weight = self.base.weight
        scale = self.magnitude / self.weight_norm()  # (out,)
        return scale[:, None] * (weight + self.lora_weight()) - weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise PeftlabError("DoraLinear is already merged")
        scale = self.magnitude / self.weight_norm()  # (out,)
        if not bool(torch.all(scale != 0)):
            raise PeftlabError("a DoRA magnitude entry is zero: merging could not be undone")
        weight = self.base.weight
        weight.copy_(scale[:, None] * (weight + self.lora_weight()))
        self.merge_scale = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise PeftlabError("DoraLinear is not merged")
        self.base.weight.copy_(self.pretrained_weight())
        self.merge_scale = None
        self.merged = False


def apply(model: nn.Module, config: DoraConfig, protected: Sequence[str] = ()) -> list[str]:
    return lora.apply(model, config, protected, layer_class=DoraLinear)


# --- Hugging Face PEFT: a LoRA adapter with use_dora and <module>.lora_magnitude_vector, shape (out,) -------------


def export_dora(attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    fields, tensors = lora.export_lora(attachment)
    for name, layer in attachment.layers().items():
        tensors[f"{name}.lora_magnitude_vector"] = layer.magnitude
    return {**fields, "use_dora": True}, tensors


def import_dora(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], weights):
    return lora.import_lora(model, cfg, tensors, weights, method="dora", extra={"magnitude_vector": "magnitude"})


METHOD = register(
    Method(
        name="dora",
        config=DoraConfig,
        apply=apply,
        family="reparameterised",
        summary="LoRA on the weight's direction plus a trainable magnitude per row; merges into the weights",
        paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)",
        lr=1e-3,
        mergeable=True,
        peft=PeftFormat("LORA+DORA", export=export_dora, load=import_dora),
        param_groups=lora.lora_plus_groups,
    )
)
