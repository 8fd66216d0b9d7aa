"""Where things are in a transformer: the layer names of the architecture families peftlab knows, and its blocks.

Methods that place themselves by role rather than by name ("the key and value projections", "the feed-forward
block's output") look the role up in ``LAYOUTS``, one table for every method: (IA)^3 scales keys, values and the
feed-forward input, the bottleneck adapters sit after the attention and feed-forward outputs, UniPELT's LoRA takes
the query and value projections, LST's pruned side network copies slices of a block's projections and norms. The
first family whose names all exist in the model wins. Patterns follow the glob rule of ``peftlab.core.targets`` (the
full name or a dot-bounded suffix).

``find_blocks`` finds the transformer blocks without a table: the longest ``nn.ModuleList`` whose entries are all of
one class and hold parameters (``bert.encoder.layer``, MPNet's ``mpnet.encoder.layer``, Llama/Qwen's
``model.layers``, GPT-2's ``transformer.h``); on a tie (an encoder-decoder) the one registered last, nearest the
output. ``block_of`` says which block a module lies in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

from torch import nn

from ..errors import InputError
from .targets import find_targets

# How a feed-forward block takes its input x: forward(x), or (BERT) forward(u, x) with x the residual.
FfnInput = Literal["residual", "input"]
# Where a block's norms sit: before their sublayer (Llama: x + f(norm(x))) or after it (BERT: norm(x + f(x))).
NormPlace = Literal["pre", "post"]


@dataclass(frozen=True)
class Layout:
    """Module name patterns of one architecture family, by role."""

    query: str  # the attention's query projection (nn.Linear)
    key: str  # ... its key projection
    value: str  # ... its value projection
    attention_output: str  # the attention sublayer's output projection (nn.Linear)
    ffn_up: str  # the feed-forward sublayer's input projection (nn.Linear; a gated FFN's up projection, not its gate)
    ffn_output: str  # the feed-forward sublayer's output projection (nn.Linear): its input is the hidden activation
    ffn_block: str  # the whole feed-forward module (what a parallel adapter wraps)
    attention_norm: str  # the attention sublayer's norm (before the sublayer or after it, as ``norms`` says)
    ffn_norm: str  # the feed-forward sublayer's norm
    ffn_input: FfnInput
    norms: NormPlace


# BERT's attention output projection and its feed-forward output projection are both "*.output.dense"
# (layer.0.attention.output.dense, layer.0.output.dense); "*[0-9].output" selects only the layer's own output module.
LAYOUTS: dict[str, Layout] = {
    "BERT / RoBERTa / MiniLM / ELECTRA": Layout(
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        ffn_up="intermediate.dense",
        ffn_output="*[0-9].output.dense",
        ffn_block="*[0-9].output",
        attention_norm="attention.output.LayerNorm",
        ffn_norm="*[0-9].output.LayerNorm",
        ffn_input="residual",
        norms="post",
    ),
    "MPNet": Layout(
        query="attention.attn.q",
        key="attention.attn.k",
        value="attention.attn.v",
        attention_output="attention.attn.o",
        ffn_up="intermediate.dense",
        ffn_output="*[0-9].output.dense",
        ffn_block="*[0-9].output",
        attention_norm="attention.LayerNorm",
        ffn_norm="*[0-9].output.LayerNorm",
        ffn_input="residual",
        norms="post",
    ),
    "Llama / Qwen / Mistral / Gemma": Layout(
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attention_output="self_attn.o_proj",
        ffn_up="mlp.up_proj",
        ffn_output="mlp.down_proj",
        ffn_block="mlp",
        attention_norm="input_layernorm",
        ffn_norm="post_attention_layernorm",
        ffn_input="input",
        norms="pre",
    ),
    "DistilBERT": Layout(
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_output="attention.out_lin",
        ffn_up="ffn.lin1",
        ffn_output="ffn.lin2",
        ffn_block="ffn",
        attention_norm="sa_layer_norm",
        ffn_norm="output_layer_norm",
        ffn_input="input",
        norms="post",
    ),
}
ROLES = tuple(f.name for f in fields(Layout) if f.name not in ("ffn_input", "norms"))
# The module types a role selects: linear layers, except the feed-forward block itself and the norms (LayerNorm,
# RMSNorm: each family has its own class).
ROLE_TYPES: dict[str, tuple[type, ...]] = {role: (nn.Linear,) for role in ROLES} | {
    role: (nn.Module,) for role in ("ffn_block", "attention_norm", "ffn_norm")
}


def find_layout(
    model: nn.Module, roles: Sequence[str], protected: Sequence[str] = ()
) -> tuple[Layout, list[str]] | None:
    """The first layout in ``LAYOUTS`` whose patterns for every one of ``roles`` select modules of ``model``, and
    those modules' names in model order; None when no layout fits."""
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for layout in LAYOUTS.values():
        try:
            names = [
                n for role in roles for n in find_targets(model, [getattr(layout, role)], ROLE_TYPES[role], protected)
            ]
        except InputError:
            continue
        return layout, sorted(set(names), key=order.__getitem__)
    return None


def looked_for(roles: Sequence[str]) -> str:
    """What ``find_layout`` tried, for an error message: ``family ('pattern' and 'pattern'); ...``."""
    return "; ".join(
        f"{family} ({' and '.join(repr(getattr(layout, role)) for role in roles)})"
        for family, layout in LAYOUTS.items()
    )


def _inside(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def find_blocks(model: nn.Module, protected: Sequence[str] = (), field: str = "k") -> str:
    """Name of the transformer block list: the longest ModuleList of one block class that holds parameters (ties:
    the last one); an InputError naming ``field`` when there is none."""
    best, best_len = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or _inside(name, protected):
            continue
        holds_parameters = any(True for _ in module.parameters())
        if len({type(block) for block in module}) == 1 and holds_parameters and len(module) >= best_len:
            best, best_len = name, len(module)
    if best is None:
        raise InputError(
            f"{field}: found no transformer blocks in {type(model).__name__} "
            "(expected an nn.ModuleList of identical blocks, like bert.encoder.layer or model.layers)"
        )
    return best


def block_of(model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """(list name, index, list length) of the transformer block that module ``name`` lies in: the index after the
    outermost ``nn.ModuleList`` on its path, or None when no such list holds it."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, nn.ModuleList) and parts[i].isdigit():
            return ".".join(parts[:i]), int(parts[i]), len(parent)
    return None
