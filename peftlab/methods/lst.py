"""Ladder Side-Tuning (Sung, Cho and Bansal, 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning, https://arxiv.org/abs/2206.06522).

The backbone stays frozen and the backward pass never enters it: a small *side network* of width
``d_s = d / reduction_factor`` reads the backbone's hidden states through *ladders* (down-projections) and trains
alone. With ``e`` the embedding output, ``h_i`` the output of backbone block i (i = 1..L), ``K`` the blocks that
keep a ladder (``side_layers``; all L by default) and ``S_i`` a side block::

    x_0 = D_0 e
    x_i = S_i(mu_i x_{i-1} + (1 - mu_i) D_i h_i)  for i in K,  else  x_i = x_{i-1}
    mu_i = sigmoid(alpha_i / T),  alpha_i = 0 at the start
    h_L <- h_L + U LN(x_L)                         U: (d, d_s), zero at the start

``D_i: (d_s, d)`` are the ladders, ``T`` the gate temperature (0.1 in the paper). The backbone's blocks run under
``torch.no_grad`` and the ladders read ``e`` and ``h_i`` as constants: nothing inside a backbone block is saved
for backward (even where the input embeddings are made to require a gradient), so training costs the backbone's
forward pass plus a forward and backward pass through a network ``reduction_factor`` times narrower. What it saves
for backward is each block's output ``h_i`` (the input of its ladder's weight gradient), the side network's own
activations and what follows the last block. (Prompt and LoRA-style methods, however few parameters they train,
backpropagate through every block and save what each block computes.)

Our departure from the paper, and why: the paper feeds the side network's output alone (up-projected) to the
task head. Here ``U LN(x_L)`` is *added* to the last block's output, so whatever follows the blocks (Llama's final
norm, a pooling hook, BERT's pooler, the head) reads ``h_L + U LN(x_L)``. With ``U = 0`` a fresh LST is exactly the
frozen model (``identity_at_init``), and training starts from the backbone's own features instead of from a
randomly initialised side network's, which matters where the task head is new and small data must move it. The
rewrite happens in the last block's wrapper, not on the body's output, so a pooling hook on the body
(``core.pooling``, installed before any method) reads the sum.

A side block ``S_i`` is a pre-LayerNorm transformer block of width ``d_s``: ``x + Drop(Attn(LN x))``, then
``x + Drop(FFN(LN x))`` with a GELU feed-forward of width ``intermediate_size / reduction_factor``. Its attention
has ``side_heads`` heads, by default the backbone's head count divided by the reduction factor (rounded up, then
down to a divisor of ``d_s``), so its heads are about as wide as the backbone's: attention's (T, T) probabilities,
which unfused kernels save for backward, grow with the number of heads, not with the width, and the backbone's
head count would make them as large as the backbone's. The side attention follows the backbone's masking: padding,
and causality where the backbone's attention is causal (a module in its first block with ``is_causal = True``:
Llama, GPT-2; BERT's is False). Packed rows (no attention mask, ``position_ids`` restarting at 0 for every example,
``peftlab.data.lm``) attend within their own example, as the backbone does. Without padding or packing no mask is
built, so PyTorch's fused attention kernels can run. The side network has no position embeddings: the ladders
bring the backbone's position-aware states.

Layer dropping (the paper's, in its own form: a list of the backbone blocks that keep a side block): ``side_layers``
names the blocks (0-based) that keep a ladder ``D_i``, a gate and a side block ``S_i``; the others run plain, still
under ``torch.no_grad`` inside their wrapper (nothing saved for backward), and hand the side state on unchanged. The
first block's wrapper starts ``x_0`` and the last one adds ``U LN(x_L)`` whether or not they keep a side block, so
the last side block still reaches the output. Each dropped block takes away its side block's parameters and
activations and the ``h_i`` its ladder would save.

Initialisation (``init``). ``random``: PyTorch's defaults for the side blocks and ladders. ``pruned``, the paper's
structural weight initialisation: side block ``S_i`` starts as backbone block i structurally pruned to the side
width, its parts found by role in ``core.layouts.LAYOUTS`` (BERT / RoBERTa / MiniLM / ELECTRA, MPNet, Llama / Qwen /
Mistral, DistilBERT; any other block is refused). Each kept unit is ranked by the L1 norm of the weights it owns::

    hidden dims  the d_s of d with the largest column norm of the input embedding matrix, one selection for the
                 whole network (every residual stream, ladder and norm keeps the same dims, so they line up)
    heads        per block, the side_heads heads with the largest |W| over their q, k, v rows and their columns of
                 the output projection, on the kept dims (a grouped-query model's key and value rows are those of
                 the key/value head each kept query head reads)
    head dims    within each kept head, when side heads are narrower than the backbone's (s = d_s / side_heads
                 below its head width w: MiniLM and MPNet at r = 8), the s query/key dims with the largest |W| over
                 their q and k rows, and separately the s value dims with the largest |W| over their v rows and
                 output columns (q.k sums over the first, the output reads the second, so they prune apart); side
                 heads wider than the backbone's are refused
    FFN units    per block, the intermediate_size / r units with the largest |W| over their input row and output
                 column on the kept dims; a gated FFN (Llama) gives its up_proj rows and down_proj columns, and its
                 gate is left out (the side FFN is an ungated GELU)

Biases are the same slices (zero where the backbone has none). Each side norm copies the kept dims of the backbone
norm whose output the copied sublayer reads there: in a pre-norm block (Llama) the block's own input and
post-attention norms, and the body's final norm for the side's final norm; in a post-norm block (BERT) attention
reads the previous block's output norm (block 0: the embedding norm), the FFN the block's attention-output norm, and
the side's final norm takes the last block's output norm. An RMSNorm's weight goes into a LayerNorm (bias 0), which
also centres. The ladders ``D_0``, ``D_i`` start as the selection of the kept dims (``D h`` is ``h`` pruned), so a
side block first reads the coordinates its copied weights were trained on. Either way ``U = 0`` and ``alpha = 0``.

Departures of ``pruned``, and why: the paper ranks weights by their Fisher information (squared gradients of the
task loss over training examples); ``apply()`` sees no data, so the ranking here is by weight magnitude, which needs
none. The paper's ladders start as random linear maps; here they start as the selection, for the reason above.
Copied query and key rows of a rotary model (Llama) start without their rotation: the side attention has no
positions. Norm weights are copied as stored, which suits LayerNorm and Llama's RMSNorm but not a norm that scales
by ``1 + weight`` (Gemma's), whose copies start off by that 1; Gemma is not tested here.

Where the state lives: each backbone block is wrapped by a ``LadderBlock`` that holds its ladder ``D_i``, gate
``alpha_i`` and side block ``S_i`` where it keeps them (the first also ``D_0``, the last also the final LayerNorm and
``U``), so the core finds every tensor through the adapter protocol. The wrappers pass ``x_{i-1}`` along through a
``SideState`` shared by all of them (a plain object, not a module); a forward pre-hook on the model's body records
the attention mask and position ids of each call and a forward hook clears the state afterwards. Nothing merges into
the weights.

Generation: with a KV cache a decoder's blocks see only the new tokens, and a side network without a cache of its
own would attend to nothing before them. LST generates without the backbone's cache instead: attaching sets the
model's ``generation_config.use_cache = False`` (restored on unload), so ``generate`` re-reads the whole sequence
at every step -- slower, exact for every decoding strategy (greedy, sampling, beams, assisted decoding, whose
cache reordering and cropping a side cache would have to follow). A forward pass given a non-empty cache (a
caller that asks for ``use_cache=True``) stops with an error rather than answer wrongly.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer, replace_module
from ..core.kv_cache import cache_length
from ..core.layouts import LAYOUTS, find_blocks, find_layout
from ..core.registry import Method, register
from ..core.targets import matches
from ..errors import InputError, PeftlabError, require


@dataclass
class LSTConfig:
    reduction_factor: int = field(
        default=8, metadata={"help": "r: the side network is d / r wide (d: the backbone's hidden size)"}
    )
    side_heads: int | None = field(
        default=None,
        metadata={"help": "attention heads of each side block (default: the backbone's / reduction_factor, "
                          "rounded up, then down to a divisor of the side width)"},
    )  # fmt: skip
    gate_temperature: float = field(default=0.1, metadata={"help": "T in the ladder gate mu = sigmoid(alpha / T)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout inside the side blocks while training"})
    init: Literal["random", "pruned"] = field(
        default="random",
        metadata={"help": "side network start: random, or pruned (each side block from its backbone block, "
                          "structurally pruned to the side width by weight magnitude; ladders select the kept dims)"},
    )  # fmt: skip
    side_layers: list[int] | None = field(
        default=None,
        metadata={"help": "layer dropping: the backbone blocks (0-based) that keep a ladder and a side block "
                          "(default: every block)"},
    )  # fmt: skip

    def __post_init__(self):
        r = self.reduction_factor
        require(isinstance(r, int) and r >= 1, "reduction_factor", "an integer >= 1", r)
        heads = self.side_heads
        require(heads is None or (isinstance(heads, int) and heads >= 1), "side_heads", "an integer >= 1", heads)
        t = self.gate_temperature
        require(
            isinstance(t, (int, float)) and math.isfinite(t) and t > 0, "gate_temperature", "a finite number > 0", t
        )
        require(
            isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
            "dropout",
            "a number in [0, 1)",
            self.dropout,
        )
        require(self.init in ("random", "pruned"), "init", "random or pruned", self.init)
        layers = self.side_layers
        require(
            layers is None
            or (
                isinstance(layers, (list, tuple))
                and len(layers) > 0
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                and len(set(layers)) == len(layers)
            ),
            "side_layers",
            "a non-empty list of distinct block indices >= 0",
            layers,
        )


# --- the side network --------------------------------------------------------------------------------------------


class SideAttention(nn.Module):
    """Multi-head self-attention of width ``width``, masked as ``side_mask`` says (``masking``)."""

    def __init__(self, width: int, heads: int, dtype=None, device=None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, dtype=dtype, device=device)
        self.out = nn.Linear(width, width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, masking: tuple[torch.Tensor | None, bool]) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, c)
        allowed, causal = masking
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal)  # (B, h, T, c)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class SideBlock(nn.Module):
    """A pre-LayerNorm transformer block: ``x + Drop(Attn(LN x))``, then ``x + Drop(FFN(LN x))``."""

    def __init__(self, width: int, heads: int, ffn_width: int, dropout: float, dtype=None, device=None):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width, dtype=dtype, device=device)
        self.attn = SideAttention(width, heads, dtype=dtype, device=device)
        self.ffn_norm = nn.LayerNorm(width, dtype=dtype, device=device)
        self.ffn_in = nn.Linear(width, ffn_width, dtype=dtype, device=device)
        self.ffn_out = nn.Linear(ffn_width, width, dtype=dtype, device=device)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, masking: tuple[torch.Tensor | None, bool]) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), masking))  # (B, T, d_s)
        return x + self.drop(self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x)))))


def side_mask(
    mask: torch.Tensor | None, positions: torch.Tensor | None, causal: bool, length: int, device
) -> tuple[torch.Tensor | None, bool]:
    """How the side attention masks, as SDPA's ``(attn_mask, is_causal)``: the keys each query may attend to,
    (B or 1, 1, T, T) bool, given the padding ``mask`` (B, T), causality, and for packed rows (no mask, ``positions``
    restarting at 0) each example's own tokens; every query sees at least itself, so a padding position (which
    nothing reads) never has an empty row. Without padding or packing no mask is built: nothing for an encoder,
    SDPA's own causality for a decoder (its fused kernels then save no (T, T) probabilities for backward)."""
    padded = mask is not None and not bool(mask.all())
    packed = causal and mask is None and positions is not None and bool((positions.diff(dim=-1) != 1).any())
    if not padded and not packed:
        return None, causal
    allowed = torch.ones(1, 1, length, length, dtype=torch.bool, device=device)
    if padded:
        allowed = allowed & mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        order = torch.arange(length, device=device)
        allowed = allowed & (order[None, :] <= order[:, None])  # (T, T)
    if packed:
        starts = positions.diff(dim=-1, prepend=positions[:, :1] - 1) != 1  # (B, T): an example begins
        example = starts.cumsum(dim=-1).to(device)
        allowed = allowed & (example[:, :, None] == example[:, None, :])[:, None]  # (B, 1, T, T)
    return allowed | torch.eye(length, dtype=torch.bool, device=device), False


class SideState:
    """What the ladders share within one forward pass of the body: the side state ``x`` of the block last run, and
    the attention mask and position ids of the call (``active`` while the body runs). Also the hooks LST installed
    outside its wrappers and the generation setting it changed, so that unloading can undo them."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.active = False
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.masking: tuple[torch.Tensor | None, bool] = (None, False)  # the side attention's (see side_mask)
        self.x: torch.Tensor | None = None
        self.handles: list = []
        self.restore_use_cache: tuple[object, object] | None = None  # (generation_config, use_cache before LST)

    def begin(self, mask: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        if mask is not None and mask.dim() != 2:
            raise InputError(f"lst: expected a (batch, length) attention mask, got one of shape {tuple(mask.shape)}")
        self.active, self.mask, self.positions, self.masking, self.x = True, mask, positions, (None, False), None

    def end(self) -> None:
        self.active, self.mask, self.positions, self.masking, self.x = False, None, None, (None, False), None

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.restore_use_cache is not None:
            config, value = self.restore_use_cache
            config.use_cache = value
            self.restore_use_cache = None


class LadderBlock(AdapterLayer):
    """Wraps backbone block i: runs it, then (where it keeps a side block) advances the side network by one block
    from its output, ``x_i = S_i(mu_i x_{i-1} + (1 - mu_i) D_i h_i)``. The first block's wrapper starts the side
    state from its input (the embedding output), ``x_0 = D_0 e``; the last one adds ``U LN(x_L)`` to its output."""

    def __init__(self, base: nn.Module, state: SideState, sizes: dict[str, int], config: LSTConfig,
                 first: bool, last: bool, side: bool = True):  # fmt: skip
        super().__init__(base)
        self.state = state
        self.temperature = config.gate_temperature
        w = next(base.parameters())
        like = {"dtype": w.dtype, "device": w.device}
        hidden, width = sizes["hidden"], sizes["width"]
        self.embed_down = nn.Linear(hidden, width, **like) if first else None  # D_0
        self.down = nn.Linear(hidden, width, **like) if side else None  # D_i
        # mu_i = sigmoid(alpha_i / T) = 0.5 at the start
        self.alpha = nn.Parameter(torch.zeros((), **like)) if side else None
        self.side = SideBlock(width, sizes["heads"], sizes["ffn"], config.dropout, **like) if side else None  # S_i
        self.final_norm = nn.LayerNorm(width, **like) if last else None
        self.up = nn.Linear(width, hidden, **like) if last else None  # U
        if self.up is not None:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.train(base.training)  # new modules start in training mode; follow the model's (dropout off in eval)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        state = self.state
        if not state.active:
            raise PeftlabError("lst: a transformer block ran outside its model's forward pass (the side network "
                               "reads the mask from the model's body)")  # fmt: skip
        if self.embed_down is not None:
            e = hidden_states.detach()  # (B, T, d): the embedding output
            state.masking = side_mask(state.mask, state.positions, state.causal, e.shape[1], e.device)
            state.x = self.embed_down(e)  # (B, T, d_s)
        with torch.no_grad():  # nothing in the backbone is recorded, even for an input that requires a gradient
            out = self.base(hidden_states, *args, **kwargs)
        if self.side is None and self.up is None:
            return out  # a dropped block: the side state passes on unchanged
        h = out[0] if isinstance(out, tuple) else out  # (B, T, d)
        if self.side is not None:
            mu = torch.sigmoid(self.alpha / self.temperature)
            state.x = self.side(mu * state.x + (1 - mu) * self.down(h), state.masking)  # (B, T, d_s)
        if self.up is None:
            return out
        h = h + self.up(self.final_norm(state.x)).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("base.")}

    def on_unload(self) -> None:
        self.state.uninstall()


# --- reading the backbone ----------------------------------------------------------------------------------------


def _config_value(model: nn.Module, *names: str) -> int | None:
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _hidden_size(model: nn.Module) -> int:
    hidden = _config_value(model, "hidden_size", "d_model", "n_embd")
    if hidden is None:
        embed = getattr(model, "get_input_embeddings", lambda: None)()
        hidden = getattr(embed, "embedding_dim", None)
    if hidden is None:
        raise InputError(f"lst: cannot tell the hidden size of {type(model).__name__} (no config.hidden_size)")
    return hidden


def side_sizes(model: nn.Module, config: LSTConfig) -> dict[str, int]:
    """Widths of the side network: ``hidden`` (d), ``width`` (d_s), ``heads`` and ``ffn`` (its feed-forward)."""
    hidden = _hidden_size(model)
    width = hidden // config.reduction_factor
    if width < 1:
        raise InputError(
            f"reduction_factor: the hidden size is {hidden}, so it can be at most {hidden}, "
            f"got {config.reduction_factor}"
        )
    heads = config.side_heads
    if heads is None:
        backbone = _config_value(model, "num_attention_heads", "n_head", "num_heads") or 1
        wanted = -(-backbone // config.reduction_factor)  # heads about as wide as the backbone's
        heads = max(h for h in range(1, min(wanted, width) + 1) if width % h == 0)
    elif width % heads:
        raise InputError(f"side_heads: must divide the side width {hidden} / {config.reduction_factor} = {width}, "
                         f"got {heads}")  # fmt: skip
    intermediate = _config_value(model, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
    return {"hidden": hidden, "width": width, "heads": heads, "ffn": max(1, intermediate // config.reduction_factor)}


def is_causal(block: nn.Module, model: nn.Module) -> bool:
    """Whether the backbone's self-attention is causal: a module of ``block`` says so (``is_causal``, as
    transformers' attention modules do), else the model's config (``is_decoder``)."""
    flags = [m.is_causal for m in block.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    return bool(getattr(getattr(model, "config", None), "is_decoder", False))


# --- init="pruned": the side network from the backbone's weights -------------------------------------------------

PRUNED_ROLES = ("query", "key", "value", "attention_output", "ffn_up", "ffn_output", "attention_norm", "ffn_norm")


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores``, in increasing order."""
    return scores.float().topk(k).indices.sort().values


def head_dims(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per head (row of ``scores``: (heads, w)), the indices of its ``k`` largest dims, in increasing order."""
    return scores.float().topk(k, dim=1).indices.sort(dim=1).values


def head_rows(heads: torch.Tensor, dims: torch.Tensor, width: int) -> torch.Tensor:
    """The rows of a projection (heads of ``width`` rows each) for ``dims[j]`` of head ``heads[j]``, head after
    head."""
    return (heads[:, None] * width + dims).flatten()


def bias_of(linear: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    """The entries ``rows`` of the bias of ``linear`` (zeros where it has none)."""
    return linear.bias[rows] if linear.bias is not None else linear.weight.new_zeros(len(rows))


class PrunedInit:
    """The backbone's parts by role for every block, the hidden dims kept for the whole side network (``keep``) and
    the head width; built before the blocks are wrapped, so a layout or width it cannot prune is refused before the
    model changes. ``initialise`` then copies backbone block i, pruned, into the new ``LadderBlock`` i."""

    def __init__(self, model: nn.Module, blocks_name: str, sizes: dict[str, int], config: LSTConfig,
                 protected: Sequence[str]):  # fmt: skip
        blocks = model.get_submodule(blocks_name)
        kind = type(blocks[0]).__name__
        found = find_layout(model, PRUNED_ROLES, protected)
        self.parts: list[dict[str, nn.Module]] = []
        for i, block in enumerate(blocks):
            hits = {role: [m for n, m in block.named_modules(prefix=f"{blocks_name}.{i}")
                           if found and matches(getattr(found[0], role), n)] for role in PRUNED_ROLES}  # fmt: skip
            if found is None or any(len(h) != 1 for h in hits.values()):
                raise InputError(f"init=pruned: cannot find the attention and feed-forward projections and norms in "
                                 f"{kind} (knows {', '.join(LAYOUTS)}); use init=random")  # fmt: skip
            self.parts.append({role: h[0] for role, h in hits.items()})
        self.norms = found[0].norms
        count = _config_value(model, "num_attention_heads", "n_head", "num_heads")
        if count is None:
            raise InputError(f"init=pruned: cannot tell the head count of {kind} (no config.num_attention_heads); "
                             "use init=random")  # fmt: skip
        self.hidden = hidden = sizes["hidden"]
        width = sizes["width"]
        self.head_width = w = self.parts[0]["query"].out_features // count
        self.side_head_width = width // sizes["heads"]
        if self.side_head_width > w:
            raise InputError(f"side_heads: init=pruned prunes backbone heads ({w} wide), so side heads can be at "
                             f"most {w} wide: expected at least {-(-width // w)} heads for a side width of {width}, "
                             f"got {sizes['heads']}")  # fmt: skip
        embed = getattr(model, "get_input_embeddings", lambda: None)()
        if not isinstance(getattr(embed, "weight", None), torch.Tensor) or embed.weight.shape[-1] != hidden:
            raise InputError(f"init=pruned: cannot find the input embeddings of {type(model).__name__}; "
                             "use init=random")  # fmt: skip
        self.keep = top(embed.weight.detach().abs().sum(0), width)  # (d_s,): hidden dims by embedding column norm
        body = getattr(model, "base_model", model)
        # the norms whose outputs the first block's attention and what follows the blocks read (see the docstring)
        self.first_input_norm = getattr(getattr(body, "embeddings", None), "LayerNorm", None)
        self.final_norm = getattr(body, "norm", None) if self.norms == "pre" else self.parts[-1]["ffn_norm"]

    @torch.no_grad()
    def initialise(self, layer: LadderBlock, i: int) -> None:
        keep = self.keep
        for ladder in (layer.embed_down, layer.down):
            if ladder is not None:  # D = the selection of the kept dims: D h = h[keep]
                ladder.weight.zero_()
                ladder.weight[torch.arange(len(keep)), keep] = 1.0
                ladder.bias.zero_()
        if layer.final_norm is not None:
            self.copy_norm(layer.final_norm, self.final_norm)
        if layer.side is None:
            return
        part, side = self.parts[i], layer.side
        if self.norms == "pre":
            self.copy_norm(side.attn_norm, part["attention_norm"])
            self.copy_norm(side.ffn_norm, part["ffn_norm"])
        else:
            self.copy_norm(side.attn_norm, self.parts[i - 1]["ffn_norm"] if i > 0 else self.first_input_norm)
            self.copy_norm(side.ffn_norm, part["attention_norm"])
        q, k, v, o = (part[role] for role in ("query", "key", "value", "attention_output"))
        w = self.head_width

        def per_dim(rows_by_input: torch.Tensor) -> torch.Tensor:  # (heads * w, d_s) -> (heads, w)
            return rows_by_input.abs().sum(1).view(-1, w)

        # |W| each head dim owns on the kept dims: its q, k, v rows and its output projection column
        q_owned, k_owned, v_owned = (per_dim(x.weight[:, keep]) for x in (q, k, v))
        o_owned = o.weight[keep].abs().sum(0).view(-1, w)  # (heads, w)
        group = q.out_features // k.out_features  # query heads per key/value head (1 without grouped queries)
        score = q_owned.sum(1) + (k_owned.sum(1) + v_owned.sum(1)).repeat_interleave(group) + o_owned.sum(1)
        heads = top(score, side.attn.heads)
        kv_heads = heads // group
        s = self.side_head_width  # the s of each kept head's w dims (all of them when s = w)
        qk_dims = head_dims(q_owned[heads] + k_owned[kv_heads], s)
        vo_dims = head_dims(v_owned[kv_heads] + o_owned[heads], s)
        q_rows, k_rows = head_rows(heads, qk_dims, w), head_rows(kv_heads, qk_dims, w)
        v_rows, o_columns = head_rows(kv_heads, vo_dims, w), head_rows(heads, vo_dims, w)
        side.attn.qkv.weight.copy_(torch.cat([q.weight[q_rows][:, keep], k.weight[k_rows][:, keep],
                                              v.weight[v_rows][:, keep]]))  # fmt: skip
        side.attn.qkv.bias.copy_(torch.cat([bias_of(q, q_rows), bias_of(k, k_rows), bias_of(v, v_rows)]))
        side.attn.out.weight.copy_(o.weight[keep][:, o_columns])
        side.attn.out.bias.copy_(bias_of(o, keep))
        up, down = part["ffn_up"], part["ffn_output"]
        units = top(up.weight[:, keep].abs().sum(1) + down.weight[keep].abs().sum(0), side.ffn_in.out_features)
        side.ffn_in.weight.copy_(up.weight[units][:, keep])
        side.ffn_in.bias.copy_(bias_of(up, units))
        side.ffn_out.weight.copy_(down.weight[keep][:, units])
        side.ffn_out.bias.copy_(bias_of(down, keep))

    def copy_norm(self, norm: nn.LayerNorm, source: nn.Module | None) -> None:
        """The kept dims of ``source``'s weight and bias (bias 0 for an RMSNorm); LayerNorm's defaults without one."""
        weight, bias = getattr(source, "weight", None), getattr(source, "bias", None)
        if isinstance(weight, torch.Tensor) and weight.shape == (self.hidden,):
            norm.weight.copy_(weight[self.keep])
            norm.bias.copy_(bias[self.keep] if isinstance(bias, torch.Tensor) else torch.zeros_like(norm.bias))


# --- attaching ---------------------------------------------------------------------------------------------------


def side_blocks(config: LSTConfig, count: int) -> set[int]:
    """Indices of the backbone blocks that keep a ladder and a side block (``side_layers``; default all)."""
    if config.side_layers is None:
        return set(range(count))
    if max(config.side_layers) >= count:
        raise InputError(f"side_layers: expected block indices in 0..{count - 1} (the model has {count} blocks), "
                         f"got {config.side_layers}")  # fmt: skip
    return set(config.side_layers)


def apply(model: nn.Module, config: LSTConfig, protected: Sequence[str] = ()) -> list[str]:
    blocks_name = find_blocks(model, protected, field="lst")
    blocks = model.get_submodule(blocks_name)
    sizes = side_sizes(model, config)
    with_side = side_blocks(config, len(blocks))
    # init=pruned finds and checks the backbone's parts before any block is wrapped
    pruned = PrunedInit(model, blocks_name, sizes, config, protected) if config.init == "pruned" else None
    state = SideState(is_causal(blocks[0], model))
    names = []
    for i, block in enumerate(blocks):
        name = f"{blocks_name}.{i}"
        layer = LadderBlock(block, state, sizes, config, i == 0, i == len(blocks) - 1, i in with_side)
        if pruned is not None:
            pruned.initialise(layer, i)
        replace_module(model, name, layer)
        names.append(name)
    _install(model, state)
    return names


def _install(model: nn.Module, state: SideState) -> None:
    """Hook the body (record each call's mask, refuse a filled KV cache, clear the state afterwards) and switch the
    model's generation to run without a KV cache (see the module docstring)."""
    body = getattr(model, "base_model", model)
    positional = [p for p in inspect.signature(body.forward).parameters if p not in ("self", "args", "kwargs")]

    def begin(module: nn.Module, args: tuple, kwargs: dict) -> None:
        named = dict(zip(positional, args, strict=False)) | kwargs
        if cache_length(named) > 0:
            raise PeftlabError("lst: the side network keeps no KV cache; run the model with use_cache=False "
                               "(LST makes that generate's default)")  # fmt: skip
        state.begin(named.get("attention_mask"), named.get("position_ids"))

    def end(module: nn.Module, args: tuple, output) -> None:
        state.end()

    state.handles = [
        body.register_forward_pre_hook(begin, with_kwargs=True),
        body.register_forward_hook(end, always_call=True),
    ]
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "use_cache"):
        state.restore_use_cache = (generation, generation.use_cache)
        generation.use_cache = False


METHOD = register(
    Method(
        name="lst",
        config=LSTConfig,
        apply=apply,
        family="additive",
        summary="ladder side-tuning: a narrow side network reads every block's output; no backward through the "
        "backbone",
        paper="Sung, Cho and Bansal 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer "
        "Learning (arXiv:2206.06522)",
        # The side network starts random (init=random) and reaches the output through a zero U, so it needs more
        # than the adapters' 1e-3: on the tiny BERT's sentiment task (20 epochs) 1e-3 reaches 75 % test accuracy,
        # 3e-3 100 % (houlsby at 1e-3: 54 %). Not yet chosen on validation with a real model, nor for init=pruned.
        lr=3e-3,
        mergeable=False,
    )
)
