"""Mixed storage: a frozen base kept in bf16 or fp16 beside trainable parameters kept in fp32 (master copies).

The optimiser then updates fp32 values (a bf16 parameter would lose small updates to rounding), and the forward
pass runs under autocast in the base's dtype, which casts both sides of every matrix product to it: no method needs
code of its own for a half-precision base. ``STORAGE`` maps the ``--dtype`` names to torch dtypes;
``keep_trainable_fp32`` upcasts what trains after a method is attached (``attach(..., fp32_trainable=True)`` and
``load_adapter`` call it); ``autocast_of`` gives the autocast a model of
mixed storage needs, for code that runs it outside the training loop (generation, decoding).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def keep_trainable_fp32(model: nn.Module, initial: dict[str, torch.Tensor] | None = None) -> None:
    """Upcast every trainable floating-point parameter of ``model`` (and its pretrained values in ``initial``, for an
    attachment made without ``fp32_trainable``) to fp32, in place; the frozen ones keep their dtype."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    for key, value in (initial or {}).items():
        if value.is_floating_point() and value.dtype != torch.float32:
            initial[key] = value.float()


def half_dtype(model: nn.Module) -> torch.dtype | None:
    """The half dtype (bf16 or fp16) the model's parameters are partly stored in, or None for a uniform model."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    halves = dtypes & {torch.bfloat16, torch.float16}
    return next(iter(halves)) if len(dtypes) > 1 and len(halves) == 1 else None


def autocast_of(model: nn.Module) -> Callable[[], AbstractContextManager]:
    """A factory of the autocast contexts ``model`` needs: autocast in its half dtype where storage is mixed."""
    dtype = half_dtype(model)
    if dtype is None:
        return nullcontext
    device = next(model.parameters()).device
    return lambda: torch.autocast(device.type, dtype=dtype)
