"""The report's plots (PNG, through matplotlib when it is installed): quality against trainable parameters with the
Pareto front, the memory split as stacked bars, step time relative to the floor."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..fileio import atomic_file
from .collect import Group, memory_of, step_ratio, step_times
from .measure import MEMORY_PARTS

MEMORY_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimiser state",
    "method_state": "method state",
    "activations": "activations",
}


COLOURS = {
    "weights": "#4c72b0",
    "gradients": "#dd8452",
    "optimizer": "#55a868",
    "method_state": "#8172b3",
    "activations": "#c44e52",
}


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def pareto_front(points: list[tuple[float, float, str]], higher_is_better: bool) -> list[tuple[float, float, str]]:
    """The points no other point beats: at most as many trainable parameters and at least as good quality."""
    sign = 1 if higher_is_better else -1
    front = []
    for x, y, name in points:
        beaten = any(x2 <= x and sign * y2 >= sign * y and (x2 < x or sign * y2 > sign * y) for x2, y2, _ in points)
        if not beaten:
            front.append((x, y, name))
    return sorted(front)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")


def label_offsets(points: list[tuple[float, float, str]]) -> list[tuple[int, int]]:
    """Where each point's label goes (points of text from the point): above right, unless the point sits within a
    tenth of a decade of trainable parameters of an already labelled one (LoRA and DoRA), then one line lower per
    such neighbour, so the labels do not print over each other."""
    offsets = []
    for i, (x, _, _) in enumerate(points):
        crowd = sum(abs(math.log10(x) - math.log10(x2)) < 0.1 for x2, _, _ in points[:i])
        offsets.append((4, 4 - 10 * crowd))
    return offsets


def plot_quality(plt, group: Group, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = []
    for row in group.ours():
        x, y = row.mean("params", "trainable"), row.mean("quality", "value")
        if x and y is not None:
            points.append((x, y, row.label))
            ax.errorbar(x, y, yerr=row.std("quality", "value") or 0, fmt="o", color="#4c72b0", capsize=3)
    for (x, y, label), offset in zip(points, label_offsets(points), strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    peers = []
    for row in group.ours():
        peer = group.peer(row.label)
        if peer and peer.mean("params", "trainable") and peer.mean("quality", "value") is not None:
            peers.append((peer.mean("params", "trainable"), peer.mean("quality", "value")))
    if peers:
        ax.scatter(*zip(*peers, strict=True), marker="x", color="#c44e52", label="Hugging Face PEFT", zorder=3)
    front = pareto_front(points, group.higher_is_better)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#55a868", label="Pareto front")
    elif front:
        ax.scatter([front[0][0]], [front[0][1]], color="#55a868", s=90, facecolors="none", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"test {group.metric}" + ("" if group.higher_is_better else " (lower is better)"))
    ax.set_title(f"{group.title}: quality vs trainable parameters", fontsize=10)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def memory_rows(group: Group) -> list[tuple[str, dict]]:
    rows = []
    refs = (group.speed.get("references") or {}) if group.speed else {}
    if "floor" in refs:
        rows.append(("floor", refs["floor"]["memory"]))
    for row in group.ours():
        m = memory_of(group, row.label, "ours")
        if m:
            rows.append((row.label, m))
        p = memory_of(group, row.label, "peer")
        if p:
            rows.append((f"{row.label} (peft)", p))
    return rows


def plot_memory(plt, group: Group, path: Path) -> None:
    rows = memory_rows(group)
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.32 * max(len(rows), 1)))
    left = [0.0] * len(rows)
    for part in MEMORY_PARTS:
        values = [m.get(part, 0) / 2**20 for _, m in rows]
        if any(values):
            ax.barh(range(len(rows)), values, left=left, color=COLOURS[part], label=MEMORY_LABELS[part])
            left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB in one training step")
    ax.set_title(f"{group.title}: memory split", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_speed(plt, group: Group, path: Path) -> None:
    labels, ours, peers = [], [], []
    full = []
    for row in group.ours():
        t = step_times(group, row.label)
        if t["ours"] and t["floor"]:
            labels.append(row.label)
            ours.append(step_ratio(group, row.label, "ours", "floor"))
            peers.append(step_ratio(group, row.label, "peer", "floor") or 0.0)
            if t["full"]:
                full.append(step_ratio(group, row.label, "full", "floor"))
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.36 * max(len(labels), 1)))
    ys = range(len(labels))
    ax.barh([y - 0.2 for y in ys], ours, height=0.4, color="#4c72b0", label="peftlab")
    if any(peers):
        ax.barh([y + 0.2 for y in ys], peers, height=0.4, color="#c44e52", label="Hugging Face PEFT")
    ax.axvline(1.0, color="black", linewidth=1, label="floor")
    if full:
        ax.axvline(statistics.median(full), color="#55a868", linestyle="--", label="full fine-tuning")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("step time / floor (frozen forward + activation-only backward)")
    ax.set_title(f"{group.title}: speed relative to the floor", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


SIZE_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def plot_size(plt, study, path: Path) -> None:
    """Quality relative to full fine-tuning against the trainable share of the model, one series per model size
    (``peftlab.bench.size_study``), with the 95 % line; the share without the task head where every model's head
    size is known (heads differ by architecture, not by model size)."""
    from .size_study import TARGET

    body = all(size.head is not None for size in study.models)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, size in enumerate(study.models):
        colour = SIZE_COLOURS[i % len(SIZE_COLOURS)]
        xs = [p.body_share if body else p.share for p in size.points]
        ys = [p.relative for p in size.points]
        ax.plot(xs, ys, "o", color=colour, label=f"{size.model} ({size.total / 1e6:.0f}M)")
        for p, x, y in zip(size.points, xs, ys, strict=True):
            ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"{TARGET:.0%} of full fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel(f"trainable share of the model{', without the task head' if body else ''} (log scale)")
    ax.set_ylabel(f"test {study.metric} relative to full fine-tuning")
    ax.set_title(f"{study.task}: quality vs trainable share, by model size", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
