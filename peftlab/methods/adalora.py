"""AdaLoRA: adaptive budget allocation for low-rank updates (Zhang et al., 2023, https://arxiv.org/abs/2303.10512).

Each adapted linear layer carries its update in SVD form::

    h = W0 x + b + (alpha / init_r) * P diag(Lambda) Q x,    P: (out, r),  Lambda: (r,),  Q: (r, in)

stored as peft stores it: ``lora_B`` = P, ``lora_E`` = Lambda as an (r, 1) column, ``lora_A`` = Q. Lambda starts
at zero (so h is unchanged at step 0), P and Q Gaussian with std 0.02. The scale is ``alpha / (init_r + 1e-5)``
whatever the number of triplets still kept (peft's ``ranknum`` is the initial rank, its 1e-5 included).

Importance. After every backward pass, for every entry w of P, Lambda and Q, with I = |w * dL/dw|::

    Ibar <- beta1 Ibar + (1 - beta1) I            (sensitivity, smoothed)
    Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|   (its uncertainty)
    s(w)  = Ibar * Ubar

and triplet i of a layer scores S_i = s(Lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji).

Budget. The number of triplets kept across all layers, b(t) after t steps, is ``init_r`` per layer up to
``tinit`` steps, then falls on a cubic to ``target_r`` per layer at step T - ``tfinal``::

    b(t) = b_T + (b_0 - b_T) * (1 - (t - tinit) / (T - tfinal - tinit))^3     (rounded down)

Every ``delta_t`` steps in between, the singular values of all but the b(t) best-scored triplets (ranked
globally, across layers) are set to zero after the optimiser step; a pruned triplet can come back at the next
allocation if its score recovers. At step T - ``tfinal`` the allocation is fixed at the target budget and
re-applied after every later step. The weight difference of a layer has rank equal to its number of non-zero
singular values.

Orthogonality. The loss gains gamma * mean over layers of (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2), the paper's
regulariser (its Eq. 4) with the squared Frobenius norm; averaging over layers keeps gamma independent of how many
layers are adapted. ``orth_form="peft"`` takes the form of peft and the authors' code instead: gamma * the mean of
the unsquared norms ||P^T P - I||_F and ||Q Q^T - I||_F over all 2L matrices, which near AdaLoRA's initialisation
(small P, Q: each norm about sqrt(r)) is several times weaker for the same gamma; adapters imported from peft use it.

Hugging Face PEFT conversion (``peft_type: "ADALORA"``) both ways: exported adapters hold only the kept triplets
with a ``rank_pattern`` of which were kept, as peft writes them after training.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer
from ..core.attach import Attachment, attach, load_state
from ..core.hf_peft import HF_CONFIG, head_modules, head_tensors
from ..core.hooks import TrainContext, TrainingHooks
from ..core.registry import Method, PeftFormat, register
from ..errors import InputError, require
from .lora import UNSUPPORTED, split_lora_tensors, wrap_linear_layers


@dataclass
class AdaLoraConfig:
    init_r: int = field(default=12, metadata={"help": "initial rank (triplets) of every adapted layer"})
    target_r: int = field(default=8, metadata={"help": "average rank per layer left when pruning ends"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: the update is multiplied by alpha / init_r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0 skips the op)"})
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module name patterns to adapt (glob over names; 'all-linear' = every linear layer)"},
    )
    tinit: int | None = field(
        default=None, metadata={"help": "steps before the first pruning (default: a tenth of the run)"}
    )
    tfinal: int | None = field(
        default=None,
        metadata={
            "help": "last steps trained at the target budget with the allocation fixed (default: 30% of the run)"
        },
    )
    delta_t: int = field(default=10, metadata={"help": "steps between two budget allocations"})
    beta1: float = field(default=0.85, metadata={"help": "smoothing of the sensitivity |w * grad|"})
    beta2: float = field(default=0.85, metadata={"help": "smoothing of the sensitivity's uncertainty"})
    orth_reg: float = field(default=0.1, metadata={"help": "gamma: weight of the orthogonality penalty on P and Q"})
    orth_form: str = field(
        default="paper",
        metadata={
            "help": "the penalty's form: 'paper' (squared Frobenius norms, mean over layers) or 'peft' (unsquared "
            "norms, mean over the P and Q matrices, as Hugging Face PEFT computes it)"
        },
    )

    def __post_init__(self):
        require(isinstance(self.init_r, int) and self.init_r > 0, "init_r", "a positive integer", self.init_r)
        require(
            isinstance(self.target_r, int) and 1 <= self.target_r <= self.init_r,
            "target_r",
            f"an integer from 1 to init_r = {self.init_r}",
            self.target_r,
        )
        require(self.alpha > 0, "alpha", "a positive number", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)", self.dropout)
        require(self.tinit is None or self.tinit >= 0, "tinit", "an integer >= 0", self.tinit)
        require(self.tfinal is None or self.tfinal >= 0, "tfinal", "an integer >= 0", self.tfinal)
        require(isinstance(self.delta_t, int) and self.delta_t > 0, "delta_t", "a positive integer", self.delta_t)
        require(0 < self.beta1 < 1, "beta1", "a number in (0, 1)", self.beta1)
        require(0 < self.beta2 < 1, "beta2", "a number in (0, 1)", self.beta2)
        require(self.orth_reg >= 0, "orth_reg", "a number >= 0", self.orth_reg)
        require(self.orth_form in ("paper", "peft"), "orth_form", "'paper' or 'peft'", self.orth_form)


class AdaLoraLinear(AdapterLayer):
    """``base(x) + scaling * P(diag(Lambda)(Q(dropout(x))))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        self.r = r
        self.scaling = alpha / (r + 1e-5)
        w = base.weight
        factory = {"dtype": w.dtype, "device": w.device}
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, **factory) * 0.02)  # Q (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))  # Lambda (r, 1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, **factory) * 0.02)  # P (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A * self.lora_E), self.lora_B) * self.scaling

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling  # (out, in)

    def kept(self) -> torch.Tensor:
        """Which triplets are in use: those with a non-zero singular value, (r,) bool."""
        return self.lora_E.detach().reshape(-1) != 0

    def orthogonality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """How far P and Q are from orthonormal: the residuals P^T P - I and Q Q^T - I, (r, r) each."""
        eye = torch.eye(self.r, dtype=self.lora_A.dtype, device=self.lora_A.device)
        return self.lora_B.T @ self.lora_B - eye, self.lora_A @ self.lora_A.T - eye


def apply(model: nn.Module, config: AdaLoraConfig, protected: Sequence[str] = ()) -> list[str]:
    return wrap_linear_layers(
        model,
        config.targets,
        protected,
        lambda _: config.init_r,
        lambda _, base: AdaLoraLinear(base, config.init_r, config.alpha, config.dropout),
        field="init_r",
    )


class AdaLoraHooks(TrainingHooks):
    """Importance scores after each backward pass, the budget schedule and pruning after each step, the penalty."""

    def __init__(self, attachment: Attachment, config: AdaLoraConfig):
        self.config = config
        self.layers: dict[str, AdaLoraLinear] = attachment.layers()
        self.initial_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.total_steps = 0
        self.sensitivity = {  # Ibar, per layer and parameter name
            name: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in layer.adapter_parameters().items()}
            for name, layer in self.layers.items()
        }
        self.uncertainty = {  # Ubar
            name: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in layer.adapter_parameters().items()}
            for name, layer in self.layers.items()
        }
        self.allocation = {name: layer.kept().new_ones(layer.r) for name, layer in self.layers.items()}

    # --- schedule ---------------------------------------------------------------------------------------------

    def phases(self) -> tuple[int, int]:
        """(tinit, T - tfinal): pruning starts after the first and the allocation is fixed at the second."""
        tinit = self.config.tinit if self.config.tinit is not None else self.total_steps // 10
        tfinal = self.config.tfinal if self.config.tfinal is not None else (3 * self.total_steps) // 10
        return tinit, self.total_steps - tfinal

    def budget(self, t: int) -> int:
        """Triplets kept across all layers after t steps: the cubic schedule."""
        start, end = self.phases()
        if t <= start:
            return self.initial_budget
        if t >= end:
            return self.target_budget
        remaining = 1 - (t - start) / (end - start)
        return int(self.target_budget + (self.initial_budget - self.target_budget) * remaining**3)

    def prepare(self, ctx: TrainContext) -> None:
        self.total_steps = ctx.total_steps
        start, end = self.phases()
        if not 0 <= start < end:
            raise InputError(
                f"tinit/tfinal: tinit {start} and tfinal {self.total_steps - end} leave no pruning phase "
                f"in a run of {self.total_steps} steps (need tinit + tfinal < {self.total_steps})"
            )

    # --- importance -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if step + 1 > self.phases()[1]:
            return  # the allocation is fixed
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self.layers.items():
            for k, p in layer.adapter_parameters().items():
                if p.grad is None:
                    continue
                importance = (p * p.grad).abs().float()
                ibar = self.sensitivity[name][k].mul_(b1).add_(importance, alpha=1 - b1)
                self.uncertainty[name][k].mul_(b2).add_((importance - ibar).abs(), alpha=1 - b2)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i = s(Lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji) per layer, (r,)."""
        scores = {}
        for name in self.layers:
            s = {k: self.sensitivity[name][k] * self.uncertainty[name][k] for k in self.sensitivity[name]}
            scores[name] = s["lora_E"].reshape(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return scores

    # --- pruning ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the ``budget`` best-scored triplets across all layers; zero the other singular values."""
        scores = self.triplet_scores()
        flat = torch.cat([scores[name] for name in self.layers])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, len(flat))).indices] = True
        for name, kept in zip(self.layers, keep.split([layer.r for layer in self.layers.values()]), strict=True):
            self.allocation[name] = kept
        self.mask()

    @torch.no_grad()
    def mask(self) -> None:
        for name, layer in self.layers.items():
            layer.lora_E.mul_(self.allocation[name].to(layer.lora_E.dtype).unsqueeze(1))

    def after_step(self, step: int, optimizer, scheduler) -> None:
        t = step + 1
        start, end = self.phases()
        if t > end:
            self.mask()  # keep the fixed allocation (the optimiser moves pruned values off zero)
        elif t == end:
            self.allocate(self.target_budget)
        elif t > start and (t - start) % self.config.delta_t == 0:
            self.allocate(self.budget(t))

    # --- penalty, state, report ------------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor | None:
        if self.config.orth_reg == 0:
            return None
        residuals = [layer.orthogonality() for layer in self.layers.values()]
        if self.config.orth_form == "peft":  # mean over the 2L matrices of ||residual||_F
            terms = torch.stack([torch.linalg.matrix_norm(r) for pair in residuals for r in pair])
        else:  # mean over the L layers of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2
            terms = torch.stack([(p_res**2).sum() + (q_res**2).sum() for p_res, q_res in residuals])
        return self.config.orth_reg * terms.mean()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"total_steps": torch.tensor(self.total_steps)}
        for name in self.layers:
            state[f"allocation.{name}"] = self.allocation[name]
            for k in self.sensitivity[name]:
                state[f"sensitivity.{name}.{k}"] = self.sensitivity[name][k]
                state[f"uncertainty.{name}.{k}"] = self.uncertainty[name][k]
        return state

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if "total_steps" not in tensors:
            return
        self.total_steps = int(tensors["total_steps"])
        for name in self.layers:
            self.allocation[name] = tensors[f"allocation.{name}"].to(self.allocation[name].device).clone()
            for k, ibar in self.sensitivity[name].items():
                ibar.copy_(tensors[f"sensitivity.{name}.{k}"])
                self.uncertainty[name][k].copy_(tensors[f"uncertainty.{name}.{k}"])

    def report(self, evaluate: Callable[[], dict]) -> dict:
        ranks = {name: int(layer.kept().sum()) for name, layer in self.layers.items()}
        return {
            "rank_per_module": ranks,
            "total_rank": sum(ranks.values()),
            "initial_budget": self.initial_budget,
            "target_budget": self.target_budget,
        }


# --- Hugging Face PEFT conversion -------------------------------------------------------------------------------


def _export_adalora(attachment: Attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    config: AdaLoraConfig = attachment.config
    layers: dict[str, AdaLoraLinear] = attachment.layers()
    tensors, rank_pattern = {}, {}
    for name, layer in layers.items():
        kept = layer.kept()
        tensors[f"{name}.lora_A"] = layer.lora_A[kept]  # (k, in)
        tensors[f"{name}.lora_E"] = layer.lora_E[kept]  # (k, 1)
        tensors[f"{name}.lora_B"] = layer.lora_B[:, kept]  # (out, k)
        rank_pattern[f"{name}.lora_E"] = kept.tolist()
    tensors.update(head_tensors(attachment))
    tinit, tfinal = config.tinit or 0, config.tfinal or 0
    fields = {
        "peft_type": "ADALORA",
        "init_r": config.init_r,
        "target_r": config.target_r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": list(layers),
        "modules_to_save": attachment.trainable_modules or None,
        "rank_pattern": rank_pattern,
        "tinit": tinit,
        "tfinal": tfinal,
        "deltaT": config.delta_t,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg,  # peft applies it in its own form (ours with orth_form="peft")
        # PEFT requires a positive total_step that leaves a pruning phase; it only matters to PEFT's trainer.
        "total_step": tinit + tfinal + 1,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return fields, tensors


def _import_adalora(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], weights: Path) -> Attachment:
    source = weights.parent / HF_CONFIG
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(f"{source}: {key} is set; peftlab's AdaLoRA does not implement {what}")
    triplets, rest = split_lora_tensors(tensors, weights, model, extra=("E",))
    init_r = int(cfg.get("init_r", 12))
    rank_pattern = {re.sub(r"\.lora_E$", "", k): v for k, v in (cfg.get("rank_pattern") or {}).items()}
    ours = {}
    for name, t in triplets.items():
        if set(t) != {"A", "E", "B"}:
            raise InputError(f"{weights}: module {name!r} lacks one of lora_A, lora_E, lora_B")
        kept = torch.tensor(rank_pattern.get(name, [True] * init_r), dtype=torch.bool)
        k = int(kept.sum())
        if len(kept) != init_r or t["A"].shape[0] != k or t["E"].shape != (k, 1) or t["B"].shape[1] != k:
            raise InputError(
                f"{weights}: module {name!r} has {t['A'].shape[0]} triplets, but init_r {init_r} and its "
                f"rank_pattern ({k} kept of {len(kept)}) do not fit them"
            )
        # Back to init_r triplets: kept ones in their places, pruned ones zero (a zero singular value).
        A = t["A"].new_zeros(init_r, t["A"].shape[1])
        E = t["E"].new_zeros(init_r, 1)
        B = t["B"].new_zeros(t["B"].shape[0], init_r)
        A[kept], E[kept], B[:, kept] = t["A"], t["E"], t["B"]
        ours |= {f"{name}.lora_A": A, f"{name}.lora_E": E, f"{name}.lora_B": B}
    heads = head_modules(rest, cfg.get("modules_to_save") or [], model, weights)
    config = AdaLoraConfig(
        init_r=init_r,
        target_r=min(int(cfg.get("target_r", 8)), init_r),
        alpha=float(cfg.get("lora_alpha", 8)),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        targets=list(triplets),
        tinit=int(cfg.get("tinit", 0)),
        tfinal=int(cfg.get("tfinal", 0)),
        delta_t=int(cfg.get("deltaT", 1)),
        beta1=float(cfg.get("beta1", 0.85)),
        beta2=float(cfg.get("beta2", 0.85)),
        orth_reg=float(cfg.get("orth_reg_weight", 0.5)),
        orth_form="peft",  # the weight was chosen for peft's form of the penalty
    )
    attachment = attach(model, "adalora", config, trainable_modules=heads)
    load_state(attachment, ours | rest, weights)
    return attachment


METHOD = register(
    Method(
        name="adalora",
        config=AdaLoraConfig,
        apply=apply,
        family="reparameterised",
        summary="SVD-form low-rank update whose rank budget is pruned by importance across layers",
        paper="Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for PEFT (arXiv:2303.10512)",
        # chosen on validation accuracy by `peftlab bench --suite methods --lr-grid` (docs/results.md):
        # Lambda starts at zero, so the update grows slowly at 1e-3 (74.4 % validation); 1e-2 gave 77.0 %
        lr=1e-2,
        mergeable=True,
        hooks=AdaLoraHooks,
        peft=PeftFormat("ADALORA", export=_export_adalora, load=_import_adalora),
    )
)
