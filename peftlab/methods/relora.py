"""ReLoRA: high-rank training through low-rank updates (Lialin et al., 2023, https://arxiv.org/abs/2307.05695).

LoRA whose update is merged and restarted every ``reset_every`` steps. Between resets a layer computes::

    h = W0 x + b + H_B H_A x + s * B A x,     A: (r, in),  B: (out, r),  s = alpha / r

where ``H_B H_A`` is the sum of every update merged so far. At a reset (after an optimiser step)::

    H_B <- [H_B, s * B],   H_A <- [H_A; A]     (the merge: H_B H_A gains s * B A, so h is unchanged)
    A <- Kaiming-uniform,  B <- 0              (a fresh LoRA that starts at zero)

then the optimiser's moments of A and B are magnitude-pruned (the ``optimizer_reset`` share of smallest-magnitude
entries of Adam's first and second moments set to zero; the paper uses 0.99) and the learning rate restarts: for the
``restart_warmup`` steps after a reset it is the schedule's value times k / restart_warmup (k = 1, 2, ...), a
jagged schedule. One departure from the reference code, which prunes the two moments independently: wherever the
second moment is pruned, the first is zeroed too. Otherwise such an entry steps by m / eps on the next update (the
gradient of A is exactly zero right after a reset, since B = 0); on the tiny test model that blew the update up by
three orders of magnitude. The weight difference after n resets is a sum of n + 1 rank-r terms, so its rank can reach
(n + 1) r, beyond what one LoRA of rank r can express.

Representation. ``W0`` (``base.weight``) stays the pretrained weight; the merged updates live beside it as the
growing low-rank history ``H_B`` (out, R) and ``H_A`` (R, in), R = r per reset, saved with the adapter. So the
adapter file holds the whole change relative to the pretrained base, and loading it onto a fresh pretrained model
reproduces the outputs. The alternative, a dense delta per layer, costs out * in numbers whatever the number of
resets; the history costs R (out + in), smaller while R < out * in / (out + in) (192 for a 384 x 384 layer). The
history never needs more than min(out, in) columns: past that, a reset re-factors it exactly (up to rounding)
through an SVD of ``H_B H_A``. The price of keeping ``W0`` untouched is an extra R (out + in) multiply-adds per
token until ``merge()`` folds everything into the weight. Merging adds ``H_B H_A + s B A`` to ``W0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer
from ..core.hooks import TrainContext, TrainingHooks
from ..core.registry import Method, register
from ..errors import InputError, require
from .lora import wrap_linear_layers


@dataclass
class ReLoraConfig:
    r: int = field(default=8, metadata={"help": "rank of each low-rank update B A"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: the update is multiplied by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0 skips the op)"})
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module name patterns to adapt (glob over names; 'all-linear' = every linear layer)"},
    )
    reset_every: int = field(
        default=200, metadata={"help": "optimiser steps between resets (merge B A, re-initialise, prune optimiser)"}
    )
    optimizer_reset: float = field(
        default=0.99,
        metadata={"help": "share of the LoRA parameters' Adam moments zeroed at a reset, smallest magnitudes first"},
    )
    restart_warmup: int = field(
        default=20, metadata={"help": "steps over which the learning rate ramps back up after a reset (0: none)"}
    )

    def __post_init__(self):
        require(isinstance(self.r, int) and self.r > 0, "r", "a positive integer", self.r)
        require(self.alpha > 0, "alpha", "a positive number", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)", self.dropout)
        require(
            isinstance(self.reset_every, int) and self.reset_every > 0,
            "reset_every",
            "a positive integer",
            self.reset_every,
        )
        require(0 <= self.optimizer_reset <= 1, "optimizer_reset", "a share in [0, 1]", self.optimizer_reset)
        require(
            isinstance(self.restart_warmup, int) and self.restart_warmup >= 0,
            "restart_warmup",
            "an integer >= 0",
            self.restart_warmup,
        )


class ReLoraLinear(AdapterLayer):
    """``base(x) + H_B(H_A(x)) + scaling * B(A(dropout(x)))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The merged updates, scaling folded into history_B: their product is the sum of every s * B A merged so far.
        self.register_buffer("history_B", torch.zeros(base.out_features, 0, dtype=w.dtype, device=w.device))  # (out, R)
        self.register_buffer("history_A", torch.zeros(0, base.in_features, dtype=w.dtype, device=w.device))  # (R, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:
            return out
        if self.history_rank:
            out = out + F.linear(F.linear(x, self.history_A), self.history_B)
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @property
    def history_rank(self) -> int:
        """R: the number of merged rank-one terms kept (r per reset, at most min(out, in))."""
        return self.history_A.shape[0]

    @torch.no_grad()
    def restart(self) -> None:
        """Merge ``scaling * B A`` into the history, then start a fresh LoRA: A Kaiming-uniform, B = 0."""
        if self.merged:
            raise InputError("unmerge the adapter before a ReLoRA reset")
        history_B = torch.cat([self.history_B, self.lora_B * self.scaling], dim=1)  # (out, R + r)
        history_A = torch.cat([self.history_A, self.lora_A], dim=0)  # (R + r, in)
        if history_A.shape[0] > min(self.base.in_features, self.base.out_features):
            # More columns than the matrix can have rank: re-factor exactly into min(out, in) of them.
            U, S, Vh = torch.linalg.svd((history_B @ history_A).float(), full_matrices=False)
            history_B, history_A = (U * S).to(history_B.dtype), Vh.to(history_A.dtype)
        self.history_B, self.history_A = history_B, history_A
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        return {"history_A": self.history_A, "history_B": self.history_B}

    def accepts_buffer_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        # The history grows with every reset: it loads with whatever length R it was saved with (R columns of
        # H_B, R rows of H_A), as long as its other dimension fits this layer.
        if name == "history_A":
            return len(shape) == 2 and shape[1] == self.base.in_features
        if name == "history_B":
            return len(shape) == 2 and shape[0] == self.base.out_features
        return False

    def on_loaded(self) -> None:
        if self.history_B.shape[1] != self.history_A.shape[0]:
            raise InputError(
                f"ReLoRA history factors disagree: history_B has {self.history_B.shape[1]} columns, "
                f"history_A {self.history_A.shape[0]} rows"
            )

    def delta_weight(self) -> torch.Tensor:
        return self.history_B @ self.history_A + (self.lora_B @ self.lora_A) * self.scaling  # (out, in)


def apply(model: nn.Module, config: ReLoraConfig, protected: Sequence[str] = ()) -> list[str]:
    def make_layer(_: str, base: nn.Linear) -> ReLoraLinear:
        return ReLoraLinear(base, config.r, config.alpha, config.dropout)

    return wrap_linear_layers(model, config.targets, protected, lambda _: config.r, make_layer)


@torch.no_grad()
def prune_smallest_(tensor: torch.Tensor, share: float) -> None:
    """Zero the ``share`` of ``tensor``'s entries with the smallest magnitude, in place (ties at the cut go too)."""
    k = int(share * tensor.numel())
    if k <= 0:
        return
    if k >= tensor.numel():
        tensor.zero_()
        return
    magnitude = tensor.abs()
    threshold = magnitude.reshape(-1).float().kthvalue(k).values
    tensor.mul_(magnitude.float() > threshold)


class ReLoraHooks(TrainingHooks):
    """Resets every ``reset_every`` steps (never after the last step) and the jagged learning-rate restarts."""

    def __init__(self, attachment, config: ReLoraConfig):
        self.layers: dict[str, ReLoraLinear] = attachment.layers()
        self.config = config
        self.total_steps: int | None = None
        self.resets = 0

    def prepare(self, ctx: TrainContext) -> None:
        self.total_steps = ctx.total_steps

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, scheduler) -> None:
        done = step + 1
        every = self.config.reset_every
        if done % every == 0 and (self.total_steps is None or done < self.total_steps):
            self.reset(optimizer)
        # The scheduler has just set every group's lr for the next step (from its base lr, so this does not
        # compound); within restart_warmup steps of a reset, scale it down linearly.
        last_reset = (done // every) * every
        warmup = self.config.restart_warmup
        if last_reset > 0 and warmup > 0:
            k = done - last_reset + 1  # the next step is the k-th after the reset
            if k <= warmup:
                for group in optimizer.param_groups:
                    group["lr"] *= k / warmup

    @torch.no_grad()
    def reset(self, optimizer: torch.optim.Optimizer) -> None:
        for layer in self.layers.values():
            layer.restart()
            for p in layer.adapter_parameters().values():
                state = optimizer.state.get(p, {})
                if "exp_avg" not in state:
                    continue  # no step taken yet
                first, second = state["exp_avg"], state["exp_avg_sq"]
                prune_smallest_(first, self.config.optimizer_reset)
                prune_smallest_(second, self.config.optimizer_reset)
                # An entry left with a first moment but no second one would step by m / eps (A's gradient is
                # exactly zero right after a reset, as B = 0): drop the first moment wherever the second is gone.
                first.mul_(second != 0)
        self.resets += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total_steps": torch.tensor(self.total_steps or 0), "resets": torch.tensor(self.resets)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if "total_steps" in tensors:
            self.total_steps = int(tensors["total_steps"]) or None
            self.resets = int(tensors["resets"])

    def report(self, evaluate: Callable[[], dict]) -> dict:
        ranks = {name: layer.history_rank for name, layer in self.layers.items()}
        return {"resets": self.resets, "merged_history_rank": ranks}


METHOD = register(
    Method(
        name="relora",
        config=ReLoraConfig,
        apply=apply,
        family="reparameterised",
        summary="LoRA merged into a low-rank history and restarted every reset_every steps (jagged lr, pruned Adam)",
        paper="Lialin et al. 2023, ReLoRA: High-Rank Training Through Low-Rank Updates (arXiv:2307.05695)",
        lr=1e-3,
        mergeable=True,
        hooks=ReLoraHooks,
    )
)
