"""Where the bottleneck adapters sit (``houlsby``, ``pfeiffer``, ``parallel``, ``adapter_fusion``, the hybrids).

``targets = ["auto"]`` looks the layers up in ``peftlab.core.layouts.LAYOUTS``, the table
of layer names per architecture family (first one that fits wins); otherwise ``targets`` are module name patterns
(the glob rule of ``peftlab.core.targets``) naming the projections for sequential adapters or the feed-forward
modules (``FFN(x)``) for parallel ones. Each adapter's transformer block is found generically
(``peftlab.core.layouts.block_of``): the index after the outermost ``nn.ModuleList`` in its module name
(``bert.encoder.layer.3.output.dense`` -> block 3 of ``bert.encoder.layer``).

``train_layernorms``: the normalisation layers inside the transformer blocks (LayerNorm, RMSNorm: every module
in the blocks whose class name ends in ``Norm``) train too, as Houlsby et al. do; they are saved in the adapter
file with the adapters. Embedding and final norms stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.adapter import replace_module
from ..core.layouts import ROLE_TYPES, FfnInput, block_of, find_layout, looked_for
from ..core.targets import find_targets
from ..errors import InputError, require
from .bottleneck import AUTO, BottleneckConfig, ParallelAdapter, SequentialAdapter


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
