"""Bottleneck adapters: the building blocks of ``houlsby``, ``pfeiffer``, ``parallel`` and ``adapter_fusion`` (and of
the hybrids built on them), where they sit in a transformer, and AdapterDrop.

A bottleneck adapter maps a hidden state h of size d through m << d units and back::

    A(h) = W_up act(W_down h + b_down) + b_up,      W_down: (m, d),  W_up: (d, m)

with m given directly (``bottleneck``) or as d / ``reduction_factor`` (16 when neither is given). It is placed in
one of two ways (He et al. 2022 call them sequential and parallel):

- sequential (Houlsby, Pfeiffer): on the output y = P(x) of a sublayer's output projection P, inside the residual
  branch: ``y + A(y)``. In BERT-style encoders that is before the sublayer's dropout, residual add and LayerNorm
  (``LayerNorm(dropout(y + A(y)) + x)``); in Llama/Qwen decoders after ``o_proj`` / ``down_proj``, before the
  residual add. The adapter wraps P (``SequentialAdapter``).
- parallel (He et al.): beside the feed-forward block, fed with the block's input x: ``FFN(x) + s * A(x)``
  (``ParallelAdapter``). Where the block is one module, ``FFN(x)`` (Llama/Qwen ``mlp``, DistilBERT ``ffn``), the
  wrapper adds ``s * A(x)`` to its output. BERT-style encoders split the block into ``intermediate`` and an
  ``output`` module that computes ``LayerNorm(dropout(dense(u)) + x)`` from the intermediate activation u and the
  block input x; the wrapper hands it ``x + s * A(x)`` as that residual input, which gives exactly
  ``LayerNorm(dropout(FFN(x)) + s * A(x) + x)`` without touching the model's code.

Near-identity initialisation: W_down is Kaiming-uniform (as ``nn.Linear`` initialises its weight), while W_up,
b_up and b_down start at zero, so A(h) = 0 and a fresh adapter leaves the model's outputs exactly unchanged.
(Houlsby et al. draw both projections near zero for the same reason; a zero W_up makes it exact, as LoRA's B = 0.
W_down gets its first gradient once W_up has moved.)

Where the adapters sit (``bottleneck_sites``) and AdapterDrop (``adapter_drop``) have their own modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer
from ..core.layouts import FfnInput
from ..errors import InputError, PeftlabError, require

AUTO = "auto"
DEFAULT_REDUCTION = 16

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
Activation = Literal["relu", "gelu", "silu", "tanh"]


# --- the adapter itself ------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """``A(h) = W_up act(W_down h + b_down) + b_up``: (..., d) -> (..., d) through ``size`` units.

    ``trainable=False`` keeps the four tensors as buffers instead of parameters (AdapterFusion's frozen members:
    saved with the adapter, invisible to the optimiser and to the base model's signature)."""

    NAMES = ("down_weight", "down_bias", "up_weight", "up_bias")

    def __init__(
        self,
        hidden: int,
        size: int,
        activation: str = "relu",
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        trainable: bool = True,
    ):
        super().__init__()
        self.hidden, self.size, self.activation = hidden, size, activation
        tensors = {
            "down_weight": torch.empty(size, hidden, dtype=dtype, device=device),  # (m, d)
            "down_bias": torch.zeros(size, dtype=dtype, device=device),  # (m,)
            "up_weight": torch.zeros(hidden, size, dtype=dtype, device=device),  # (d, m): zero, so A(h) = 0
            "up_bias": torch.zeros(hidden, dtype=dtype, device=device),  # (d,)
        }
        nn.init.kaiming_uniform_(tensors["down_weight"], a=math.sqrt(5))
        for name, tensor in tensors.items():
            if trainable:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        down = F.linear(h, self.down_weight, self.down_bias)  # (..., m)
        return F.linear(ACTIVATIONS[self.activation](down), self.up_weight, self.up_bias)  # (..., d)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The four tensors by name (parameters or buffers)."""
        return {name: getattr(self, name) for name in self.NAMES}

    def extra_repr(self) -> str:
        return f"{self.hidden} -> {self.size} -> {self.hidden}, {self.activation}"


class BlockAdapter(AdapterLayer):
    """An adapter wrapper that belongs to one transformer block: ``block`` is the block's index (None outside a
    list of blocks), ``blocks`` how many the list holds. A ``dropped`` adapter is skipped (AdapterDrop): the wrapper
    computes its base layer alone. These adapters have no weight form, so they cannot merge."""

    def __init__(self, base: nn.Module, block: int | None = None, blocks: int | None = None):
        super().__init__(base)
        self.block, self.blocks = block, blocks
        self.dropped = False


class SequentialAdapter(BlockAdapter):
    """``y + A(y)`` with ``y = base(x)``: a bottleneck adapter on a projection layer's output (Houlsby, Pfeiffer)."""

    def __init__(self, base: nn.Linear, size: int, activation: str, block=None, blocks=None):
        super().__init__(base, block, blocks)
        w = base.weight
        self.adapter = Bottleneck(base.out_features, size, activation, dtype=w.dtype, device=w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., d)
        if self.dropped:
            return y
        return y + self.adapter(y)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {f"adapter.{name}": p for name, p in self.adapter.tensors().items()}


class ParallelAdapter(BlockAdapter):
    """``FFN(x) + s * A(x)`` from the feed-forward block's input x (He et al.).

    ``ffn_input = "input"``: ``base(x)`` is the block, ``FFN(x)``. ``"residual"``: ``base(u, x)`` is a BERT-style
    output module, ``LayerNorm(dropout(dense(u)) + x)``; it receives ``x + s * A(x)`` as its residual input."""

    def __init__(
        self,
        base: nn.Module,
        hidden: int,
        size: int,
        activation: str,
        scale: float,
        ffn_input: FfnInput,
        block: int | None = None,
        blocks: int | None = None,
    ):
        super().__init__(base, block, blocks)
        self.scale, self.ffn_input = scale, ffn_input
        w = next(base.parameters())
        self.adapter = Bottleneck(hidden, size, activation, dtype=w.dtype, device=w.device)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.dropped:
            return self.base(hidden_states, *args, **kwargs)
        if self.ffn_input == "input":
            x = hidden_states  # (..., d): the block's input
            return self.base(x, *args, **kwargs) + self.scale * self.adapter(x)
        if not args:
            raise PeftlabError(f"{type(self.base).__name__} was called without its residual input")
        x, *rest = args  # (..., d): the block's input, which the output module adds back
        return self.base(hidden_states, x + self.scale * self.adapter(x), *rest, **kwargs)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {f"adapter.{name}": p for name, p in self.adapter.tensors().items()}


# --- configuration -----------------------------------------------------------------------------------------------


DROP_HELP = {
    "drop_layers": "AdapterDrop: skip the adapters of the lowest n layers at evaluation and inference",
    "drop_train": "AdapterDrop while training: each step skips the adapters of the lowest n layers, n drawn uniformly",
    "drop_train_max": "largest n that drop_train draws (default: the number of layers - 1)",
}
DROP_DEFAULTS = {"drop_layers": 0, "drop_train": False, "drop_train_max": None}


def drop_field(name: str) -> Any:
    """One of AdapterDrop's config fields (a new ``field`` each call: every config class needs its own)."""
    return field(default=DROP_DEFAULTS[name], metadata={"help": DROP_HELP[name]})


def check_drop_fields(config: Any) -> None:
    n = config.drop_layers
    require(isinstance(n, int) and n >= 0, "drop_layers", "an integer >= 0", n)
    m = config.drop_train_max
    require(m is None or (isinstance(m, int) and m >= 0), "drop_train_max", "an integer >= 0", m)


@dataclass
class BottleneckConfig:
    """The options every bottleneck method shares (each method subclasses it, ``parallel`` adds ``scale``)."""

    bottleneck: int | None = field(
        default=None, metadata={"help": "adapter size m (give this or reduction_factor; default d / 16)"}
    )
    reduction_factor: float | None = field(
        default=None, metadata={"help": "adapter size as hidden size / factor (give this or bottleneck)"}
    )
    activation: Activation = field(default="relu", metadata={"help": "non-linearity between the projections"})
    train_layernorms: bool = field(
        default=False, metadata={"help": "also train the LayerNorms inside the layers (saved with the adapter)"}
    )
    targets: list[str] = field(
        default_factory=lambda: [AUTO],
        metadata={"help": "where adapters go: 'auto' (BERT/RoBERTa, MPNet, DistilBERT, Llama/Qwen) or module patterns"},
    )
    drop_layers: int = drop_field("drop_layers")
    drop_train: bool = drop_field("drop_train")
    drop_train_max: int | None = drop_field("drop_train_max")

    def __post_init__(self):
        both = self.bottleneck is not None and self.reduction_factor is not None
        require(not both, "bottleneck", "bottleneck or reduction_factor, not both", self.bottleneck)
        b = self.bottleneck
        require(b is None or (isinstance(b, int) and b > 0), "bottleneck", "a positive integer", b)
        f = self.reduction_factor
        require(f is None or (f >= 1 and math.isfinite(f)), "reduction_factor", "a number >= 1", f)
        require(len(self.targets) > 0, "targets", "'auto' or module name patterns", self.targets)
        require(AUTO not in self.targets or len(self.targets) == 1, "targets", "'auto' alone", self.targets)
        check_drop_fields(self)

    def size(self, hidden: int, module: str) -> int:
        """The adapter size for a layer of width ``hidden``; larger than the layer (or 0) is an error."""
        size = self.bottleneck or int(hidden // (self.reduction_factor or DEFAULT_REDUCTION))
        name = "bottleneck" if self.bottleneck else "reduction_factor"
        if not 1 <= size <= hidden:
            got = self.bottleneck if self.bottleneck else self.reduction_factor or DEFAULT_REDUCTION
            raise InputError(
                f"{name}: gives an adapter of {size} units for layer {module!r} of width {hidden}; "
                f"expected 1 to {hidden} units (got {got})"
            )
        return size
