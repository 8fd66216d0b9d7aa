"""Weighted linear merge of LoRA adapters of one base, re-compressed to a target rank by truncated SVD.

For every adapted module the merged update is::

    delta = sum_i w_i * s_i * (B_i A_i - B0_i A0_i)     (out, in), rank at most sum_i r_i

and the merged adapter keeps its best rank-R approximation (Eckart-Young: the R largest singular components)::

    delta ~ U_R S_R V_R^T  =  B A   with  B = U_R sqrt(S_R),  A = sqrt(S_R) V_R^T,  alpha = r = R  (scaling 1)

The SVD is taken without forming ``delta``: with the factors stacked, ``delta = P Q^T`` for P = [w_1 s_1 B_1, ...]
(out, k) and Q = [A_1; ...]^T (in, k), thin QR gives P = Q_p R_p, Q = Q_q R_q, and the SVD of the small core
``R_p R_q^T = U' S V'^T`` gives ``delta = (Q_p U') S (Q_q V')^T``: exact, and cheap for wide layers. The relative
Frobenius error of the truncation is ``sqrt(sum_{j>R} S_j^2) / sqrt(sum_j S_j^2)`` per layer; the total is the same
over all layers' singular values together (the error of the whole update). It is 0 when R >= the rank of the sum.
A layer whose merged update has rank below R is padded with zero components (exact).

Task heads: adapters of different tasks have different heads, and a weighted mix of heads has no meaning. The
merged adapter takes the head of one chosen source adapter (``head``: its index; by default the first), or none
(``head=None``: body only, as LoRAHub uses it). It is written as an ordinary peftlab LoRA adapter, so it loads,
merges and exports to Hugging Face PEFT like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.attach import Attachment, attach, load_state
from ..errors import InputError, require
from .library import LoraModule, check_model


@dataclass
class MergedLora:
    """Per module: the re-compressed factors ``(down (R, in), up (out, R))`` and the relative Frobenius error."""

    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    errors: dict[str, float]
    total_error: float


def merge_factors(pieces: Sequence[tuple[float, torch.Tensor, torch.Tensor]], rank: int) -> tuple[torch.Tensor, ...]:
    """``sum_i w_i up_i down_i`` re-compressed to ``rank``: (down (rank, in), up (out, rank), tail^2, total^2)."""
    up = torch.cat([w * u.double() for w, _, u in pieces], dim=1)  # (out, k)
    down = torch.cat([d.double() for _, d, _ in pieces], dim=0)  # (k, in)
    q_up, r_up = torch.linalg.qr(up)  # (out, m), (m, k)
    q_down, r_down = torch.linalg.qr(down.T)  # (in, n), (n, k)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)  # core (m, n)
    keep = min(rank, len(s))
    root = s[:keep].sqrt()
    new_up = torch.zeros(up.shape[0], rank, dtype=torch.float64)
    new_down = torch.zeros(rank, down.shape[1], dtype=torch.float64)
    new_up[:, :keep] = (q_up @ u[:, :keep]) * root  # (out, keep)
    new_down[:keep] = root[:, None] * (vh[:keep] @ q_down.T)  # (keep, in)
    return new_down.float(), new_up.float(), float((s[keep:] ** 2).sum()), float((s**2).sum())


def merge_loras(modules: Sequence[LoraModule], weights: Sequence[float], rank: int) -> MergedLora:
    """The weighted merge of ``modules`` re-compressed to ``rank`` (modules a source lacks contribute nothing)."""
    require(isinstance(rank, int) and rank > 0, "rank", "a positive integer", rank)
    if len(weights) != len(modules):
        raise InputError(f"weights: expected one weight per adapter ({len(modules)}), got {len(weights)}")
    targets = list(dict.fromkeys(t for m in modules for t in m.factors))
    factors, errors, tail, total = {}, {}, 0.0, 0.0
    for name in targets:
        pieces = [(float(w), *m.factors[name]) for w, m in zip(weights, modules, strict=True) if name in m.factors]
        down, up, layer_tail, layer_total = merge_factors(pieces, rank)
        factors[name] = (down, up)
        errors[name] = (layer_tail / layer_total) ** 0.5 if layer_total > 0 else 0.0
        tail, total = tail + layer_tail, total + layer_total
    return MergedLora(rank, factors, errors, (tail / total) ** 0.5 if total > 0 else 0.0)


def merged_attachment(
    model: nn.Module, modules: Sequence[LoraModule], merged: MergedLora, head: int | None = 0
) -> Attachment:
    """``merged`` attached to ``model`` (the adapters' base, with the chosen head's label count) as a LoRA adapter
    with r = alpha = R; the head of ``modules[head]`` is copied in, or no head trains when ``head`` is None."""
    check_model(model, modules)
    sources = [m.meta["config"]["targets"] for m in modules]
    same_targets = all(t == sources[0] for t in sources) and all(
        list(m.factors) == list(merged.factors) for m in modules
    )
    # the sources' own patterns when they agree; else (or with no head, as 'all-linear' would then take the head
    # layer too) the merged modules by name
    targets = sources[0] if same_targets and head is not None else list(merged.factors)
    heads = [] if head is None else list(modules[head].meta["trainable_modules"])
    attachment = attach(
        model, "lora", r=merged.rank, alpha=float(merged.rank), targets=targets, trainable_modules=heads
    )
    if sorted(attachment.targets) != sorted(merged.factors):
        raise InputError("targets: the merged modules cannot be selected on this model")
    state = {}
    for name in attachment.targets:
        down, up = merged.factors[name]
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = down, up
    if head is not None:
        source = modules[head]
        for key, value in attachment.state().items():
            if key not in state:
                if key not in source.head or source.head[key].shape != value.shape:
                    raise InputError(f"head: adapter {source.name!r} has no head tensor {key!r} fitting this model")
                state[key] = source.head[key]
    load_state(attachment, state, Path("merged adapter"))
    return attachment


def pick_head(names: Sequence[str], head: str | None) -> int | None:
    """Whose head a merged adapter takes: an adapter's name or index, None (the first) or "none" (no head)."""
    if head is None:
        return 0
    if head == "none":
        return None
    if head in names:
        return names.index(head)
    if head.isdigit() and int(head) < len(names):
        return int(head)
    raise InputError(f"--head: expected an adapter name ({', '.join(names)}), an index or 'none', got {head!r}")


def merge_to_folder(
    adapters: Sequence[str],
    weights: Sequence[float] | None,
    rank: int,
    head: str | None,
    model: str | None,
    out: str,
    overwrite: bool,
    quiet: bool,
) -> tuple[dict, MergedLora]:
    """The LoRA adapters (folders or run folders) merged with ``weights`` (default: all 1) at ``rank``, on the
    base ``model`` (default: the one the head's adapter records), saved to ``out`` as one adapter with the head of
    ``head`` (see pick_head). Returns the composition report saved with it, and the merge."""
    from ..core.pooling import install_pooling, saved_pooling
    from ..fileio import check_output
    from ..models import load_classifier, resolve_model
    from .library import read_library

    modules = read_library(adapters)
    weights = weights if weights is not None else [1.0] * len(modules)
    merged = merge_loras(modules, weights, rank)
    names = [m.name for m in modules]
    index = pick_head(names, head)
    source = modules[0 if index is None else index]
    model_name = model or source.meta.get("model")
    if not model_name:
        raise InputError(f"{source.folder}: the adapter records no base model; give it with --model")
    labels = source.labels
    if not labels:
        raise InputError(f"{source.folder}: the adapter records no classification labels")
    path = resolve_model(model_name, quiet=quiet)
    check_output(out, [*adapters, path], overwrite)
    pooling = saved_pooling(source.meta)  # how the head was trained to read
    classifier = load_classifier(path, labels)
    install_pooling(classifier, pooling)
    attachment = merged_attachment(classifier, modules, merged, index)
    report = {
        "sources": {m.name: str(m.folder) for m in modules},
        "weights": weights,
        "rank": rank,
        "head": None if index is None else names[index],
        "relative_error": {"total": merged.total_error, "per_module": merged.errors},
    }
    task = {"task": {"type": "classification", "labels": labels, "pooling": pooling}} if index is not None else {}
    attachment.save(out, extra={**task, "model": model_name, "composition": report})
    return report, merged
