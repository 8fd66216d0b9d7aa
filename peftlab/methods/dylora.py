"""DyLoRA: one LoRA trained for every rank up to r (Valipour et al., 2023, https://arxiv.org/abs/2210.07558).

A LoRA of rank r whose rank can be chosen after training without retraining. At every training step one rank
b is drawn uniformly from 1..r (the same b for every layer) and every layer computes the truncated update::

    h = W0 x + b_0 + (alpha / b) * B[:, :b] A[:b] x,     A: (r, in),  B: (out, r),  B = 0 at the start

so the first rows of A and columns of B learn to carry the most information, as in nested dropout. Outside
training a layer uses its serving rank (the config's ``rank``, r by default; ``set_rank(attachment, b)`` changes
it), and merging adds that truncated update to ``W0``.

Which rows and columns train. The paper's Algorithm 1 updates only "the unique parameters of the selected rank":
the b-th row of A and the b-th column of B; the lower ones are used in the forward pass but do not change in that
step. That is ``frozen = true``: rows and columns below b are detached, so only the b-th gets a gradient, and after
the optimiser step every other row and column is put back as it was, so AdamW's momentum and weight decay do not
move them either. The default here is ``frozen = false``: every step trains all of ``A[:b]`` and ``B[:, :b]``
(plain backpropagation through the truncated factors), so the lower components, drawn into more steps, still learn
the most and every rank 1..r still serves. Chosen on validation: under the methods suite's budget (200 steps of 16,
MiniLM / Rotten Tomatoes) the paper's scheme gives each component about 1/r of the steps and reached 76.8 %
validation accuracy at its best rate (1e-2), the full update 80.0 % at 3e-3 (LoRA: 79.5 %). Rows and columns beyond
b stay as they were in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer
from ..core.attach import Attachment
from ..core.hf_peft import head_tensors
from ..core.hooks import StepRandom, TrainingHooks
from ..core.registry import Method, PeftFormat, register
from ..errors import PeftlabError, require
from .lora import wrap_linear_layers


@dataclass
class DyLoraConfig:
    r: int = field(default=8, metadata={"help": "largest rank; every rank 1..r works after training"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: a rank-b update is multiplied by alpha / b"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0 skips the op)"})
    rank: int | None = field(
        default=None, metadata={"help": "rank used for evaluation, merging and inference, 1..r (default: r)"}
    )
    frozen: bool = field(
        default=False,
        metadata={"help": "each step trains only the sampled b-th row of A and column of B (the paper); else all <= b"},
    )
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module name patterns to adapt (glob over names; 'all-linear' = every linear layer)"},
    )

    def __post_init__(self):
        require(isinstance(self.r, int) and self.r > 0, "r", "a positive integer", self.r)
        require(self.alpha > 0, "alpha", "a positive number", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)", self.dropout)
        require(
            self.rank is None or (isinstance(self.rank, int) and 1 <= self.rank <= self.r),
            "rank",
            f"an integer from 1 to r = {self.r}",
            self.rank,
        )

    @property
    def serving_rank(self) -> int:
        return self.r if self.rank is None else self.rank


class DyLoraLinear(AdapterLayer):
    """``base(x) + alpha / b * B[:, :b](A[:b](dropout(x)))`` around a frozen ``nn.Linear``; b is the active rank."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rank: int | None = None):
        super().__init__(base)
        self.r = r
        self.alpha = alpha
        self.rank = r if rank is None else rank  # the serving rank
        self.sampled_rank: int | None = None  # this training step's b, set by the hooks
        self.frozen = True
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def active_rank(self) -> int:
        return self.sampled_rank if self.sampled_rank is not None else self.rank

    def truncated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:b] (b, in) and B[:, :b] (out, b); in frozen mode only row/column b - 1 keeps its gradient."""
        b = self.active_rank
        A, B = self.lora_A[:b], self.lora_B[:, :b]
        if self.frozen and self.sampled_rank is not None and b > 1:
            A = torch.cat([A[: b - 1].detach(), A[b - 1 :]], dim=0)
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 :]], dim=1)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:
            return out
        A, B = self.truncated()
        return out + F.linear(F.linear(self.dropout(x), A), B) * (self.alpha / self.active_rank)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        b = self.active_rank
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * (self.alpha / b)  # (out, in)


def apply(model: nn.Module, config: DyLoraConfig, protected: Sequence[str] = ()) -> list[str]:
    def make_layer(_: str, base: nn.Linear) -> DyLoraLinear:
        layer = DyLoraLinear(base, config.r, config.alpha, config.dropout, config.rank)
        layer.frozen = config.frozen
        return layer

    return wrap_linear_layers(model, config.targets, protected, lambda _: config.r, make_layer)


def set_rank(attachment: Attachment, rank: int) -> None:
    """Serve every DyLoRA layer at ``rank`` (1..r) from now on; the config records it, so a saved adapter keeps it."""
    config: DyLoraConfig = attachment.config
    require(isinstance(rank, int) and 1 <= rank <= config.r, "rank", f"an integer from 1 to r = {config.r}", rank)
    if attachment.merged:
        raise PeftlabError("unmerge the adapter before changing its rank")
    for layer in attachment.layers().values():
        layer.rank = rank
    config.rank = rank


def report_ranks(r: int) -> list[int]:
    """1, 2, 4, ... up to r, and r itself."""
    ranks = [2**k for k in range(r.bit_length()) if 2**k <= r]
    return ranks if ranks[-1] == r else [*ranks, r]


class DyLoraHooks(TrainingHooks):
    """Draws each step's rank b from a generator seeded by the step (``StepRandom``: every data-parallel process and a
    resumed run draw the same b) and keeps the rows and columns that step does not train exactly as they were."""

    def __init__(self, attachment: Attachment, config: DyLoraConfig):
        self.config = config
        self.random = StepRandom()
        self.layers: dict[str, DyLoraLinear] = attachment.layers()
        self.before: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def before_step(self, step: int) -> None:
        b = int(torch.randint(1, self.config.r + 1, (), generator=self.random.generator(step)).item())
        for layer in self.layers.values():
            layer.sampled_rank = b

    def after_backward(self, step: int) -> None:
        self.before = {
            name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in self.layers.items()
        }

    @torch.no_grad()
    def after_step(self, step: int, optimizer, scheduler) -> None:
        for name, layer in self.layers.items():
            b = layer.sampled_rank
            trained = slice(b - 1 if self.config.frozen else 0, b)  # the rows of A / columns of B this step trains
            A, B = self.before[name]
            A[trained], B[:, trained] = layer.lora_A[trained], layer.lora_B[:, trained]
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            layer.sampled_rank = None  # evaluation between steps uses the serving rank
        self.before = {}

    def report(self, evaluate: Callable[[], dict]) -> dict:
        serving = self.config.serving_rank
        by_rank = {}
        for b in report_ranks(self.config.r):
            for layer in self.layers.values():
                layer.rank = b
            by_rank[str(b)] = evaluate()
        for layer in self.layers.values():
            layer.rank = serving
        return {"serving_rank": serving, "validation_by_rank": by_rank}


def _export_dylora(attachment: Attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    """A DyLoRA adapter at its serving rank b is exactly a LoRA of rank b: A[:b], B[:, :b], alpha / b."""
    config: DyLoraConfig = attachment.config
    layers: dict[str, DyLoraLinear] = attachment.layers()
    b = config.serving_rank
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A.weight"] = layer.lora_A[:b]
        tensors[f"{name}.lora_B.weight"] = layer.lora_B[:, :b]
    tensors.update(head_tensors(attachment))
    fields = {
        "peft_type": "LORA",
        "r": b,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": False,
        "target_modules": list(layers),
        "modules_to_save": attachment.trainable_modules or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return fields, tensors


def caution(model: nn.Module, config: DyLoraConfig, total_steps: int) -> str | None:
    """DyLoRA (frozen, the paper's scheme) trains one of its r rank components per step."""
    if not config.frozen or config.r == 1:
        return None
    return (
        f"DyLoRA trains one of its r = {config.r} rank components per step, so each gets about "
        f"{max(total_steps // config.r, 1)} of the {total_steps} steps: expect it to need several times LoRA's "
        "steps to match it (or --no-frozen, which trains every rank up to the sampled one)"
    )


METHOD = register(
    Method(
        name="dylora",
        config=DyLoraConfig,
        apply=apply,
        family="reparameterised",
        summary="LoRA trained at a random rank b <= r each step, so any rank 1..r can be served afterwards",
        paper="Valipour et al. 2023, DyLoRA: Dynamic Search-Free Low-Rank Adaptation (arXiv:2210.07558)",
        # chosen on validation accuracy (methods suite, docs/results.md): with every component up to b training
        # each step, 1e-3 gave 78.7 % validation, 3e-3 80.0 %; the paper's one-component-per-step scheme
        # (frozen = true) wants a larger step (1e-3: 73.3 %, 3e-3: 76.2 %, 1e-2: 76.8 %)
        lr=3e-3,
        mergeable=True,
        hooks=DyLoraHooks,
        peft=PeftFormat("LORA", export=_export_dylora),  # a plain LoRA at the serving rank; imported as ``lora``
        caution=caution,
    )
)
