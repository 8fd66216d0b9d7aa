"""Ladder Side-Tuning (Sung, Cho and Bansal, 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient
Transfer Learning, https://arxiv.org/abs/2206.06522).

The backbone stays frozen and the backward pass never enters it: a small *side network* of width
``d_s = d / reduction_factor`` reads the backbone's hidden states through *ladders* (down-projections) and trains
alone. With ``e`` the embedding output, ``h_i`` the output of backbone block i (i = 1..L) and ``S_i`` a side block::

    x_0 = D_0 e
    x_i = S_i(mu_i x_{i-1} + (1 - mu_i) D_i h_i),      mu_i = sigmoid(alpha_i / T),  alpha_i = 0 at the start
    h_L <- h_L + U LN(x_L)                             U: (d, d_s), zero at the start

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
bring the backbone's position-aware states. Initialisation: PyTorch's defaults for the side blocks and ladders
(the paper starts them from the backbone's weights pruned to ``d_s``; that option is not implemented here),
``U = 0``, ``alpha = 0``.

Where the state lives: each backbone block is wrapped by a ``LadderBlock`` that holds its ladder ``D_i``, gate
``alpha_i`` and side block ``S_i`` (the first also ``D_0``, the last also the final LayerNorm and ``U``), so the core
finds every tensor through the adapter protocol. The wrappers pass ``x_{i-1}`` along through a ``SideState``
shared by all of them (a plain object, not a module); a forward pre-hook on the model's body records the attention
mask and position ids of each call and a forward hook clears the state afterwards. Nothing merges into the weights.

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

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterLayer, replace_module
from ..core.kv_cache import cache_length
from ..core.layouts import find_blocks
from ..core.registry import Method, register
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
    """Wraps backbone block i: runs it, then advances the side network by one block from its output,
    ``x_i = S_i(mu_i x_{i-1} + (1 - mu_i) D_i h_i)``. The first block's wrapper starts the side state from its input
    (the embedding output), ``x_0 = D_0 e``; the last one adds ``U LN(x_L)`` to its output."""

    def __init__(self, base: nn.Module, state: SideState, sizes: dict[str, int], config: LSTConfig,
                 first: bool, last: bool):  # fmt: skip
        super().__init__(base)
        self.state = state
        self.temperature = config.gate_temperature
        w = next(base.parameters())
        like = {"dtype": w.dtype, "device": w.device}
        hidden, width = sizes["hidden"], sizes["width"]
        self.embed_down = nn.Linear(hidden, width, **like) if first else None  # D_0
        self.down = nn.Linear(hidden, width, **like)  # D_i
        self.alpha = nn.Parameter(torch.zeros((), **like))  # mu_i = sigmoid(alpha_i / T) = 0.5 at the start
        self.side = SideBlock(width, sizes["heads"], sizes["ffn"], config.dropout, **like)  # S_i
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
        h = out[0] if isinstance(out, tuple) else out  # (B, T, d)
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


# --- attaching ---------------------------------------------------------------------------------------------------


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


def apply(model: nn.Module, config: LSTConfig, protected: Sequence[str] = ()) -> list[str]:
    blocks_name = find_blocks(model, protected, field="lst")
    blocks = model.get_submodule(blocks_name)
    sizes = side_sizes(model, config)
    state = SideState(is_causal(blocks[0], model))
    names = []
    for i, block in enumerate(blocks):
        name = f"{blocks_name}.{i}"
        replace_module(model, name, LadderBlock(block, state, sizes, config, i == 0, i == len(blocks) - 1))
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
        # The side network starts random and reaches the output through a zero U, so it needs more than the
        # adapters' 1e-3: on the tiny BERT's sentiment task (20 epochs) 1e-3 reaches 75 % test accuracy, 3e-3 100 %
        # (houlsby at 1e-3: 54 %). Not yet chosen on validation with a real model.
        lr=3e-3,
        mergeable=False,
    )
)
