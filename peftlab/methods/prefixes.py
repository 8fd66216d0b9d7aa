"""Trainable key/value prefixes in every attention layer: the code prefix tuning and P-tuning v2 share.

Every attention module that routes through transformers' attention interface (found by ``core.attention`` with
one probe pass) is wrapped in a ``PrefixAttention`` layer, and its keys and values gain P positions in front::

    attention_l(x) = softmax(q [K_l; k(x)]^T / sqrt(d_head)) [V_l; v(x)]      K_l, V_l: (kv_heads, P, d_head)

Every query sees all P prefix positions (padding and causality among the real tokens are kept). The prefixes are
the same for every example (B-independent) and enter through ``core.attention.extend_keys_values``, the one
mechanism for methods inside attention; the model's source is not touched.

The prefixes are either trained directly (``prefix_keys`` / ``prefix_values`` per layer) or computed by Li &
Liang's reparameterisation, one MLP for all layers at once::

    [K_1; V_1; ...; K_L; V_L] = W2 tanh(W1 P' + b1) + b2        P': (P, d_in) learned inputs

(``PrefixMLP``; layer l reads its own rows of W2, laid out as Hugging Face PEFT lays them: layer 0 keys, layer 0
values, layer 1 keys, ...; d_in is the width of one layer's keys, as in PEFT). The MLP is shared by all wrappers
and owned (saved) by the first; ``fold`` computes it once into per-layer prefixes.

Positions: with ``shift_positions`` (the default) the real tokens' position ids start at P, as when the prefix is
a prefilled KV cache. That is what Hugging Face PEFT does (it passes the prefix as ``past_key_values``) and what
both papers' code did (GPT-2 and BERT count positions on from the cached length), so a PEFT adapter gives the same
outputs here, RoPE models included: their prefix keys carry no rotation and the queries are rotated to positions
P, P+1, ... Turning it off keeps the pretrained positions 0, 1, ... (an empty prefix is then exactly the
identity); such an adapter cannot be exported to PEFT. Shifting needs a model whose forward takes
``position_ids``; a learned position table with a padding index (RoBERTa's) counts from padding_idx + 1, as the
model itself does, and the table must hold P more positions than the longest input.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.adapter import AdapterLayer, replace_module
from ..core.attach import attach, load_state
from ..core.attention import attention_modules, extend_keys_values, remove_extension, restore
from ..core.hf_peft import HF_CONFIG, head_modules, head_tensors
from ..core.kv_cache import cache_length
from ..core.registry import ParamGroup
from ..errors import InputError, require


@dataclass
class PrefixOptions:
    """The prefix options, one definition for prefix tuning and the hybrids that contain it (MAM, UniPELT), whose
    configs derive from it (each may change a default: MAM's paper uses 30 positions, UniPELT's 10)."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix length P: key/value positions per layer"})
    projection: bool = field(
        default=True, metadata={"help": "train the prefixes through an MLP (folded into the prefixes when saved)"}
    )
    encoder_hidden: int = field(default=512, metadata={"help": "hidden size of the prefix MLP"})
    shift_positions: bool = field(
        default=True, metadata={"help": "real tokens' positions start at P, as after a KV cache (as PEFT does)"}
    )
    keep_encoder: bool = field(default=False, metadata={"help": "save the prefix MLP instead of the prefixes"})
    mlp_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "the prefix MLP learns at this times the run's rate (each prefix entry sums the same-signed "
            "updates of every hidden unit, so the MLP multiplies Adam's step on the prefixes)"
        },
    )

    def __post_init__(self):
        require(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
            "num_virtual_tokens",
            "a positive integer",
            self.num_virtual_tokens,
        )
        require(
            isinstance(self.encoder_hidden, int) and self.encoder_hidden > 0,
            "encoder_hidden",
            "a positive integer",
            self.encoder_hidden,
        )
        scale = self.mlp_lr_scale
        require(math.isfinite(scale) and scale > 0, "mlp_lr_scale", "a positive number", scale)

    def param_groups(self) -> list[ParamGroup]:
        """The prefix MLP at its own rate, when ``mlp_lr_scale`` says so."""
        if not self.projection or self.mlp_lr_scale == 1:
            return []
        return [ParamGroup("mlp.*", self.mlp_lr_scale, why="the prefix MLP at mlp_lr_scale times the rate")]

    @property
    def mlp_hidden(self) -> int | None:
        """The prefix MLP's hidden size, or None when the prefixes train directly."""
        return self.encoder_hidden if self.projection else None

    def folded(self):
        """This config with the MLP folded away (``projection = False``), or None when there is nothing to fold."""
        if not self.projection or self.keep_encoder:
            return None
        return dataclasses.replace(self, projection=False)


class PrefixMLP(nn.Module):
    """P learned inputs (P, d_in) -> tanh MLP -> every layer's key and value prefixes."""

    def __init__(self, count: int, width: int, hidden: int, shapes: list[tuple[int, int]]):
        super().__init__()
        self.count = count
        self.shapes = shapes  # (kv_heads, head_dim) per layer
        self.inputs = nn.Parameter(torch.randn(count, width))  # (P, d_in)
        self.hidden = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, sum(2 * heads * dim for heads, dim in shapes))
        sizes = [2 * heads * dim for heads, dim in shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s keys and values, each (kv_heads, P, head_dim)."""
        heads, dim = self.shapes[index]
        rows = slice(self.offsets[index], self.offsets[index] + 2 * heads * dim)
        h = torch.tanh(self.hidden(self.inputs))  # (P, hidden)
        flat = F.linear(h, self.out.weight[rows], self.out.bias[rows])  # (P, 2 * kv_heads * head_dim)
        keys, values = flat.view(self.count, 2, heads, dim).permute(1, 2, 0, 3)  # 2 x (kv_heads, P, head_dim)
        return keys, values


class PrefixAttention(AdapterLayer):
    """Wraps one attention module (its forward is unchanged) and holds its P key/value prefixes: trained directly,
    or read from a shared ``PrefixMLP`` (the first wrapper owns it and saves it)."""

    def __init__(self, base: nn.Module, count: int, kv_heads: int, head_dim: int, index: int, mlp=None, owner=False):
        super().__init__(base)
        self.index = index
        self.shared = (mlp,) if mlp is not None else ()  # a tuple: only the owner registers the MLP as a submodule
        self.mlp = mlp if owner else None
        self.undo: list[Callable[[], None]] = []  # model-level changes this wrapper takes back on unload
        if mlp is None:
            like = next(base.parameters())
            shape = (kv_heads, count, head_dim)
            self.prefix_keys = nn.Parameter(torch.randn(shape, device=like.device, dtype=like.dtype))
            self.prefix_values = nn.Parameter(torch.randn(shape, device=like.device, dtype=like.dtype))

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values, each (kv_heads, P, head_dim)."""
        if self.shared:
            return self.shared[0].layer(self.index)
        return self.prefix_keys, self.prefix_values

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.prefixes()
        return keys.detach().clone(), values.detach().clone()

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def extra_positions(self, batch: int) -> tuple[torch.Tensor, ...]:
        """What the attention function prepends: keys and values, each (B, kv_heads, P, head_dim) (a subclass may
        add log-weights for the prefix positions, see ``core.attention``)."""
        keys, values = self.prefixes()
        return keys.unsqueeze(0).expand(batch, -1, -1, -1), values.unsqueeze(0).expand(batch, -1, -1, -1)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        if self.shared:
            return {f"mlp.{n}": p for n, p in self.mlp.named_parameters()} if self.mlp is not None else {}
        return {"prefix_keys": self.prefix_keys, "prefix_values": self.prefix_values}

    def on_unload(self) -> None:
        remove_extension(self.base)
        for undo in self.undo:
            undo()
        self.undo = []


def _extension(layer: PrefixAttention):
    ref = weakref.ref(layer)  # the table of extensions must not keep the wrapper (and its base) alive

    def extension(batch: int, dtype: torch.dtype, device: torch.device):
        return ref().extra_positions(batch)

    return extension


def attach_prefixes(
    model: nn.Module,
    count: int,
    shift: bool,
    mlp_hidden: int | None = None,
    layer_class: type[PrefixAttention] = PrefixAttention,
) -> list[str]:
    """Wrap every attention module in a ``layer_class`` layer (PrefixAttention or a subclass, such as UniPELT's
    gated one) with ``count`` prefix positions (computed by one shared MLP of hidden size ``mlp_hidden``, or trained
    directly when it is None); returns their names."""
    found = attention_modules(model)
    config = model.config
    mlp = None
    if mlp_hidden is not None:
        shapes = [(m.kv_heads, m.head_dim) for m in found]
        like = next(found[0].module.parameters())
        mlp = PrefixMLP(count, shapes[0][0] * shapes[0][1], mlp_hidden, shapes).to(like.device, like.dtype)
    layers = []
    for index, m in enumerate(found):
        layer = layer_class(m.module, count, m.kv_heads, m.head_dim, index, mlp, owner=index == 0)
        replace_module(model, m.name, layer)
        extend_keys_values(model, config, m.module, _extension(layer))
        layers.append(layer)
    model_ref = weakref.ref(model)
    layers[0].undo.append(lambda: restore(model_ref(), config))
    if shift:
        layers[0].undo.append(shift_positions(model, count).remove)
    return [m.name for m in found]


def shift_positions(model: nn.Module, count: int) -> RemovableHandle:
    """A forward pre-hook that moves the real tokens' position ids ``count`` places on (creating them when the
    caller gave none: 0, 1, ... after the cached length, or padding_idx + 1, ... for a table with a padding index)."""
    parameters = inspect.signature(model.forward).parameters
    if "position_ids" not in parameters:
        raise InputError(
            f"shift_positions: {type(model).__name__} takes no position_ids, so its positions cannot follow the "
            "prefix; use --no-shift-positions"
        )
    positional = [p for p in parameters if p not in ("self", "kwargs")]
    table = next(
        (m for n, m in model.named_modules() if n.endswith("position_embeddings") and isinstance(m, nn.Embedding)),
        None,
    )
    first = table.padding_idx + 1 if table is not None and table.padding_idx is not None else 0

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        for name, value in zip(positional, args, strict=False):  # fold positional arguments into keywords
            kwargs[name] = value
        positions = kwargs.get("position_ids")
        if positions is None:
            tokens = kwargs.get("input_ids")
            tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
            batch, length = tokens.shape[:2]
            start = first + cache_length(kwargs)
            if table is not None and start + length + count > table.num_embeddings:
                raise InputError(
                    f"num_virtual_tokens: {length} tokens after a prefix of {count} need {start + length + count} "
                    f"positions, but the model has {table.num_embeddings}; shorten --max-length or the prefix, "
                    "or use --no-shift-positions"
                )
            positions = torch.arange(start, start + length, device=tokens.device).expand(batch, length)
        kwargs["position_ids"] = positions + count
        return (), kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def fold_prefixes(attachment) -> dict[str, torch.Tensor]:
    """Every prefix layer's prefixes as plain tensors, keyed as directly trained prefixes are (other adapter layers
    of a hybrid method, such as MAM's parallel adapters, are left to the caller)."""
    out = {}
    for name, layer in attachment.layers().items():
        if isinstance(layer, PrefixAttention):
            out[f"{name}.prefix_keys"], out[f"{name}.prefix_values"] = layer.folded()
    return out


def fold_hybrid(attachment) -> dict[str, torch.Tensor]:
    """For a method that combines prefixes with other adapter layers (MAM, UniPELT): the prefixes folded, and every
    other adapter tensor (other layers', and a prefix layer's own besides its MLP) as it is."""
    rest = {
        f"{name}.{key}": tensor.detach().clone()
        for name, layer in attachment.layers().items()
        for key, tensor in (layer.adapter_parameters() | layer.adapter_buffers()).items()
        if not (isinstance(layer, PrefixAttention) and key.startswith("mlp."))
    }
    return fold_prefixes(attachment) | rest


# --- Hugging Face PEFT format (PREFIX_TUNING) ---------------------------------------------------------------------
# "prompt_embeddings": (P, L * 2 * kv_heads * head_dim), each row layer 0 keys, layer 0 values, layer 1 keys, ...;
# the task head under "base_model.". PEFT passes it as a KV cache, so the positions shift (see above).


def export_prefixes(attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    if not attachment.config.shift_positions:
        raise InputError(
            "shift_positions: PEFT's prefixes move the real tokens' positions on; an adapter trained with "
            "--no-shift-positions has no PEFT equivalent"
        )
    layers = list(attachment.layers().values())
    prefixes = [layer.folded() for layer in layers]
    shapes = {tuple(keys.shape) for keys, _ in prefixes}
    if len(shapes) != 1:
        raise InputError(f"PEFT's prefix tuning needs one key shape in every layer; this model has {sorted(shapes)}")
    kv_heads, count, head_dim = shapes.pop()
    rows = []
    for keys, values in prefixes:
        rows += [keys.transpose(0, 1).reshape(count, -1), values.transpose(0, 1).reshape(count, -1)]  # (P, kv * D)
    fields = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": count,
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_layers": len(layers),
        "num_transformer_submodules": 1,
        "encoder_hidden_size": kv_heads * head_dim,
        "prefix_projection": False,
        "modules_to_save": attachment.trainable_modules or None,
    }
    heads = {f"base_model.{k}": v for k, v in head_tensors(attachment).items()}
    return fields, {"prompt_embeddings": torch.cat(rows, dim=1)} | heads


def import_prefixes(model: nn.Module, cfg: dict, tensors: dict, weights: Path, method: str, config):
    """Attach ``method`` (direct prefixes, shifted positions) and load PEFT's prefixes and task head into it."""
    source = weights.parent / HF_CONFIG
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise InputError(f"{source}: encoder-decoder prefixes are not supported")
    if "prompt_embeddings" not in tensors:
        raise InputError(f"{weights}: no prompt_embeddings tensor")
    prompt = tensors["prompt_embeddings"]  # (P, L * 2 * kv_heads * head_dim)
    rest = {k.removeprefix("base_model."): v for k, v in tensors.items() if k != "prompt_embeddings"}
    heads = head_modules(rest, cfg.get("modules_to_save") or [], model, weights)
    attachment = attach(model, method, config, trainable_modules=heads)
    ours, start = {}, 0
    for name, layer in attachment.layers().items():
        kv_heads, count, head_dim = layer.prefix_keys.shape
        width = kv_heads * head_dim
        if prompt.shape[0] != count or prompt.shape[1] < start + 2 * width:
            raise InputError(
                f"{weights}: prompt_embeddings has shape {tuple(prompt.shape)}, which does not fit "
                f"{len(attachment.layers())} attention layers of {count} positions x {kv_heads} x {head_dim}"
            )
        for key in ("prefix_keys", "prefix_values"):
            flat = prompt[:, start : start + width]  # (P, kv_heads * head_dim)
            ours[f"{name}.{key}"] = flat.reshape(count, kv_heads, head_dim).transpose(0, 1)
            start += width
    if start != prompt.shape[1]:
        raise InputError(f"{weights}: prompt_embeddings has {prompt.shape[1] - start} columns too many for the model")
    load_state(attachment, ours | rest, weights)
    return attachment
