"""P-tuning v2 (Liu, Ji, Fu, Tam, Du, Yang and Tang, 2022, P-Tuning v2: Prompt Tuning Can Be Comparable to
Fine-tuning Universally Across Scales and Tasks, https://arxiv.org/abs/2110.07602).

Deep prompt tuning: trainable prompts in every layer, not only at the input, so that they act on the model's
computation directly. As in the paper's code they are key/value prefixes of every attention layer l::

    attention_l(x) = softmax(q [K_l; k(x)]^T / sqrt(d_head)) [V_l; v(x)]      K_l, V_l: (kv_heads, P, d_head)

trained directly, without prefix tuning's MLP reparameterisation (which the paper finds of little and task-dependent
use), with a randomly initialised linear head on the encoder's output instead of verbalizers: peftlab's task
heads, for classification ([CLS]) and sequence labelling (every token), and decoders' own LM head. The mechanism,
the positions (shifted by P by default, as in the paper's code) and the saved form (two (kv_heads, P, d_head)
tensors per layer) are those of prefixes.py; ``prefix_tuning --no-projection`` is the same model, this method
brings the paper's defaults. Not the identity at step 0 (the prefixes are N(0, 1)); nothing merges.

PEFT format: exported as ``PREFIX_TUNING`` (``prompt_embeddings``), exact; PEFT prefixes import as prefix_tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.registry import Method, PeftFormat, register
from ..errors import require
from .prefixes import attach_prefixes, export_prefixes


@dataclass
class PTuningV2Config:
    num_virtual_tokens: int = field(default=20, metadata={"help": "prompt length P: key/value positions per layer"})
    shift_positions: bool = field(
        default=True, metadata={"help": "real tokens' positions start at P, as after a KV cache (as PEFT does)"}
    )

    def __post_init__(self):
        require(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
            "num_virtual_tokens",
            "a positive integer",
            self.num_virtual_tokens,
        )


def apply(model: nn.Module, config: PTuningV2Config, protected: Sequence[str] = ()) -> list[str]:
    return attach_prefixes(model, config.num_virtual_tokens, config.shift_positions)


METHOD = register(
    Method(
        name="p_tuning_v2",
        config=PTuningV2Config,
        apply=apply,
        family="soft prompts",
        summary="deep prompts: key/value prefixes trained directly in every attention layer (NLU, tagging, decoders)",
        paper="Liu et al. 2022, P-Tuning v2 (arXiv:2110.07602)",
        lr=1e-2,
        mergeable=False,
        identity_at_init=False,
        peft=PeftFormat("PREFIX_TUNING", export=export_prefixes, full_keys=True),  # imported back as ``prefix_tuning``,
    )
)
