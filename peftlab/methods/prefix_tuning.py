"""Prefix tuning (Li and Liang, 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation,
https://arxiv.org/abs/2101.00190).

Every attention layer l of the frozen model gains P trainable key and value positions in front of its own::

    attention_l(x) = softmax(q [K_l; k(x)]^T / sqrt(d_head)) [V_l; v(x)]      K_l, V_l: (kv_heads, P, d_head)

so every token can attend to them in every layer (see prefixes.py for the mechanism and the positions). Li & Liang
found that optimising the prefixes directly is unstable and train them through a reparameterisation, one MLP for
all layers (``projection``, on by default)::

    [K_1; V_1; ...; K_L; V_L] = W2 tanh(W1 P' + b1) + b2        P': (P, d_in),  hidden size ``encoder_hidden``

and drop it after training. Here the MLP is folded away when the adapter is saved (``Method.fold``): the file
holds only the final prefixes, two (kv_heads, P, d_head) tensors per layer, and its config says
``projection = false`` (the training config is kept as ``trained_as``), so a loaded adapter has no MLP and costs
nothing to compute. Training checkpoints keep the MLP, so a resumed run continues exactly; ``keep_encoder`` saves
the MLP too, for a later run that continues training through it.

Not the identity at step 0: the prefixes are random (the MLP's inputs P' are N(0, 1), its layers PyTorch's default
initialisation; directly trained prefixes are N(0, 1)). No prefix is: even zero values would take attention weight
away from the real tokens. Nothing merges into the weights.

PEFT format: ``PREFIX_TUNING`` with the folded prefixes as ``prompt_embeddings``, both ways, exact (positions
shifted as PEFT shifts them); a PEFT adapter imports as ``prefix_tuning`` with ``projection = false``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.registry import Method, PeftFormat, register
from .prefixes import PrefixOptions, attach_prefixes, export_prefixes, fold_prefixes, import_prefixes


@dataclass
class PrefixTuningConfig(PrefixOptions):
    """Prefix tuning's options: the shared prefix options (``prefixes.PrefixOptions``)."""


def apply(model: nn.Module, config: PrefixTuningConfig, protected: Sequence[str] = ()) -> list[str]:
    return attach_prefixes(model, config.num_virtual_tokens, config.shift_positions, config.mlp_hidden)


def fold(attachment) -> tuple[PrefixTuningConfig, dict[str, torch.Tensor]] | None:
    """The MLP computed once into every layer's prefixes (unless asked to keep it)."""
    folded = attachment.config.folded()
    return None if folded is None else (folded, fold_prefixes(attachment))


def _import_prefix_tuning(model, cfg: dict, tensors: dict, weights: Path):
    count = int(cfg.get("num_virtual_tokens") or 0)
    config = PrefixTuningConfig(num_virtual_tokens=count, projection=False)
    return import_prefixes(model, cfg, tensors, weights, "prefix_tuning", config)


METHOD = register(
    Method(
        name="prefix_tuning",
        config=PrefixTuningConfig,
        apply=apply,
        family="soft prompts",
        summary="trainable key/value prefixes in every attention layer, trained through an MLP folded away on save",
        paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation (arXiv:2101.00190)",
        # chosen on validation accuracy by `peftlab bench --suite methods --lr-grid` (docs/results.md): through the
        # MLP each prefix entry takes a step tens of times Adam's, and at 1e-2 or 3e-3 the prefixes swamp attention
        # (57.3 %, the majority class); 1e-3 gave 74.4 % validation
        lr=1e-3,
        mergeable=False,
        identity_at_init=False,
        fold=fold,
        peft=PeftFormat("PREFIX_TUNING", export=export_prefixes, load=_import_prefix_tuning, full_keys=True),
        param_groups=PrefixTuningConfig.param_groups,
    )
)
