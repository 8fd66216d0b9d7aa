"""BitFit: only the bias terms train (Ben Zaken, Ravfogel and Goldberg, 2021, arXiv:2106.10199).

Every layer ``h = W x + b`` keeps its pretrained ``W`` frozen and trains only ``b`` (and the task head)::

    h = W_0 x + b,      b = b_0 + delta_b trainable,   W_0 frozen

so the change to the model is a shift of every pre-activation. The paper's cheaper variant trains only a subset of
the biases, the query biases and the first FFN layer's biases (``--biases query intermediate.dense`` on BERT).

Which biases: a module's ``bias`` parameter (the PyTorch convention of ``nn.Linear``, ``nn.LayerNorm``,
convolutions and their Hugging Face counterparts). ``--biases`` takes module name patterns with the glob rule of
``targets`` (``peftlab.core.targets``); a pattern selects the biases of the modules it matches *and of every module
inside them*, so ``query`` selects the query projections' biases, ``layer.0`` every bias in the first block, and
the default ``*`` every bias outside the task head. A pattern that selects no bias is an error naming the closest
modules that have one. Models without biases (Llama's linear layers and RMSNorm have none) are refused.

The biases are the model's own parameters: the adapter file holds them (dense) and the head; merging is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.registry import Method, register
from ..core.targets import _closest, matches
from ..errors import InputError, require


@dataclass
class BitFitConfig:
    biases: list[str] = field(
        default_factory=lambda: ["*"],
        metadata={
            "help": "module name patterns whose biases train, the modules inside them included "
            "(glob rule of targets; '*' = every bias; the paper's subset: query intermediate.dense)"
        },
    )

    def __post_init__(self):
        require(len(self.biases) > 0, "biases", "at least one module name pattern", self.biases)


def bias_modules(model: nn.Module, protected: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Modules outside the head that own a ``bias`` parameter, by name, in model order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(getattr(m, "bias", None), nn.Parameter)
        and not any(name == h or name.startswith(h + ".") for h in protected)
    }


def select_biases(model: nn.Module, patterns: Sequence[str], protected: Sequence[str] = ()) -> list[str]:
    """Names of the modules whose bias trains: those a pattern matches, or that sit inside a matched module."""
    owners = bias_modules(model, protected)
    if not owners:
        raise InputError(f"biases: {type(model).__name__} has no bias terms outside the task head, so BitFit has none")
    selected: set[str] = set()
    for pattern in patterns:
        hits = {
            owner
            for owner in owners
            if any(matches(pattern, prefix) for prefix in _prefixes(owner))  # the owner or a module holding it
        }
        if not hits:
            raise InputError(f"biases: pattern {pattern!r} selects no bias{_closest(pattern, owners)}")
        selected |= hits
    return [name for name in owners if name in selected]


def _prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: the module and every module that contains it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def apply(model: nn.Module, config: BitFitConfig, protected: Sequence[str] = ()) -> list[str]:
    names = select_biases(model, config.biases, protected)
    for name in names:
        model.get_submodule(name).bias.requires_grad_(True)
    return names


METHOD = register(
    Method(
        name="bitfit",
        config=BitFitConfig,
        apply=apply,
        family="selective",
        summary="only the bias terms (all, or those of chosen modules) and the head train",
        paper="Ben Zaken et al. 2021, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked "
        "Language-models (arXiv:2106.10199)",
        lr=1e-3,
        mergeable=True,
    )
)
