"""Houlsby adapters (Houlsby et al., 2019, Parameter-Efficient Transfer Learning for NLP,
https://arxiv.org/abs/1902.00751).

Two bottleneck adapters per transformer layer, one after the attention sublayer's output projection and one after the
feed-forward sublayer's output projection, each inside the residual branch::

    y = P(x),    y' = y + W_up act(W_down y + b_down) + b_up      (P: attention output / FFN output projection)

In BERT-style encoders the sublayer then computes ``LayerNorm(dropout(y') + x)``; in Llama/Qwen decoders ``y'`` is
the output of ``o_proj`` / ``down_proj`` before the residual add. W_up and the biases start at zero, so a fresh
adapter leaves the outputs unchanged. The paper also trains the layers' LayerNorms: ``--train-layernorms``. The
adapter is non-linear, so it cannot be merged into the weights. AdapterDrop (``--drop-layers``, ``--drop-train``) and
the building blocks live in ``peftlab.methods.bottleneck``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..core.registry import Method, register
from .adapter_drop import AdapterDropHooks
from .bottleneck import BottleneckConfig
from .bottleneck_sites import apply_sequential


@dataclass
class HoulsbyConfig(BottleneckConfig):
    pass


def apply(model: nn.Module, config: HoulsbyConfig, protected: Sequence[str] = ()) -> list[str]:
    return apply_sequential(model, config, protected, ["attention_output", "ffn_output"])


METHOD = register(
    Method(
        name="houlsby",
        config=HoulsbyConfig,
        apply=apply,
        family="additive",
        summary="bottleneck adapters after the attention and the feed-forward output projections, in the residual",
        paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751)",
        lr=1e-3,
        mergeable=False,
        hooks=AdapterDropHooks,
    )
)
