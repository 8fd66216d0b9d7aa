"""Selective layer tuning: the last ``k`` transformer blocks train in full, everything below them stays frozen.

The "freeze the bottom, fine-tune the top" baseline (e.g. Lee, Tang and Lin, 2019, "What Would Elsa Do? Freezing
Layers During Transformer Fine-Tuning", arXiv:1911.03090). With blocks ``B_1 .. B_L`` and the body
``h = N(B_L(...B_1(E(x))))``, the parameters of ``B_{L-k+1} .. B_L`` and of the modules between the last block and
the task head (``N``) train, and so does the head.

The blocks are found generically (``peftlab.core.layouts.find_blocks``): the longest ``nn.ModuleList`` whose
entries are all of one class and hold parameters; on a tie (an encoder-decoder) the one registered last.

What sits between the last block and the head trains too, from k = 1 on. Freezing it would leave the trained top
block feeding a frozen map, for a saving of a few thousand parameters. Found by registration order:

- the final normalisation next to the blocks: a norm layer (``nn.LayerNorm``, or a class whose name ends in
  ``Norm`` such as ``LlamaRMSNorm``) registered after the block list in the same parent: Llama/Qwen ``model.norm``,
  GPT-2 ``transformer.ln_f``. Other siblings of the list stay frozen (MPNet's ``relative_attention_bias`` is
  registered after its blocks but feeds every block);
- higher up, every module with parameters registered after the branch that holds the blocks, outside the head:
  BERT's ``bert.pooler``, DistilBERT's ``pre_classifier``.

Nothing is added to the model: the trained modules' own weights are the adapter (saved dense), merging is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..core.layouts import find_blocks
from ..core.registry import Method, register
from ..errors import InputError, require


@dataclass
class LastKConfig:
    k: int = field(default=2, metadata={"help": "number of top transformer blocks that train in full"})

    def __post_init__(self):
        require(isinstance(self.k, int) and self.k >= 1, "k", "an integer >= 1", self.k)


def _inside(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def modules_after_blocks(model: nn.Module, blocks: str, protected: Sequence[str] = ()) -> list[str]:
    """The modules between the last block and the head (see the module docstring for the rule)."""
    found = []
    path = blocks  # walk up from the block list: at each level, the siblings registered after our branch
    while path:
        parent_name, _, branch = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        children = dict(parent.named_children())
        names = list(children)
        for name in names[names.index(branch) + 1 :]:
            child = children[name]
            full = f"{parent_name}.{name}" if parent_name else name
            if not _has_parameters(child) or _inside(full, protected):
                continue
            if path != blocks or _is_norm(child):  # next to the blocks themselves, only the final norm
                found.append(full)
        path = parent_name
    return found


def apply(model: nn.Module, config: LastKConfig, protected: Sequence[str] = ()) -> list[str]:
    blocks = find_blocks(model, protected)
    count = len(model.get_submodule(blocks))
    if config.k > count:
        raise InputError(f"k: the model has {count} blocks ({blocks}), so k can be at most {count}, got {config.k}")
    top = [f"{blocks}.{i}" for i in range(count - config.k, count)]
    names = top + modules_after_blocks(model, blocks, protected)
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    return names


METHOD = register(
    Method(
        name="last_k",
        config=LastKConfig,
        apply=apply,
        family="baseline",
        summary="the last k transformer blocks (and the final norm / pooler after them) train in full",
        paper="Lee et al. 2019, What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning (arXiv:1911.03090)",
        lr=1e-4,
        mergeable=True,
    )
)
