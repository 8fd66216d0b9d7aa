"""LoRA: low-rank adaptation (Hu et al., 2021, https://arxiv.org/abs/2106.09685), with rsLoRA scaling and the
PiSSA / MiLoRA initialisations.

A frozen linear layer ``h = W0 x + b`` gains a trainable low-rank update::

    h = W0 x + b + s * B A x,      A: (r, in),  B: (out, r),  B = 0 at the start, so h is unchanged at step 0

with ``s = alpha / r``, or ``s = alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732), which keeps the update's scale stable as r grows. A is initialised
Kaiming-uniform (as ``nn.Linear`` is) or Gaussian with std 1/r. Merging adds ``s * B @ A`` into ``W0``; the merged
layer is a plain linear layer again and the weight difference has rank at most r.

PiSSA (Meng, Wang & Zhang, 2024, https://arxiv.org/abs/2404.02948) starts A and B from the r *principal* singular
components of ``W0 = U S V^T``, MiLoRA (Wang et al., 2024, https://arxiv.org/abs/2406.09044) from the r *minor*
ones (smallest singular values)::

    A0 = sqrt(S_r / s) V_r^T,   B0 = U_r sqrt(S_r / s),   so  s * B0 A0 = U_r S_r V_r^T

and the layer computes::

    h = W0 x + b + s * (B A - B0 A0) x          (A = A0, B = B0 at the start, so h is unchanged at step 0)

The papers instead store the residual ``W0 - s B0 A0`` in the base layer and run plain LoRA on it. Both compute the
same function; we keep ``W0`` untouched and subtract the frozen initial product ``B0 A0`` (saved with the adapter as
buffers ``lora_A0`` / ``lora_B0``) because then the model under the adapter is always the pretrained one: the
adapter loads onto a fresh pretrained base exactly, with no SVD recomputed (an SVD may differ between machines and
libraries), ``unload()`` without merging returns the pretrained model rather than a crippled residual, and the
weight difference and changed-parameter count are measured against the real pretrained weights. The cost: one more
rank-r product per forward pass while unmerged (small beside ``W0 x``), and the adapter file holds A0 and B0 as
well. Merging adds ``s (B A - B0 A0)``, a difference of rank at most 2r. Dropout acts on the input of ``B A`` only:
``B0 A0`` stands for part of the base and sees the undropped input, as it would inside a residual base layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer, replace_module
from ..core.attach import Attachment, attach, load_state
from ..core.hf_peft import HF_CONFIG, head_modules, head_tensors
from ..core.registry import Method, ParamGroup, PeftFormat, get_method, register
from ..core.targets import find_targets, matches
from ..errors import InputError, require


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "rank of the update B A"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: the update is multiplied by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input (0 skips the op)"})
    rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r) instead of alpha / r"})
    init: Literal["kaiming", "gaussian", "pissa", "milora"] = field(
        default="kaiming",
        metadata={
            "help": "initialisation: kaiming or gaussian A with B = 0; pissa or milora: A and B from the r largest "
            "or smallest singular components of W (their initial product is subtracted, so outputs start unchanged)"
        },
    )
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
    lora_plus_ratio: float = field(
        default=1.0,
        metadata={
            "help": "LoRA+ (Hayou et al. 2024): B learns at this many times A's rate (the paper suggests 16; "
            "1 is plain LoRA)"
        },
    )

    def __post_init__(self):
        require(isinstance(self.r, int) and self.r > 0, "r", "a positive integer", self.r)
        require(self.alpha > 0, "alpha", "a positive number", self.alpha)
        require(0 <= self.dropout < 1, "dropout", "a probability in [0, 1)", self.dropout)
        for pattern, r in self.rank_pattern.items():
            require(isinstance(r, int) and r > 0, f"rank_pattern.{pattern}", "a positive integer", r)
        for pattern, a in self.alpha_pattern.items():
            require(a > 0, f"alpha_pattern.{pattern}", "a positive number", a)
        ratio = self.lora_plus_ratio
        require(math.isfinite(ratio) and ratio > 0, "lora_plus_ratio", "a positive number", ratio)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha for one module: the last matching pattern wins, else the global values."""
        r = next((v for p, v in reversed(self.rank_pattern.items()) if matches(p, module_name)), self.r)
        a = next((v for p, v in reversed(self.alpha_pattern.items()) if matches(p, module_name)), self.alpha)
        return r, a


# The initialisations whose layers subtract a frozen initial product B0 A0 (kept as buffers lora_A0 / lora_B0).
INITIAL_PRODUCT_INITS = ("pissa", "milora")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """The update's scale s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def plain_factors(
    A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor | None = None, B0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update ``B A - B0 A0`` as one plain product ``B' A'``: ``A' = [A; A0]`` (2r, in), ``B' = [B, -B0]``
    (out, 2r) when there is an initial product, else A and B themselves."""
    if A0 is None:
        return A, B
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)


def singular_factors(
    weight: torch.Tensor, r: int, scaling: float, minor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's A0 (r, in) and B0 (out, r) from the r largest (or, for MiLoRA, smallest) singular components of
    ``weight``, split evenly so that ``scaling * B0 @ A0 = U_r S_r V_r^T``. The SVD runs in float32."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # (out, k), (k,), (k, in)
    keep = slice(len(S) - r, len(S)) if minor else slice(0, r)
    root = torch.sqrt(S[keep] / scaling)  # (r,)
    A0 = root[:, None] * Vh[keep]  # (r, in)
    B0 = U[:, keep] * root  # (out, r)
    return A0.to(weight.dtype), B0.to(weight.dtype)


class FusedLoraLinear(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` for a frozen ``W`` and ``b``, with a hand-written backward.

    The same arithmetic as ``base(x) + s * B(A(x))``, in fewer passes over the (tokens, features) tensors: the
    update is added by the GEMM that computes it (``addmm_`` into the base output, ``s`` folded into its alpha),
    and the input gradient ``g W + s (g B) A`` likewise takes the low-rank term inside the second GEMM. Saved for
    backward: ``x`` (which the frozen matmul would not need, but ``A``'s gradient does) and the rank-r ``x A^T``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        xa = x2 @ lora_A.t()  # (N, r)
        out = F.linear(x2, weight, bias)  # (N, out)
        out.addmm_(xa, lora_B.t(), alpha=scaling)  # (N, out): + s (x A^T) B^T
        ctx.save_for_backward(x2, xa, weight, lora_A, lora_B)
        ctx.scaling = scaling
        ctx.shape = shape
        return out.view(*shape[:-1], out.shape[-1])  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gb = g @ lora_B  # (N, r): the gradient reaching x A^T, before the factor s
        grad_A = (gb.t() @ x2).mul_(s) if ctx.needs_input_grad[3] else None  # (r, in)
        grad_B = (g.t() @ xa).mul_(s) if ctx.needs_input_grad[4] else None  # (out, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gb, lora_A, alpha=s).view(ctx.shape)  # (..., in)
        return grad_x, None, None, grad_A, grad_B, None


class LoraLinear(AdapterLayer):
    """``base(x) + scaling * (B(A(dropout(x))) - B0(A0(x)))`` around a frozen ``nn.Linear`` (``B0 A0`` only for
    PiSSA / MiLoRA; the other initialisations leave it out)."""

    fused = True  # compute through FusedLoraLinear where it applies (``fusable``); False: plain autograd ops

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "kaiming"
    ):
        super().__init__(base)
        self.r = r
        self.scaling = lora_scaling(r, alpha, rslora)
        dtype, device = self.factor_dtype_and_device()
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The frozen initial factors of PiSSA / MiLoRA (None for the other initialisations).
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)
        if init in INITIAL_PRODUCT_INITS:
            A0, B0 = singular_factors(self.pretrained_weight(), r, self.scaling, minor=init == "milora")
            A0, B0 = A0.to(dtype), B0.to(dtype)
            with torch.no_grad():
                self.lora_A.copy_(A0)
                self.lora_B.copy_(B0)
            self.lora_A0, self.lora_B0 = A0, B0
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)  # (..., out)
        if self.fusable(x):
            return FusedLoraLinear.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)
        out = self.base(x)  # (..., out)
        return out + self.lora_output(x, self.dropout(x))

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether ``FusedLoraLinear`` computes this layer's forward and backward: a plain frozen ``nn.Linear``
        base, no dropout in training, no PiSSA / MiLoRA initial product, no autocast, one dtype throughout."""
        base = self.base
        return (
            self.fused
            and not x.is_meta  # shapes only (memory estimates): the plain ops, which autocast knows nothing of here
            and type(base) is nn.Linear
            and (isinstance(self.dropout, nn.Identity) or not self.training)
            and self.lora_A0 is None
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == base.weight.dtype == self.lora_A.dtype == self.lora_B.dtype
        )

    def lora_output(self, x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """The update's contribution ``s * (B A dropped - B0 A0 x)``, (..., out); ``dropped`` is x after dropout."""
        out = F.linear(F.linear(dropped, self.lora_A), self.lora_B)  # (..., out)
        if self.lora_A0 is not None:
            out = out - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        return out * self.scaling

    def lora_weight(self) -> torch.Tensor:
        """The low-rank update as a matrix, ``s * (B A - B0 A0)``, (out, in)."""
        product = self.lora_B @ self.lora_A
        if self.lora_A0 is not None:
            product = product - self.lora_B0 @ self.lora_A0
        return product * self.scaling

    def factor_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """Where the factors live: the base weight's dtype and device (a base without ``.weight`` overrides this)."""
        return self.base.weight.dtype, self.base.weight.device

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        if self.lora_A0 is None:
            return {}
        return {"lora_A0": self.lora_A0, "lora_B0": self.lora_B0}

    def delta_weight(self) -> torch.Tensor:
        return self.lora_weight()  # (out, in)


def lora_plus_groups(config: LoraConfig) -> list[ParamGroup]:
    """LoRA+ (Hayou, Ghosh and Yu 2024, https://arxiv.org/abs/2402.12354): with A and B trained at one rate, B's
    update is too small for wide layers; B at ``lora_plus_ratio`` times A's rate fixes the imbalance."""
    if config.lora_plus_ratio == 1:
        return []
    return [ParamGroup("lora_B", config.lora_plus_ratio, why="LoRA+: B at lora_plus_ratio times A's rate")]


def check_rank(name: str, base: nn.Linear, r: int, field: str = "r") -> None:
    """A rank larger than the layer allows (min(in, out)) is an error naming the option and the layer."""
    most = min(base.in_features, base.out_features)
    if r > most:
        raise InputError(
            f"{field}: rank {r} is larger than layer {name!r} allows "
            f"(in {base.in_features}, out {base.out_features}; at most {most})"
        )


def wrap_linear_layers(
    model: nn.Module,
    targets: Sequence[str],
    protected: Sequence[str],
    rank_of: Callable[[str], int],
    make_layer: Callable[[str, nn.Linear], nn.Module],
    field: str = "r",
) -> list[str]:
    """The LoRA family's ``apply``: every ``nn.Linear`` that ``targets`` select is replaced by ``make_layer(name,
    layer)``, once every one of them is known to allow its rank ``rank_of(name)`` (so a refused rank leaves the
    model as it was). Returns the adapted layers' names, in model order."""
    names = find_targets(model, targets, (nn.Linear,), protected)
    for name in names:
        check_rank(name, model.get_submodule(name), rank_of(name), field)
    for name in names:
        replace_module(model, name, make_layer(name, model.get_submodule(name)))
    return names


def apply(
    model: nn.Module, config: LoraConfig, protected: Sequence[str] = (), layer_class: type[LoraLinear] = LoraLinear
) -> list[str]:
    """Wrap every target ``nn.Linear`` in ``layer_class`` (LoRA's own layer, or a variant such as DoRA's)."""

    def make_layer(name: str, base: nn.Linear) -> LoraLinear:
        return layer_class(base, *config.rank_and_alpha(name), config.dropout, config.rslora, config.init)

    return wrap_linear_layers(model, config.targets, protected, lambda n: config.rank_and_alpha(n)[0], make_layer)


# -- the Hugging Face PEFT format: peft_type "LORA", tensors <module>.lora_A.weight (r, in), <module>.lora_B.weight
# (out, r); per-module ranks and alphas in rank_pattern / alpha_pattern, whose keys PEFT matches as regular
# expressions against the end of the module name, first match winning. Both directions keep the numbers exact.
# PiSSA / MiLoRA adapters are written as a plain LoRA of rank 2r, [B, -B0] [A; A0], with alpha doubled (times
# sqrt(2) with rsLoRA) so the scaling is unchanged -- the form PEFT itself writes when it converts a PiSSA adapter --
# so it loads onto the unmodified pretrained base. A PEFT adapter saved with init_lora_weights="pissa" (unconverted)
# expects PEFT to redo the SVD of the base when it loads; the importer does the same. Other initialisations that
# change the base (OLoRA, CorDA, LoftQ, LoRA-GA, randomised PiSSA) are refused by name.

# PEFT LoRA options peftlab's LoRA does not implement; an adapter that turns one on is refused by name.
UNSUPPORTED = {
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "lora_bias",
    "layers_to_transform": "layers_to_transform",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA",
}


def export_lora(attachment: Attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    """A LoRA attachment (or a LoRA variant's: its config is a ``LoraConfig``) as PEFT LoRA fields and tensors."""
    config: LoraConfig = attachment.config
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    layers = attachment.layers()
    # PiSSA / MiLoRA become a rank-2r LoRA [B, -B0] [A; A0]; alpha grows so that the scaling stays the same.
    initial_product = config.init in INITIAL_PRODUCT_INITS
    rank_factor = 2 if initial_product else 1
    alpha_factor = (math.sqrt(2) if config.rslora else 2.0) if initial_product else 1.0
    for name, layer in layers.items():
        r, alpha = config.rank_and_alpha(name)
        A, B = plain_factors(layer.lora_A, layer.lora_B, layer.lora_A0, layer.lora_B0)
        tensors[f"{name}.lora_A.weight"] = A
        tensors[f"{name}.lora_B.weight"] = B
        if r != config.r:
            rank_pattern[re.escape(name)] = r * rank_factor
        if alpha != config.alpha:
            alpha_pattern[re.escape(name)] = alpha * alpha_factor
    tensors.update(head_tensors(attachment))
    fields = {
        "peft_type": "LORA",
        "r": config.r * rank_factor,
        "lora_alpha": config.alpha * alpha_factor,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": list(layers),
        "modules_to_save": attachment.trainable_modules or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return fields, tensors


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key whose regex matches the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def split_lora_tensors(
    tensors: dict[str, torch.Tensor], source: Path, model: nn.Module, extra: tuple[str, ...] = ()
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Group ``<module>.lora_<X>[.<adapter>].weight`` tensors by module (X in A, B and ``extra``); the rest are
    the task head's."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    names = "|".join(("A", "B", *extra))
    for key, value in tensors.items():
        m = re.fullmatch(rf"(.+)\.lora_({names})(?:\.[^.]+)?(?:\.weight)?", key)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = value
        elif "lora_" in key:  # a LoRA variant (embedding LoRA, ...) this importer does not handle
            raise InputError(f"{source}: tensor {key!r} belongs to a LoRA variant peftlab does not import")
        else:
            rest[key] = value
    if not lora:
        raise InputError(f"{source}: no lora_A / lora_B tensors found")
    modules = dict(model.named_modules())
    for name in lora:
        if name not in modules:
            raise InputError(f"{source}: the model has no module {name!r} (is this the adapter's base model?)")
    return lora, rest


# PEFT initialisations that leave the base weights as they were: the saved A and B are all there is to load.
PLAIN_INITS = {
    True: "kaiming",
    False: "kaiming",
    "gaussian": "gaussian",
    "eva": "kaiming",
    "orthogonal": "kaiming",
    "mica": "kaiming",
}


def lora_init(cfg: dict, source: Path) -> str:
    """peftlab's ``init`` for a PEFT ``init_lora_weights``: "pissa" (the base is changed by an exact SVD, which
    peftlab redoes), a plain init, or an InputError for an init that changes the base in a way peftlab cannot redo."""
    value = cfg.get("init_lora_weights", True)
    if value == "pissa":
        return "pissa"
    if isinstance(value, (bool, str)) and value in PLAIN_INITS:
        return PLAIN_INITS[value]
    raise InputError(
        f"{source}: init_lora_weights {value!r} changes the base weights when PEFT loads the adapter, which "
        "peftlab cannot redo; convert it to a plain LoRA first "
        "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
    )


def import_lora(
    model: nn.Module,
    cfg: dict,
    tensors: dict[str, torch.Tensor],
    weights: Path,
    method: str = "lora",
    extra: dict[str, str] | None = None,
) -> Attachment:
    """Attach a PEFT LoRA adapter as ``method`` (LoRA or a variant whose config is a ``LoraConfig``).

    ``extra`` maps further per-module PEFT tensors ``<module>.lora_<X>`` to the variant's own parameter names (DoRA:
    ``{"magnitude_vector": "magnitude"}``).
    """
    extra = extra or {}
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(f"{weights.parent / HF_CONFIG}: {key} is set; peftlab's LoRA does not implement {what}")
    init = lora_init(cfg, weights.parent / HF_CONFIG)
    lora, rest = split_lora_tensors(tensors, weights, model, extra=tuple(extra))
    for name, group in lora.items():
        lacking = sorted({"A", "B", *extra} - set(group))
        if lacking:
            raise InputError(f"{weights}: module {name!r} has no lora_{lacking[0]} tensor")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = {}, {}
    for name, pair in lora.items():
        r_i = int(pair["A"].shape[0])
        a_i = float(pattern_value(cfg.get("alpha_pattern") or {}, name, alpha))
        if r_i != r:
            rank_pattern[name] = r_i
        if a_i != alpha:
            alpha_pattern[name] = a_i
    heads = head_modules(rest, cfg.get("modules_to_save") or [], model, weights)
    config = get_method(method).config(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
        init=init,
        targets=list(lora),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    attachment = attach(model, method, config, trainable_modules=heads)
    # PiSSA's frozen initial factors come from the SVD of this base, as PEFT recomputes them on loading.
    ours = {k: v for k, v in attachment.state().items() if k.endswith((".lora_A0", ".lora_B0"))}
    for name, group in lora.items():
        ours[f"{name}.lora_A"], ours[f"{name}.lora_B"] = group["A"], group["B"]
        for theirs, own in extra.items():
            ours[f"{name}.{own}"] = group[theirs]
    load_state(attachment, ours | rest, weights)
    return attachment


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
        peft=PeftFormat("LORA", export=export_lora, load=import_lora),
        param_groups=lora_plus_groups,
    )
)
