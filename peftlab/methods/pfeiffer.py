"""Pfeiffer adapters (Pfeiffer et al., 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning,
https://arxiv.org/abs/2005.00247).

One bottleneck adapter per transformer layer, after the feed-forward sublayer's output projection only, inside the
residual branch::

    y = FFN(x),    y' = y + W_up act(W_down y + b_down) + b_up

(BERT-style: ``LayerNorm(dropout(y') + x)``; Llama/Qwen: after ``down_proj``, before the residual add.) The paper's
search found this single adapter per layer as good as Houlsby's two at half the parameters. Its exact configuration
also reuses the sublayer's LayerNorm around the adapter; here the adapter sits where Houlsby's feed-forward adapter
sits, which keeps the model's own code untouched. W_up and the biases start at zero (outputs unchanged at step 0); not
mergeable. These are the adapters ``adapter_fusion`` combines.
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
class PfeifferConfig(BottleneckConfig):
    pass


def apply(model: nn.Module, config: PfeifferConfig, protected: Sequence[str] = ()) -> list[str]:
    return apply_sequential(model, config, protected, ["ffn_output"])


METHOD = register(
    Method(
        name="pfeiffer",
        config=PfeifferConfig,
        apply=apply,
        family="additive",
        summary="one bottleneck adapter after each feed-forward output projection, in the residual",
        paper="Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning "
        "(arXiv:2005.00247)",
        lr=1e-3,
        mergeable=False,
        hooks=AdapterDropHooks,
    )
)
