"""AdapterFusion (Pfeiffer et al., 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning,
https://arxiv.org/abs/2005.00247).

Stage one trains one adapter per task (``pfeiffer`` or ``houlsby``, each run on its own data). Stage two freezes
those N adapters and learns, at every place they sit, an attention over their outputs, plus the target task's head.
With h the output of the layer the adapters wrap (their common input) and ``Δ_n = A_n(h)`` adapter n's output::

    q = Q h,    k_n = K Δ_n,    v_n = V Δ_n,       Q, K, V: (d, d), one set per adapted layer
    s = softmax_n(q · k_n)                          (over the N adapters, at every token)
    h' = h + Σ_n s_n v_n

The paper writes the fused output as ``Σ_n s_n V z_n`` with ``z_n = h + Δ_n`` the adapter's output including its
residual; like the authors' implementation we attend over the adapters' own outputs Δ_n and add the shared residual
h once (with V = identity the two are the same, since the s_n sum to one). Q and K start as small Gaussians
(std 0.02, so the first softmax is close to uniform), V as the identity, so a fresh fusion starts near the average
of the adapters. The authors' code also anneals a softmax temperature from 50 to 1, which we leave out.

Files. ``--adapters DIR...`` names the stage-one adapter folders (or run folders holding ``adapter/``). They must
sit on the same base model as this one: their recorded base signatures (names and shapes, task heads left out,
since each task has its own head) must match, else the attach fails naming the folder and what differs. Every
adapter must be of the same method (the same places) and must not have trained LayerNorms (the base stays shared).
The frozen adapters' tensors are copied into the fusion layers as buffers and saved with the fusion adapter, and
``members`` records each one's name, method, size and activation, so a saved fusion loads with no other folder.

AdapterDrop (``--drop-layers``, ``--drop-train``) skips the fusion and its adapters in the lowest layers. Not
mergeable; not identity at attach (the adapters act from the start).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core import adapter_file
from ..core.adapter import replace_module
from ..core.registry import Method, register
from ..errors import InputError, require
from ..fileio import read_json
from .adapter_drop import AdapterDropHooks
from .bottleneck import AUTO, BlockAdapter, Bottleneck, check_drop_fields, drop_field
from .bottleneck_sites import blocks_for, find_sites, finish

FUSABLE = ("pfeiffer", "houlsby")
MEMBER = re.compile(r"^([^:]+):([a-z_]+):(\d+):([a-z]+)$")


@dataclass
class FusionConfig:
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "stage-one adapter folders or run folders (pfeiffer or houlsby, same base), two or more"},
    )
    members: list[str] = field(
        default_factory=list,
        metadata={
            "help": "filled in from --adapters: NAME:METHOD:SIZE:ACTIVATION of each frozen adapter, so a saved "
            "fusion loads without the stage-one folders"
        },
    )
    drop_layers: int = drop_field("drop_layers")
    drop_train: bool = drop_field("drop_train")
    drop_train_max: int | None = drop_field("drop_train_max")

    def __post_init__(self):
        for m in self.members:
            require(bool(MEMBER.match(m)), "members", "entries NAME:METHOD:SIZE:ACTIVATION", m)
        count = len(self.members) or len(self.adapters)
        require(count >= 2, "adapters", "two or more stage-one adapter folders", self.adapters)
        require(
            not self.members or not self.adapters or len(self.members) == len(self.adapters),
            "members",
            f"one entry per adapter folder ({len(self.adapters)})",
            self.members,
        )
        check_drop_fields(self)

    def member_specs(self) -> list[tuple[str, str, int, str]]:
        """(name, method, size, activation) of each frozen adapter."""
        specs = []
        for m in self.members:
            name, method, size, activation = MEMBER.match(m).groups()
            specs.append((name, method, int(size), activation))
        return specs


class FusionLayer(BlockAdapter):
    """``h + Σ_n s_n V Δ_n`` with ``h = base(x)``, ``Δ_n`` the frozen adapters' outputs and ``s`` the softmax over n
    of ``(Q h) · (K Δ_n)``."""

    def __init__(self, base: nn.Linear, members: Sequence[tuple[int, str]], block=None, blocks=None):
        super().__init__(base, block, blocks)
        d = base.out_features
        w = base.weight
        self.members = nn.ModuleList(
            Bottleneck(d, size, activation, dtype=w.dtype, device=w.device, trainable=False)
            for size, activation in members
        )
        self.query = nn.Parameter(torch.randn(d, d, dtype=w.dtype, device=w.device) * 0.02)  # (d, d)
        self.key = nn.Parameter(torch.randn(d, d, dtype=w.dtype, device=w.device) * 0.02)  # (d, d)
        self.value = nn.Parameter(torch.eye(d, dtype=w.dtype, device=w.device))  # (d, d)
        self.filled = False  # the frozen adapters' tensors are in (from their folders or a saved fusion)
        self.recorded: torch.Tensor | None = None  # summed attention weights while recording (N,), else None
        self.recorded_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., d)
        if self.dropped:
            return h
        if not self.filled:
            raise InputError(
                "adapter_fusion: the frozen adapters' tensors were never loaded; attach with --adapters folders that "
                "exist or load a saved fusion adapter"
            )
        deltas = torch.stack([member(h) for member in self.members], dim=-2)  # (..., N, d)
        q = F.linear(h, self.query)  # (..., d)
        k = F.linear(deltas, self.key)  # (..., N, d)
        v = F.linear(deltas, self.value)  # (..., N, d)
        weights = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1), dim=-1)  # (..., N)
        if self.recorded is not None:
            flat = weights.detach().reshape(-1, weights.shape[-1]).float()  # (tokens, N)
            self.recorded += flat.sum(0).cpu()
            self.recorded_tokens += flat.shape[0]
        return h + (weights.unsqueeze(-1) * v).sum(-2)  # (..., d)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"query": self.query, "key": self.key, "value": self.value}

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        return {f"members.{i}.{k}": t for i, m in enumerate(self.members) for k, t in m.tensors().items()}

    def on_loaded(self) -> None:
        self.filled = True


# --- stage-one folders ------------------------------------------------------------------------------------------


def adapter_folder(path: str) -> Path:
    """An adapter folder, given itself or a run folder that holds one in ``adapter/``."""
    p = Path(path)
    if not (p / adapter_file.CONFIG_FILE).exists() and (p / "adapter" / adapter_file.CONFIG_FILE).exists():
        return p / "adapter"
    return p


def member_name(path: str, taken: set[str]) -> str:
    """A short unique name: the run's dataset when the run's config.json says it, else the folder's name."""
    folder = adapter_folder(path)
    run_config = folder.parent / "config.json" if folder.name == "adapter" else None
    name = folder.name if run_config is None else folder.parent.name
    if run_config is not None and run_config.exists():
        data = str(read_json(run_config, "run config").get("data", ""))
        name = Path(data).stem if ("/" in data or "." in data) else data or name
    name = name.replace(":", "_") or "adapter"
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name}_{k}", k + 1
    taken.add(unique)
    return unique


def body_signature(signature: dict[str, list[int]], heads: Sequence[str]) -> dict[str, list[int]]:
    """A base signature without the task heads (each stage-one task has its own head)."""
    return {k: v for k, v in signature.items() if not any(k == h or k.startswith(h + ".") for h in heads)}


def check_same_body(here: dict[str, list[int]], theirs: dict[str, list[int]], source: Path) -> None:
    difference = adapter_file.base_difference(here, theirs, ("this model", "that base"), ("here", "there"))
    if difference is not None:
        raise InputError(f"adapters: {source} was trained on a different base model: {difference}")


def read_members(model: nn.Module, config: FusionConfig, protected: Sequence[str]):
    """Read the stage-one folders: (member specs, their shared targets, each member's tensors by target)."""
    if not config.adapters:
        raise InputError("adapters: expected two or more stage-one adapter folders, got none")
    here = body_signature(adapter_file.base_signature(model), protected)
    specs, tensors, targets, taken = [], [], None, set()
    for path in config.adapters:
        if not (adapter_folder(path) / adapter_file.CONFIG_FILE).exists():
            raise InputError(f"adapters: {path}: adapter folder not found (expected {adapter_file.CONFIG_FILE} inside)")
        folder, meta = adapter_file.read_adapter_meta(adapter_folder(path))
        check_same_body(here, body_signature(meta["base"]["parameters"], meta["trainable_modules"]), folder)
        method, options = meta["method"], meta["config"]
        if method not in FUSABLE:
            raise InputError(f"adapters: {folder} holds a {method!r} adapter; fusion combines {' or '.join(FUSABLE)}")
        if options.get("targets", [AUTO]) != [AUTO]:
            raise InputError(f"adapters: {folder} was trained at chosen --targets; fusion uses the default places")
        if options.get("train_layernorms"):
            raise InputError(f"adapters: {folder} trained the LayerNorms; fusion needs adapters over one frozen base")
        if specs and method != specs[0][1]:
            raise InputError(f"adapters: {folder} holds a {method!r} adapter but the first holds {specs[0][1]!r}")
        targets = meta["targets"]
        if targets != sites(model, method, protected):
            raise InputError(f"adapters: {folder} adapts other layers than {method!r} does on this model")
        weights = adapter_file.read_tensors(folder / adapter_file.WEIGHTS_FILE)
        own = {t: {k: weights[f"{t}.adapter.{k}"] for k in Bottleneck.NAMES} for t in targets}
        sizes = {own[t]["down_weight"].shape[0] for t in targets}
        if len(sizes) != 1:
            raise InputError(f"adapters: {folder} has adapters of different sizes {sorted(sizes)}; fusion needs one")
        specs.append((member_name(path, taken), method, sizes.pop(), options.get("activation", "relu")))
        tensors.append(own)
    return specs, targets, tensors


def sites(model: nn.Module, method: str, protected: Sequence[str]) -> list[str]:
    """The layers a stage-one adapter of ``method`` sits at in this model (its default places)."""
    kinds = ["attention_output", "ffn_output"] if method == "houlsby" else ["ffn_output"]
    return find_sites(model, [AUTO], kinds, protected)[0]


def apply(model: nn.Module, config: FusionConfig, protected: Sequence[str] = ()) -> list[str]:
    """Wrap the layers the stage-one adapters sit at in ``FusionLayer`` and copy the frozen adapters in.

    Without ``members`` (a fresh fusion) the ``adapters`` folders are read and ``members`` is filled in. With
    ``members`` (loading a saved fusion, or a rerun from its config.json) the folders are read only when they are
    all there and still hold the recorded adapters; otherwise the frozen adapters stay empty for the saved fusion
    adapter to fill, and a forward pass before that is an error."""
    tensors = None
    if not config.members:
        specs, names, tensors = read_members(model, config, protected)
        config.members = [f"{n}:{m}:{size}:{act}" for n, m, size, act in specs]
    else:
        try:
            specs, names, tensors = read_members(model, config, protected) if config.adapters else (None, None, None)
        except InputError:
            specs = None
        if specs is None or [s[1:] for s in specs] != [s[1:] for s in config.member_specs()]:
            tensors = None
        methods = {s[1] for s in config.member_specs()}
        require(len(methods) == 1 and methods <= set(FUSABLE), "members", f"one method of {FUSABLE}", config.members)
        names = sites(model, methods.pop(), protected)
    blocks = blocks_for(model, names, config)
    members = [(size, activation) for _, _, size, activation in config.member_specs()]
    for name in names:
        layer = FusionLayer(model.get_submodule(name), members, *blocks[name])
        if tensors is not None:
            with torch.no_grad():
                for member, own in zip(layer.members, tensors, strict=True):
                    for key, value in member.tensors().items():
                        value.copy_(own[name][key])
            layer.filled = True
        replace_module(model, name, layer)
    finish(model, config, names)
    return names


# --- what the fusion attends to ---------------------------------------------------------------------------------


class FusionHooks(AdapterDropHooks):
    """AdapterDrop while training, and a report of the mean attention each adapter gets per layer on the validation
    set (over every token position, padding included)."""

    def __init__(self, attachment, config: FusionConfig):
        super().__init__(attachment, config)
        self.names = [spec[0] for spec in config.member_specs()]
        self.fusion = {name: layer for name, layer in attachment.layers().items() if isinstance(layer, FusionLayer)}

    def report(self, evaluate: Callable[[], dict]) -> dict:
        out = super().report(evaluate)
        for layer in self.fusion.values():
            layer.recorded = torch.zeros(len(self.names))
            layer.recorded_tokens = 0
        evaluate()
        attention = {}
        for name, layer in self.fusion.items():
            if layer.recorded_tokens:
                mean = (layer.recorded / layer.recorded_tokens).tolist()
                attention[name] = {n: round(w, 4) for n, w in zip(self.names, mean, strict=True)}
            layer.recorded = None
        return out | {"members": self.names, "mean_attention": attention}


METHOD = register(
    Method(
        name="adapter_fusion",
        config=FusionConfig,
        apply=apply,
        family="additive",
        summary="attention over frozen stage-one task adapters at every layer (query: the layer output), plus the head",
        paper="Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning "
        "(arXiv:2005.00247)",
        lr=1e-3,
        mergeable=False,
        identity_at_init=False,
        hooks=FusionHooks,
    )
)
