"""Mixed-batch inference over several LoRA adapters of one base: each row of a batch picks its own adapter or none.

The serving wrapper (DESIGN: "one adapter per layer in the core; several named adapters live in an optional wrapper
used for serving"). Every adapted linear layer holds the N adapters' factors stacked and padded to a common rank R,
plus one all-zero slot that stands for "no adapter"::

    down: (N+1, in, R)     up: (N+1, R, out)      (scaling folded into up; zero rows/columns pad smaller ranks)

and for a batch with one adapter index per row, ``ids`` (B,) with -1 = base only, it computes::

    h = W0 x + b + bmm(bmm(x, down[ids]), up[ids])        x: (B, T, in) -> (B, T, R) -> (B, T, out)

Two gathers and two batched matmuls per layer, whatever the mix of adapters in the batch: no Python loop over
adapters, no sorting, no per-adapter sub-batches. Padding a rank with zeros adds exact zeros, so each row equals
that adapter run alone. PiSSA / MiLoRA adapters enter as their rank-2r factors ``[A; A0]``, ``s [B, -B0]``.

Task heads: adapters trained on different tasks carry different heads. With ``heads=True`` every adapter must
carry a linear head of the same shape (e.g. several 2-class tasks); the head is then per-row too (a gathered
weight and bias, the model's own head in the "none" slot). With ``heads=False`` every row uses the model's own head
(the adapters' bodies only), which is what mixing tasks with different label sets requires.

Usage::

    served = MultiLoraModel.from_folders(model, ["runs/a", "runs/b", "runs/c"])
    logits = served(input_ids=ids, attention_mask=mask, adapter_ids=[0, 2, -1, "b"]).logits
    with served.rows([1, -1]):  # decoders: generation with a KV cache, one adapter per prompt
        tokens = served.model.generate(prompts, max_new_tokens=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..core.adapter import adapter_layers, replace_module
from ..errors import InputError
from .library import LoraModule, check_model, read_library


class AdapterRouter:
    """The adapter index of every row of the batch being computed, shared by all layers of one wrapper."""

    def __init__(self, count: int):
        self.count = count  # N; slot N is "no adapter"
        self.slots: torch.Tensor | None = None  # (B,) long, in 0..N


class MultiLoraLinear(nn.Module):
    """``base(x) + x down[slot] up[slot]`` row by row, for a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, router: AdapterRouter):
        super().__init__()
        self.base = base
        self.router = router
        self.register_buffer("down", down.to(base.weight.dtype).contiguous())  # (N+1, in, R)
        self.register_buffer("up", up.to(base.weight.dtype).contiguous())  # (N+1, R, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (B, ..., out)
        slots = self.router.slots
        if slots is None:
            return out
        rows = check_rows(x, slots)
        x3 = x.reshape(rows, -1, x.shape[-1])  # (B, T, in)
        hidden = torch.bmm(x3, self.down[slots])  # (B, T, R)
        out3 = out.view(rows, -1, out.shape[-1])  # (B, T, out), a view of the base output
        out3.baddbmm_(hidden, self.up[slots])  # added in place: no (B, T, out) temporary
        return out


class MultiLinearHead(nn.Module):
    """A linear task head chosen per row: ``x W[slot]^T + b[slot]``; the model's own head sits in the last slot."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, original: nn.Linear, router: AdapterRouter):
        super().__init__()
        self.original = original
        self.router = router
        self.register_buffer("weight_t", weight.transpose(1, 2).contiguous())  # (N+1, in, out)
        self.register_buffer("bias", bias.contiguous())  # (N+1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slots = self.router.slots
        if slots is None:
            return self.original(x)
        rows = check_rows(x, slots)
        x3 = x.reshape(rows, -1, x.shape[-1])  # (B, T, in)
        out = torch.baddbmm(self.bias[slots][:, None, :], x3, self.weight_t[slots])  # (B, T, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def check_rows(x: torch.Tensor, slots: torch.Tensor) -> int:
    rows = slots.shape[0]
    if x.shape[0] != rows:
        raise InputError(f"adapter_ids: {rows} ids for a batch of {x.shape[0]} rows (one id per row)")
    return rows


def stack_factors(modules: Sequence[LoraModule], name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """The adapters' factors of one layer, padded to their largest rank, plus the zero slot:
    down (N+1, in, R), up (N+1, R, out)."""
    out_features, in_features = shape
    rank = max((m.factors[name][0].shape[0] for m in modules if name in m.factors), default=0)
    down = torch.zeros(len(modules) + 1, in_features, rank)
    up = torch.zeros(len(modules) + 1, rank, out_features)
    for i, m in enumerate(modules):
        if name in m.factors:
            d, u = m.factors[name]  # (r, in), (out, r)
            down[i, :, : d.shape[0]] = d.T
            up[i, : u.shape[1], :] = u.T
    return down, up


class MultiLoraModel(nn.Module):
    """A model serving N named LoRA adapters at once; ``forward(..., adapter_ids=...)`` picks one per row."""

    def __init__(self, model: nn.Module, modules: Sequence[LoraModule], heads: bool = True):
        super().__init__()
        if adapter_layers(model):
            raise InputError("model: it already carries a peftlab adapter; give the plain base model")
        check_model(model, modules)
        self.model = model
        self.names = [m.name for m in modules]
        self.router = AdapterRouter(len(modules))
        self.targets = sorted({t for m in modules for t in m.factors}, key=list(dict(model.named_modules())).index)
        for name in self.targets:
            base = model.get_submodule(name)
            if not isinstance(base, nn.Linear):
                raise InputError(f"adapters: module {name!r} is a {type(base).__name__}, expected a linear layer")
            down, up = stack_factors(modules, name, tuple(base.weight.shape))
            replace_module(model, name, MultiLoraLinear(base, down, up, self.router))
        self.heads = self.install_heads(modules) if heads else []

    def install_heads(self, modules: Sequence[LoraModule]) -> list[str]:
        """Per-row linear heads from the adapters' saved heads (each adapter must carry them, same shapes)."""
        names = sorted({k.rsplit(".", 1)[0] for m in modules for k in m.head})
        for name in names:
            original = self.model.get_submodule(name)
            keys = (f"{name}.weight", f"{name}.bias")
            if not isinstance(original, nn.Linear) or original.bias is None:
                raise InputError(f"heads: task head {name!r} is not a linear layer with a bias; use heads=False")
            for m in modules:
                if any(
                    k not in m.head or m.head[k].shape != getattr(original, k.rsplit(".", 1)[1]).shape for k in keys
                ):
                    raise InputError(
                        f"heads: adapter {m.name!r} has no task head {name!r} of shape {tuple(original.weight.shape)} "
                        "(adapters of tasks with different labels need heads=False)"
                    )
            weight = torch.stack([m.head[keys[0]].float() for m in modules] + [original.weight.detach().float()])
            bias = torch.stack([m.head[keys[1]].float() for m in modules] + [original.bias.detach().float()])
            dtype = original.weight.dtype
            replace_module(self.model, name, MultiLinearHead(weight.to(dtype), bias.to(dtype), original, self.router))
        return names

    @classmethod
    def from_folders(cls, model: nn.Module, paths: Sequence[str | Path], heads: bool = True) -> MultiLoraModel:
        return cls(model, read_library(paths), heads)

    def slots(self, adapter_ids) -> torch.Tensor:
        """Row ids (indices, names, or -1 / None for the base) as slot indices (B,) with N for "none"."""
        if isinstance(adapter_ids, torch.Tensor):
            ids = adapter_ids.to(torch.long)
        else:
            ids = torch.tensor([self.index(a) for a in adapter_ids], dtype=torch.long)
        count = len(self.names)
        if ids.ndim != 1 or (len(ids) and (int(ids.min()) < -1 or int(ids.max()) >= count)):
            raise InputError(f"adapter_ids: expected one id per row in -1..{count - 1} (-1 = no adapter)")
        device = next(self.model.parameters()).device
        return torch.where(ids < 0, count, ids).to(device)

    def index(self, adapter) -> int:
        if adapter is None:
            return -1
        if isinstance(adapter, str):
            if adapter not in self.names:
                raise InputError(f"adapter_ids: no adapter named {adapter!r} (adapters: {', '.join(self.names)})")
            return self.names.index(adapter)
        return int(adapter)

    @contextmanager
    def rows(self, adapter_ids):
        """Within this block every call of the model (``generate`` too) uses ``adapter_ids`` row by row."""
        self.router.slots = None if adapter_ids is None else self.slots(adapter_ids)
        try:
            yield self.model
        finally:
            self.router.slots = None

    def forward(self, *args, adapter_ids=None, **kwargs):
        """The wrapped model's forward; ``adapter_ids`` (one per row: index, name, or -1 / None for the base)."""
        with self.rows(adapter_ids):
            return self.model(*args, **kwargs)

    def unload(self) -> nn.Module:
        """The plain model again (every wrapped layer and head put back)."""
        for name in self.targets:
            replace_module(self.model, name, self.model.get_submodule(name).base)
        for name in self.heads:
            replace_module(self.model, name, self.model.get_submodule(name).original)
        return self.model
