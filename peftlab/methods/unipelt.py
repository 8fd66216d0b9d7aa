"""UniPELT (Mao, Mathias, Hou, Almahairi, Ma, Han, Yih and Khabsa, 2022, UniPELT: A Unified Framework for
Parameter-Efficient Language Model Tuning, https://arxiv.org/abs/2110.07577).

Three submodules in every transformer layer, each switched on or off per token by its own learned gate,
``g = sigmoid(w . h + b)`` (w: (d,), b: a scalar; one gate per submodule per layer), computed from the hidden state
h that the submodule itself reads:

- LoRA on every linear layer of the model that the adapter does not wrap (``lora_targets = all-linear``, the
  default; ``auto`` is the paper's query and value projections); the gate reads the layer's input x and scales the
  low-rank update::

      y = W x + b + g_L(x) * s * B A x,     g_L(x) = sigmoid(w_L . x + b_L)     (s = alpha / r)

- prefix tuning in every attention layer (P key/value positions, see prefixes.py); the gate reads the attention
  input x and scales the prefix positions' unnormalised attention weights, which is adding log g_P to their logits::

      a_t = softmax([q_t K^T / sqrt(d_head) + log g_P(x_t);  q_t k(x)^T / sqrt(d_head)])    for the query at token t

  so g_P = 1 is prefix tuning and g_P = 0 the plain attention (the real tokens get all the weight again);
- a sequential bottleneck adapter after the feed-forward output projection (Pfeiffer-style; ``adapter_sites =
  attention_and_ffn`` adds one after the attention output projection too, Houlsby-style); the gate reads the
  adapter's input y and scales the adapter's output::

      y' = y + g_A(y) * (W_up act(W_down y + b_down) + b_up),     g_A(y) = sigmoid(w_A . y + b_A)

Three choices differ from the paper's code, all documented here: (1) its gates are averaged over the sequence (one
gate per example); ours are per token, so a decoder stays causal (a later token never changes an earlier token's
gate) and padding never enters a gate. (2) Its prefix gate multiplies the prefix keys and values; a gated-off prefix
would then still take attention weight (zero keys score 0, not -inf), whereas scaling the prefix's attention
weights makes g_P = 0 exactly the plain attention, as g_L = 0 and g_A = 0 are the plain layer for the other two.
The prefix gate enters through the log-weights that ``core.attention`` lets a key/value extension add. (3) The
paper's LoRA adapts the query and value projections; ours every linear layer, as peftlab's LoRA does, so UniPELT
holds the LoRA it is compared with: on MiniLM / Rotten Tomatoes (methods suite, seed 0, validation accuracy) query
and value gave 79.1 %, every linear layer but the adapted FFN output 79.2 % (LoRA alone: 79.5 %).

Rates: the prefix MLP learns at ``mlp_lr_scale = 0.6`` times the run's rate (see prefixes.py: the MLP multiplies
Adam's step on the prefixes), the LoRA, adapter and gates at the run's rate.

Initialisation: LoRA's B = 0 and the adapter's W_up = 0 (and biases 0), so those two submodules start as the
identity whatever their gates; the gates are ``nn.Linear(d, 1)`` with PyTorch's default initialisation (g near 0.5).
The prefixes are random, as in prefix tuning, so the method as a whole changes the outputs at step 0
(``identity_at_init = False``). Prefix tuning trains through Li & Liang's MLP, folded into the prefixes when the
adapter is saved (config saved with ``projection = false``). Nothing merges: every submodule's contribution depends on
the input through its gate. Hugging Face PEFT has no UniPELT, so there is no PEFT parity test or export;
tests/test_unipelt.py checks one gated layer against a few lines of direct torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layouts import find_layout, looked_for
from ..core.registry import Method, register
from ..core.targets import ALL_LINEAR
from ..errors import InputError, require
from .bottleneck import AUTO, Activation, BottleneckConfig, SequentialAdapter
from .bottleneck_sites import apply_sequential
from .lora import LoraConfig, LoraLinear
from .lora import apply as apply_lora
from .prefixes import PrefixAttention, PrefixOptions, attach_prefixes, fold_hybrid

ADAPTER_SITES = {"ffn": ["ffn_output"], "attention_and_ffn": ["attention_output", "ffn_output"]}


def make_gate(width: int, like: torch.Tensor) -> nn.Linear:
    """One gate: a (d -> 1) linear layer whose sigmoid is g; PyTorch's default initialisation (g near 0.5)."""
    return nn.Linear(width, 1, dtype=like.dtype, device=like.device)


def gate_parameters(gate: nn.Linear) -> dict[str, nn.Parameter]:
    return {"gate.weight": gate.weight, "gate.bias": gate.bias}


class GatedLoraLinear(LoraLinear):
    """``base(x) + sigmoid(gate(x)) * s * B A x``: LoRA whose update is scaled per token by g_L(x)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout=0.0, rslora=False, init="kaiming"):
        super().__init__(base, r, alpha, dropout, rslora, init)
        self.gate = make_gate(base.in_features, self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(x))  # (..., 1)
        return self.base(x) + gate * self.lora_output(x, self.dropout(x))  # (..., out)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return super().adapter_parameters() | gate_parameters(self.gate)

    def delta_weight(self) -> None:
        return None  # the update depends on the input through the gate: no weight form


class GatedSequentialAdapter(SequentialAdapter):
    """``y + sigmoid(gate(y)) * A(y)`` with ``y = base(x)``: a sequential adapter scaled per token by g_A(y)."""

    def __init__(self, base: nn.Linear, size: int, activation: str, block=None, blocks=None):
        super().__init__(base, size, activation, block, blocks)
        self.gate = make_gate(base.out_features, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., d)
        if self.dropped:
            return y
        return y + torch.sigmoid(self.gate(y)) * self.adapter(y)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return super().adapter_parameters() | gate_parameters(self.gate)


class GatedPrefixAttention(PrefixAttention):
    """Prefixes whose attention weights are scaled per query token by g_P(x), x the attention module's input: the
    wrapper computes log g_P in ``forward`` and hands it to the attention function with the prefixes."""

    def __init__(self, base: nn.Module, count: int, kv_heads: int, head_dim: int, index: int, mlp=None, owner=False):
        super().__init__(base, count, kv_heads, head_dim, index, mlp, owner)
        width = next(m for m in base.modules() if isinstance(m, nn.Linear)).in_features  # the attention input's d
        self.gate = make_gate(width, next(base.parameters()))
        self.log_gate: torch.Tensor | None = None  # (B, 1, T, 1) while the wrapped module runs

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, d): the attention input
        self.log_gate = F.logsigmoid(self.gate(x)).unsqueeze(1)  # (B, 1, T, 1): log g_P, one per query token
        try:
            return self.base(*args, **kwargs)
        finally:
            self.log_gate = None

    def extra_positions(self, batch: int) -> tuple[torch.Tensor, ...]:
        keys, values = super().extra_positions(batch)  # (B, kv_heads, P, head_dim) each
        return (keys, values) if self.log_gate is None else (keys, values, self.log_gate)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return super().adapter_parameters() | gate_parameters(self.gate)


@dataclass
class UniPeltConfig(PrefixOptions):
    """Prefix tuning (``PrefixOptions``, with 10 positions as in the paper), LoRA, and a sequential bottleneck
    adapter; every part gated."""

    num_virtual_tokens: int = field(default=10, metadata={"help": "prefix length P: key/value positions per layer"})
    mlp_lr_scale: float = field(
        default=0.6, metadata={"help": "the prefix MLP learns at this times the run's rate (LoRA, adapter, gates: 1)"}
    )
    # LoRA.
    lora_r: int = field(default=8, metadata={"help": "rank of the gated LoRA updates"})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA scale numerator: the update is scaled by alpha / r"}
    )
    lora_targets: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata={
            "help": "LoRA's layers: 'all-linear' (every linear layer the adapter does not wrap), 'auto' (the "
            "paper's query/value: query/value, q_proj/v_proj, q_lin/v_lin) or module name patterns"
        },
    )
    # The sequential bottleneck adapter.
    bottleneck: int | None = field(
        default=None, metadata={"help": "adapter size m (give this or reduction_factor; default d / 16)"}
    )
    reduction_factor: float | None = field(
        default=None, metadata={"help": "adapter size as hidden size / factor (give this or bottleneck)"}
    )
    activation: Activation = field(default="relu", metadata={"help": "non-linearity inside the adapter"})
    adapter_sites: Literal["ffn", "attention_and_ffn"] = field(
        default="ffn",
        metadata={"help": "adapters after the FFN output projection (Pfeiffer) or after both output projections"},
    )
    adapter_targets: list[str] = field(
        default_factory=lambda: [AUTO],
        metadata={"help": "where the adapters go: 'auto' (known layouts) or output projection patterns"},
    )

    def __post_init__(self):
        require(isinstance(self.lora_r, int) and self.lora_r > 0, "lora_r", "a positive integer", self.lora_r)
        require(
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "a positive number", self.lora_alpha
        )
        require(len(self.lora_targets) > 0, "lora_targets", "'auto' or module name patterns", self.lora_targets)
        require(
            AUTO not in self.lora_targets or len(self.lora_targets) == 1,
            "lora_targets",
            "'auto' alone",
            self.lora_targets,
        )
        require(self.adapter_sites in ADAPTER_SITES, "adapter_sites", " or ".join(ADAPTER_SITES), self.adapter_sites)
        super().__post_init__()  # each part validates its own fields, naming them
        self.adapter_config()

    def adapter_config(self) -> BottleneckConfig:
        return BottleneckConfig(
            bottleneck=self.bottleneck,
            reduction_factor=self.reduction_factor,
            activation=self.activation,
            targets=list(self.adapter_targets),
        )

    def lora_config(self, targets: list[str]) -> LoraConfig:
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, targets=targets)


def lora_patterns(model: nn.Module, config: UniPeltConfig, protected: Sequence[str]) -> list[str]:
    """LoRA's target patterns: the given ones, or the query and value projections of the first known layout whose
    names all exist."""
    if config.lora_targets != [AUTO]:
        return list(config.lora_targets)
    roles = ("query", "value")
    found = find_layout(model, roles, protected)
    if found is None:
        raise InputError(
            f"lora_targets: 'auto' found no known query/value projections (looked for {looked_for(roles)}); "
            "give --lora-targets module name patterns"
        )
    return [found[0].query, found[0].value]


def apply(model: nn.Module, config: UniPeltConfig, protected: Sequence[str] = ()) -> list[str]:
    """Gated adapters, then gated LoRA on what they do not wrap (their base layers and gates are protected), then
    gated prefixes (last: the prefix MLP is a module called ``mlp``, which Llama's adapter layout would otherwise
    find, and its linear layers must not get LoRA)."""
    sites = ADAPTER_SITES[config.adapter_sites]
    adapted = apply_sequential(model, config.adapter_config(), protected, sites, GatedSequentialAdapter)
    lora = config.lora_config(lora_patterns(model, config, protected))
    adapted += apply_lora(model, lora, [*protected, *adapted], layer_class=GatedLoraLinear)
    return adapted + attach_prefixes(
        model, config.num_virtual_tokens, config.shift_positions, config.mlp_hidden, GatedPrefixAttention
    )


def fold(attachment) -> tuple[UniPeltConfig, dict[str, torch.Tensor]] | None:
    """The prefix MLP computed once into every layer's prefixes; gates, LoRA and adapters unchanged."""
    folded = attachment.config.folded()
    return None if folded is None else (folded, fold_hybrid(attachment))


METHOD = register(
    Method(
        name="unipelt",
        config=UniPeltConfig,
        apply=apply,
        family="hybrid",
        summary="gated LoRA (all-linear), gated prefix tuning and a gated sequential adapter in every layer",
        paper="Mao et al. 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning "
        "(arXiv:2110.07577)",
        # chosen on validation accuracy in the methods suite (docs/results.md): one rate for every part gave 57.3 %
        # (the majority class: the prefixes swamp attention) at 2e-3, 77.9 % at 6e-4; the prefix MLP at 0.6 times
        # the rate let LoRA, adapter and gates learn at 1e-3: 79.1 % (LoRA on query/value), 79.2 % (all-linear)
        lr=1e-3,
        mergeable=False,
        identity_at_init=False,
        fold=fold,
        param_groups=UniPeltConfig.param_groups,
    )
)
