"""Honest parameter accounting, reported by name.

- ``total`` / ``base``: every parameter of the model, and those that are not the method's own; a quantised base
  layer's packed weights count as the weights they stand for (see ``packed_parameters``).
- ``trainable``: entries the optimiser updates (method parameters plus the task head; only the True entries of a
  masked parameter).
- ``changed``: entries of the final, merged weights that differ from the pretrained base. A merged LoRA update
  is dense, so it changes every entry of an adapted matrix even though only ``r * (in + out)`` entries trained.
  Parameters a method adds without a weight form (soft prompts) and a new task head count in full.
- ``delta_rank``: rank of the weight difference of every adapted (or trained) pretrained matrix (an adapter's
  changes come from its layers' ``deltas()``: weights, and for some methods biases and norms too).
- ``adapter_bytes``: size of the adapter folder on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .attach import Attachment


def parameter_counts(attachment: Attachment) -> dict:
    model = attachment.model
    own = {id(p) for layer in attachment.layers().values() for p in layer.adapter_parameters().values()}
    total = sum(p.numel() for p in model.parameters()) + packed_parameters(model)
    adapter = sum(p.numel() for p in model.parameters() if id(p) in own)
    trainable = attachment.trainable_count()
    return {
        "total": total,
        "base": total - adapter,
        "adapter": adapter,
        "trainable": trainable,
        "changed": changed_parameters(attachment),
    }


def packed_parameters(model) -> int:
    """Weights a quantised base layer holds packed, outside ``parameters()`` (e.g. NF4 codes in uint8 buffers).
    Each counts as one parameter, like the dense weight it stands for; such a layer declares how many it holds
    with ``packed_parameter_count()``."""
    # Ask the class, not the instance: an adapter wrapper reads missing attributes from the layer it wraps and
    # would otherwise count its base's packed weights a second time.
    return sum(m.packed_parameter_count() for m in model.modules() if hasattr(type(m), "packed_parameter_count"))


@torch.no_grad()
def _deltas(attachment: Attachment) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(pretrained value, difference) for every base parameter an adapted layer with a weight form changes (its
    ``deltas()``), keyed by the layer's name for its weight and ``<layer>.<parameter>`` for the others."""
    out = {}
    for name, layer in attachment.layers().items():
        for pname, (pretrained, delta) in (layer.deltas() or {}).items():
            out[name if pname == "weight" else f"{name}.{pname}"] = (pretrained, delta.to(pretrained.dtype))
    return out


@torch.no_grad()
def changed_parameters(attachment: Attachment) -> int:
    changed = 0
    for layer in attachment.layers().values():
        if layer.deltas() is None:  # added parameters without a weight form count in full
            changed += sum(p.numel() for p in layer.adapter_parameters().values())
    for weight, delta in _deltas(attachment).values():
        changed += int(torch.count_nonzero((weight + delta) != weight))
    state = attachment.state()
    for name, start in attachment.initial.items():
        changed += int(torch.count_nonzero(state[name].detach() != start.to(state[name].device)))
    return changed


@torch.no_grad()
def delta_ranks(attachment: Attachment) -> dict[str, int]:
    """Rank of the weight difference per pretrained matrix the method changed (the task head is left out)."""
    ranks = {name: _rank(delta) for name, (_, delta) in _deltas(attachment).items() if delta.ndim == 2}
    state = attachment.state()
    heads = tuple(h + "." for h in attachment.trainable_modules)
    for name, start in attachment.initial.items():
        if start.ndim == 2 and not name.startswith(heads):
            ranks[name] = _rank(state[name].detach() - start.to(state[name].device))
    return ranks


def _rank(delta: torch.Tensor) -> int:
    """Numerical rank, with the tolerance of the dtype the difference was computed in."""
    rtol = max(delta.shape) * torch.finfo(delta.dtype).eps
    return int(torch.linalg.matrix_rank(delta.float(), rtol=rtol))


def rank_summary(ranks: dict[str, int]) -> dict:
    if not ranks:
        return {}
    values = list(ranks.values())
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values), "per_matrix": ranks}


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
