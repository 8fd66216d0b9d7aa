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

Where the layers sit. ``targets = ["auto"]`` looks the layers up in ``peftlab.core.layouts.LAYOUTS``, the table
of layer names per architecture family (first one that fits wins); otherwise ``targets`` are module name patterns
(the glob rule of ``peftlab.core.targets``) naming the projections for sequential adapters or the feed-forward
modules (``FFN(x)``) for parallel ones. Each adapter's transformer block is found generically
(``peftlab.core.layouts.block_of``): the index after the outermost ``nn.ModuleList`` in its module name
(``bert.encoder.layer.3.output.dense`` -> block 3 of ``bert.encoder.layer``).

``train_layernorms``: the normalisation layers inside the transformer blocks (LayerNorm, RMSNorm: every module
in the blocks whose class name ends in ``Norm``) train too, as Houlsby et al. do; they are saved in the adapter
file with the adapters. Embedding and final norms stay frozen.

AdapterDrop (Rücklé et al. 2021, https://arxiv.org/abs/2010.11918): the adapters of the lowest n blocks are
skipped, so those blocks run at the plain model's cost. ``drop_layers`` is the fixed n for evaluation and
inference (saved in the config); with ``drop_train`` every training step draws its own n uniformly from
0..``drop_train_max`` (default: blocks - 1, the paper's robust AdapterDrop) from a generator seeded by the step,
so data-parallel processes and a resumed run draw the same n. A fixed ``drop_layers`` without ``drop_train`` also holds
during training (the paper's specialised AdapterDrop). ``drop_speed`` measures what dropping saves.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer, replace_module
from ..core.hooks import StepRandom, TrainingHooks
from ..core.layouts import ROLE_TYPES, FfnInput, block_of, find_layout, looked_for
from ..core.targets import find_targets
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


# --- where the adapters go ---------------------------------------------------------------------------------------


def find_sites(
    model: nn.Module, targets: list[str], kinds: Sequence[str], protected: Sequence[str]
) -> tuple[list[str], FfnInput]:
    """Module names for the site ``kinds`` (roles of ``peftlab.core.layouts.Layout``), in model order, and how a
    feed-forward block takes its input. ``targets = ["auto"]`` tries the known layouts in order; patterns select
    modules directly (for a parallel adapter they name modules that compute ``FFN(x)`` from x)."""
    if targets != [AUTO]:
        types = tuple({t for kind in kinds for t in ROLE_TYPES[kind]})
        return find_targets(model, targets, types, protected), "input"
    found = find_layout(model, kinds, protected)
    if found is None:
        raise InputError(
            f"targets: 'auto' found none of the known layer layouts here (looked for {looked_for(kinds)}); "
            "give --targets module name patterns"
        )
    layout, names = found
    return names, layout.ffn_input


def blocks_for(model: nn.Module, names: list[str], config: Any) -> dict[str, tuple[int | None, int | None]]:
    """name -> (block index, number of blocks) for every site; AdapterDrop needs them all in one list of blocks."""
    found = {n: block_of(model, n) for n in names}
    lists = {f[0] for f in found.values() if f is not None}
    dropping = config.drop_layers > 0 or config.drop_train
    outside = [n for n, f in found.items() if f is None]
    if dropping and (outside or len(lists) > 1):
        where = f"module {outside[0]!r} is in no list of layers" if outside else f"they lie in {sorted(lists)}"
        raise InputError(f"drop_layers: AdapterDrop needs every adapter inside one list of layers; {where}")
    out = {n: (f[1], f[2]) if f else (None, None) for n, f in found.items()}
    if dropping:
        blocks = next(iter(out.values()))[1]
        require(
            config.drop_layers <= blocks, "drop_layers", f"at most {blocks} (the model's layers)", config.drop_layers
        )
        m = config.drop_train_max
        require(m is None or m < blocks, "drop_train_max", f"at most {blocks - 1} (the model's layers - 1)", m)
    return out


def train_block_norms(model: nn.Module, names: list[str]) -> list[str]:
    """Unfreeze the normalisation layers inside the blocks holding ``names``; returns their module names."""
    lists = {f[0] for f in (block_of(model, n) for n in names) if f is not None}
    norms = [
        n
        for n, m in model.named_modules()
        if any(n.startswith(f"{root}.") for root in lists)
        and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("Norm"))
        and any(True for _ in m.parameters(recurse=False))
    ]
    if not norms:
        raise InputError("train_layernorms: found no LayerNorm or RMSNorm inside the adapted layers")
    for n in norms:
        model.get_submodule(n).requires_grad_(True)
    return norms


def apply_sequential(
    model: nn.Module,
    config: BottleneckConfig,
    protected: Sequence[str],
    kinds: Sequence[str],
    layer_class: type[SequentialAdapter] = SequentialAdapter,
) -> list[str]:
    """Wrap the projections of ``kinds`` (``attention_output``, ``ffn_output``) in ``layer_class``
    (``SequentialAdapter`` or a subclass, such as UniPELT's gated one)."""
    names, _ = find_sites(model, config.targets, kinds, protected)
    blocks = blocks_for(model, names, config)
    for name in names:
        base = model.get_submodule(name)
        size = config.size(base.out_features, name)
        replace_module(model, name, layer_class(base, size, config.activation, *blocks[name]))
    finish(model, config, names)
    return names


def apply_parallel(model: nn.Module, config: Any, protected: Sequence[str]) -> list[str]:
    """Wrap every feed-forward block in ``ParallelAdapter`` (``config.scale`` is s)."""
    names, ffn_input = find_sites(model, config.targets, ["ffn_block"], protected)
    blocks = blocks_for(model, names, config)
    for name in names:
        base = model.get_submodule(name)
        linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise InputError(
                f"targets: module {name!r} holds no linear layer; a parallel adapter wraps a feed-forward block"
            )
        # The block's width: its first layer's input (FFN(x)), or its output layer's width (residual form).
        hidden = linears[0].in_features if ffn_input == "input" else linears[-1].out_features
        size = config.size(hidden, name)
        layer = ParallelAdapter(base, hidden, size, config.activation, config.scale, ffn_input, *blocks[name])
        replace_module(model, name, layer)
    finish(model, config, names)
    return names


def finish(model: nn.Module, config: Any, names: list[str]) -> None:
    """LayerNorms to train, and the inference AdapterDrop."""
    if getattr(config, "train_layernorms", False):
        train_block_norms(model, names)
    if config.drop_layers:
        for name in names:
            layer = model.get_submodule(name)
            layer.dropped = layer.block < config.drop_layers


# --- AdapterDrop -------------------------------------------------------------------------------------------------


def block_adapters(attachment) -> list[BlockAdapter]:
    return [layer for layer in attachment.layers().values() if isinstance(layer, BlockAdapter)]


def drop_lowest(layers: Sequence[BlockAdapter], n: int) -> None:
    """Skip the adapters of blocks 0..n-1; every other adapter runs."""
    for layer in layers:
        layer.dropped = layer.block is not None and layer.block < n


def set_drop(attachment, n: int) -> None:
    """From now on skip the adapters of the lowest ``n`` layers; the config records it, so a saved adapter keeps it."""
    layers = block_adapters(attachment)
    blocks = max((layer.blocks or 0) for layer in layers)
    require(isinstance(n, int) and 0 <= n <= blocks, "drop_layers", f"an integer from 0 to {blocks}", n)
    if n and any(layer.block is None for layer in layers):
        raise InputError("drop_layers: AdapterDrop needs every adapter inside one list of layers")
    drop_lowest(layers, n)
    attachment.config.drop_layers = n


class AdapterDropHooks(TrainingHooks):
    """With ``drop_train``, each step skips the adapters of the lowest n layers, n drawn uniformly from
    0..``drop_train_max`` by a generator seeded by the step (``StepRandom``: data-parallel processes and a resumed
    run draw the same n); between steps
    the config's fixed ``drop_layers`` holds. ``report`` gives the validation metrics at n = 0, layers / 4,
    layers / 2 and layers - 1."""

    def __init__(self, attachment, config):
        self.config = config
        self.layers = block_adapters(attachment)
        self.blocks = max((layer.blocks or 0) for layer in self.layers)
        self.largest = config.drop_train_max if config.drop_train_max is not None else max(self.blocks - 1, 0)
        self.drawn: list[int] = []  # n of every step so far in this process (for tests and curiosity)
        self.random = StepRandom()

    def before_step(self, step: int) -> None:
        if self.config.drop_train:
            n = int(torch.randint(0, self.largest + 1, (), generator=self.random.generator(step)).item())
            self.drawn.append(n)
            drop_lowest(self.layers, n)

    def after_step(self, step: int, optimizer, scheduler) -> None:
        if self.config.drop_train:
            drop_lowest(self.layers, self.config.drop_layers)

    def report(self, evaluate: Callable[[], dict]) -> dict:
        if not self.config.drop_train or not self.blocks:
            return {}
        by_n = {}
        for n in sorted({0, self.blocks // 4, self.blocks // 2, self.blocks - 1}):
            drop_lowest(self.layers, n)
            by_n[str(n)] = evaluate()
        drop_lowest(self.layers, self.config.drop_layers)
        return {"drop_layers": self.config.drop_layers, "validation_by_drop_layers": by_n}


@torch.no_grad()
def forward_seconds(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass of ``model`` on ``batch`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        model(**batch)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    model.train(was_training)
    return statistics.median(times)


def drop_speed(
    attachment, batch: dict[str, torch.Tensor], drops: Sequence[int], repeats: int = 20, plain: nn.Module | None = None
) -> dict[int | str, float]:
    """AdapterDrop's inference gain: median forward seconds with the adapters of the lowest n layers skipped, for
    each n in ``drops``, and for ``plain`` (the model without adapters, under ``"plain"``) when given. The settings
    take turns round by round, so a slow patch of a shared machine hits all of them alike. The attachment's own
    ``drop_layers`` is restored afterwards."""
    layers = block_adapters(attachment)
    times: dict[int | str, list[float]] = {n: [] for n in drops} | ({"plain": []} if plain is not None else {})
    for _ in range(repeats):
        for n in drops:
            drop_lowest(layers, n)
            times[n].append(forward_seconds(attachment.model, batch, repeats=1, warmup=1))
        if plain is not None:
            times["plain"].append(forward_seconds(plain, batch, repeats=1, warmup=1))
    drop_lowest(layers, attachment.config.drop_layers)
    return {n: statistics.median(t) for n, t in times.items()}
