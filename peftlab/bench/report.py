"""The benchmark report: ``report.md`` and a static ``report.html`` with plots, from the results alone.

``write_report(folders, stem)`` reads every ``cell.json`` and ``speed.json`` under the bench folders (one or more
suites), aggregates over seeds (mean and sample standard deviation) and writes ``<stem>.md``, ``<stem>.html``, the
plots as small PNG files in ``<stem>/`` (both pages link them by relative path) and the aggregated numbers as
``<stem>.json``. Per model and task:

- a table per method: quality, trainable / changed parameters, rank of the weight difference, adapter bytes, the
  memory split of one training step, step time relative to the floor and to full fine-tuning, train time and
  throughput, learning rate;
- the peer table: our step time / PEFT's, our memory / PEFT's (the measured split), our quality minus PEFT's;
- three plots: quality against trainable parameters with the Pareto front, the memory split as stacked bars,
  step time relative to the floor (peftlab and PEFT side by side, full fine-tuning marked).

A "standings" section closes the report: for each method, where it stands against full fine-tuning and against
PEFT, in numbers.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_file, write_text
from ..report import human_bytes
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


# --- reading and aggregating ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One method on one model and task, aggregated over seeds (peftlab's or PEFT's implementation)."""

    suite: str
    model: str
    task: str
    kind: str
    label: str
    method: str
    implementation: str  # "peftlab" or "peft"
    cells: list[dict] = field(default_factory=list)

    @property
    def first(self) -> dict:
        return self.cells[0]

    def values(self, *path: str) -> list[float]:
        out = []
        for c in self.cells:
            v: Any = c
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def mean(self, *path: str) -> float | None:
        v = self.values(*path)
        return statistics.fmean(v) if v else None

    def std(self, *path: str) -> float | None:
        v = self.values(*path)
        return statistics.stdev(v) if len(v) > 1 else (0.0 if v else None)

    @property
    def seeds(self) -> int:
        return len(self.cells)

    def on_seeds(self, seeds: set) -> Row:
        """The same row restricted to the cells of the given seeds."""
        return dataclasses.replace(self, cells=[c for c in self.cells if c.get("seed") in seeds])


@dataclass
class Group:
    suite: str
    model: str
    task: str
    kind: str
    metric: str
    higher_is_better: bool
    rows: dict[tuple[str, str], Row] = field(default_factory=dict)  # (label, implementation) -> Row
    speed: dict = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    budget: str = ""
    seeds: list[int] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.model} / {self.task}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]+", "-", f"{self.suite}-{self.model}-{self.task}").strip("-")

    def ours(self) -> list[Row]:
        return [r for (label, impl), r in self.rows.items() if impl == "peftlab"]

    def peer(self, label: str) -> Row | None:
        return self.rows.get((label, "peft"))

    def row(self, label: str) -> Row | None:
        return self.rows.get((label, "peftlab"))


@dataclass
class Collected:
    groups: list[Group]
    notes: list[str]
    suites: list[dict]


def collect(folders: list[Path]) -> Collected:
    from .suite import load_suite

    groups: dict[tuple[str, str, str], Group] = {}
    notes: list[str] = []
    suites = []
    for folder in folders:
        suite_file = folder / "suite.toml"
        suite = load_suite(str(suite_file)) if suite_file.is_file() and suite_file.stat().st_size else None
        if suite is not None:
            suites.append(
                {
                    "name": suite.name,
                    "description": suite.description,
                    "budget": suite.budget_text(),
                    "train": suite.train,
                    "seeds": suite.seeds,
                }
            )
        notes_file = folder / "notes.json"
        if notes_file.is_file():
            notes += [n for n in json.loads(notes_file.read_text(encoding="utf-8")) if n not in notes]
        for path in sorted(folder.glob("*/*/seed*/cell.json")) + sorted(folder.glob("*/*/seed*/peer/cell.json")):
            cell = json.loads(path.read_text(encoding="utf-8"))
            key = (cell["suite"], cell["model"], cell["task"])
            if key not in groups:
                quality = cell["quality"]
                groups[key] = Group(
                    cell["suite"],
                    cell["model"],
                    cell["task"],
                    cell["kind"],
                    quality["metric"],
                    quality["higher_is_better"],
                    budget=suite.budget_text() if suite else "",
                    seeds=suite.seeds if suite else [],
                )
                speed_file = path.parents[3 if path.parent.name == "peer" else 2] / "speed.json"
                if speed_file.is_file():
                    groups[key].speed = json.loads(speed_file.read_text(encoding="utf-8"))
            group = groups[key]
            row_key = (cell["label"], cell["implementation"])
            if row_key not in group.rows:
                group.rows[row_key] = Row(
                    cell["suite"],
                    cell["model"],
                    cell["task"],
                    cell["kind"],
                    cell["label"],
                    cell["method"],
                    cell["implementation"],
                )
            group.rows[row_key].cells.append(cell)
        for path in sorted(folder.glob("*/*/seed*/failed.json")) + sorted(folder.glob("*/*/seed*/peer/failed.json")):
            failure = json.loads(path.read_text(encoding="utf-8"))
            notes.append(f"failed: {failure['cell']}: {failure['error']}")
    ordered = sorted(groups.values(), key=lambda g: (g.suite, g.task, g.model))
    for group in ordered:
        group.rows = dict(sorted(group.rows.items(), key=lambda kv: _method_order(kv[0][0])))
    return Collected(ordered, notes, suites)


def _method_order(label: str) -> tuple[int, str]:
    return (0 if label == "full" else 1, label)


# --- formatting -------------------------------------------------------------------------------------------------


def fmt_quality(mean: float | None, std: float | None, metric: str) -> str:
    if mean is None:
        return "-"
    if metric in ("accuracy", "f1", "precision", "recall", "answer_accuracy", "exact_match"):
        return f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"
    return f"{mean:.3f} ± {std or 0:.3f}"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{2 if n / size < 10 else 1}f}{unit}"
    return f"{n:.0f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def fmt_mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}" if n >= 2**20 * 10 else f"{n / 2**20:.1f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _speed(group: Group, label: str) -> dict:
    return (group.speed.get("methods") or {}).get(label) or {}


def step_times(group: Group, label: str) -> dict[str, float | None]:
    """Median step seconds of one method's micro-benchmark: ours, peer, floor, full (all measured together)."""
    entry = _speed(group, label)
    return {k: (entry.get(k) or {}).get("median") for k in ("ours", "peer", "floor", "full")}


def step_ratio(group: Group, label: str, a: str, b: str) -> float | None:
    """Median over the micro-benchmark's rounds of (a's step time / b's step time) in the same round.

    Within one round the variants run back to back, so load on the machine that drifts from round to round cancels
    in each round's ratio; the median then drops the rounds that a burst of load hit unevenly."""
    entry = _speed(group, label)
    ta, tb = (entry.get(a) or {}).get("times"), (entry.get(b) or {}).get("times")
    if not ta or not tb or len(ta) != len(tb):
        return None
    return statistics.median(x / y for x, y in zip(ta, tb, strict=True))


def memory_of(group: Group, label: str, side: str) -> dict | None:
    return (_speed(group, label).get(side) or {}).get("memory")


def paired_delta(ours: Row, peer: Row | None, metric: str) -> str:
    """Ours minus PEFT's quality over the seeds both ran (the peer retraces our cell of the same seed)."""
    if peer is None:
        return "-"
    common = {c.get("seed") for c in ours.cells} & {c.get("seed") for c in peer.cells}
    return quality_delta(ours.on_seeds(common), peer.on_seeds(common), metric)


def quality_delta(a: Row | None, b: Row | None, metric: str) -> str:
    if a is None or b is None or a.mean("quality", "value") is None or b.mean("quality", "value") is None:
        return "-"
    d = a.mean("quality", "value") - b.mean("quality", "value")
    return f"{100 * d:+.1f} pts" if metric not in ("loss", "perplexity") else f"{d:+.3f}"


# --- the document, as blocks rendered to Markdown and HTML -----------------------------------------------------


class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        if rows:
            self.blocks.append(("table", header, rows))

    def image(self, path: str, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def quote(self, text: str) -> None:
        self.blocks.append(("quote", text))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {x}" for x in b[1]))
            elif b[0] == "table":
                cells = [[c.replace("|", "\\|") for c in row] for row in [b[1], *b[2]]]
                lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in cells[0]) + "|"]
                lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
                out.append("\n".join(lines))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
            elif b[0] == "quote":
                out.append("\n".join(f"> {line}".rstrip() for line in b[1].splitlines()))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                body.append(f'<figure><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></figure>')
            elif b[0] == "quote":
                body.append(f"<blockquote><p>{_inline(' '.join(b[1].split()))}</p></blockquote>")
        return HTML_PAGE.format(title=html.escape(title), body="\n".join(body))


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` as HTML, everything else escaped."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"(?<![*\w])\*(?![\s*])(.+?)(?<![\s*])\*(?![*\w])", r"<i>\1</i>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child, th:first-child {{ text-align: left; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; border: 1px solid #eee; }}
code {{ background: #f4f4f4; padding: 0 3px; }}
</style></head>
<body>
{body}
</body></html>
"""


# --- plots ------------------------------------------------------------------------------------------------------


def _pyplot():
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


# --- the report -------------------------------------------------------------------------------------------------


def forgetting_corpora(group: Group) -> list[str]:
    """The general-text corpora whose perplexity the group's runs measured before and after tuning."""
    names = {name for r in group.ours() for c in r.cells for name in (c.get("forgetting") or {})}
    return sorted(names)


def fmt_forgetting(row: Row, corpus: str) -> str:
    """Perplexity before -> after tuning, and the relative change (mean over seeds): '33.6 -> 34.6 (+3.0%)'."""
    before, after = row.mean("forgetting", corpus, "before"), row.mean("forgetting", corpus, "after")
    if before is None or after is None:
        return "-"
    return f"{before:.1f} → {after:.1f} ({100 * (after / before - 1):+.1f}%)"


def generation_metric(group: Group) -> str | None:
    """The metric of generated replies shown beside the test metric (decoders: answer accuracy), if the runs have it."""
    return "answer_accuracy" if any(r.values("metrics", "test", "answer_accuracy") for r in group.ours()) else None


def method_table(group: Group) -> tuple[list[str], list[list[str]]]:
    has_rank = any(r.first.get("params", {}).get("delta_rank") for r in group.ours())
    corpora = forgetting_corpora(group)
    extra_metric = generation_metric(group)
    header = ["method", f"{group.metric} (n)"]
    header += [extra_metric.replace("_", " ")] if extra_metric else []
    header += ["trainable", "% of model", "changed"]
    header += ["Δ rank"] if has_rank else []
    header += ["adapter", "memory MiB W / G / O / A", "step ms", "× floor", "× full", "train s", "ex/s", "tok/s", "lr"]
    header += [f"forgetting: {name} ppl" for name in corpora]
    rows = []
    for r in group.ours():
        t = step_times(group, r.label)
        m = memory_of(group, r.label, "ours")
        trainable, total = r.mean("params", "trainable"), r.mean("params", "total")
        row = [
            f"**{r.label}**",
            f"{fmt_quality(r.mean('quality', 'value'), r.std('quality', 'value'), group.metric)} ({r.seeds})",
        ]
        if extra_metric:
            row.append(
                fmt_quality(
                    r.mean("metrics", "test", extra_metric), r.std("metrics", "test", extra_metric), extra_metric
                )
            )
        row += [fmt_count(trainable), f"{100 * trainable / total:.3g}%" if trainable and total else "-"]
        row.append(fmt_count(r.mean("params", "changed")))
        if has_rank:
            rank = r.first.get("params", {}).get("delta_rank") or {}
            row.append(
                "-" if not rank else f"{rank['min']}" if rank["min"] == rank["max"] else f"{rank['min']}-{rank['max']}"
            )
        row.append(human_bytes(r.mean("adapter_bytes")) if r.mean("adapter_bytes") is not None else "-")
        row.append(
            " / ".join(
                fmt_mb(m.get(k, 0) + (m.get("method_state", 0) if k == "optimizer" else 0))
                for k in ("weights", "gradients", "optimizer", "activations")
            )
            if m
            else "-"
        )
        row += [
            f"{1000 * t['ours']:.0f}" if t["ours"] else "-",
            fmt_ratio(step_ratio(group, r.label, "ours", "floor")),
            fmt_ratio(step_ratio(group, r.label, "ours", "full")),
            f"{r.mean('train_seconds'):.0f}" if r.mean("train_seconds") is not None else "-",
            f"{r.mean('examples_per_second'):.1f}" if r.mean("examples_per_second") is not None else "-",
            f"{r.mean('tokens_per_second'):.0f}" if r.mean("tokens_per_second") is not None else "-",
            f"{r.first.get('lr'):g}",
        ]
        row += [fmt_forgetting(r, name) for name in corpora]
        rows.append(row)
    return header, rows


def peer_table(group: Group) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "step ours / peft",
        "memory ours / peft",
        f"{group.metric}: ours − peft (same seeds)",
        "trainable ours / peft",
        "step ms ours / peft",
        "adapter ours / peft",
    ]
    rows = []
    for r in group.ours():
        p = group.peer(r.label)
        t = step_times(group, r.label)
        mo, mp = memory_of(group, r.label, "ours"), memory_of(group, r.label, "peer")
        if p is None and not t["peer"]:
            continue
        trainable = (r.mean("params", "trainable"), p.mean("params", "trainable") if p else None)
        row = [
            f"**{r.label}**",
            fmt_ratio(step_ratio(group, r.label, "ours", "peer")),
            fmt_ratio(ratio(mo and mo["total"], mp and mp["total"])),
            paired_delta(r, p, group.metric),
            f"{fmt_count(trainable[0])} / {fmt_count(trainable[1])}"
            + (" (differ)" if trainable[1] and trainable[0] != trainable[1] else ""),
            f"{1000 * t['ours']:.0f} / {1000 * t['peer']:.0f}" if t["ours"] and t["peer"] else "-",
            f"{human_bytes(r.mean('adapter_bytes'))} / {human_bytes(p.mean('adapter_bytes'))}"
            if p and p.mean("adapter_bytes") and r.mean("adapter_bytes")
            else "-",
        ]
        rows.append(row)
    return header, rows


def standings(group: Group) -> list[str]:
    """One line per method: quality against full fine-tuning, cost against full and the floor, and against PEFT."""
    lines = []
    full = group.row("full")
    full_t = None
    extra_metric, corpora = generation_metric(group), forgetting_corpora(group)
    for r in group.ours():
        t = step_times(group, r.label)
        full_t = full_t or t["full"]
        q = r.mean("quality", "value")
        if q is None:
            continue
        parts = [f"{group.metric} {fmt_quality(q, r.std('quality', 'value'), group.metric)}"]
        if full is not None and r is not full:
            parts.append(f"{quality_delta(r, full, group.metric)} vs full")
        if extra_metric and r.values("metrics", "test", extra_metric):
            extra = r.mean("metrics", "test", extra_metric), r.std("metrics", "test", extra_metric)
            parts.append(f"{extra_metric.replace('_', ' ')} {fmt_quality(*extra, extra_metric)}")
        trainable, total = r.mean("params", "trainable"), r.mean("params", "total")
        if trainable and total:
            parts.append(f"{100 * trainable / total:.3g}% trainable")
        parts += [f"{name} perplexity {fmt_forgetting(r, name)}" for name in corpora]
        if t["ours"] and t["floor"]:
            parts.append(
                f"step {step_ratio(group, r.label, 'ours', 'floor'):.2f}× floor"
                + (f", {step_ratio(group, r.label, 'ours', 'full'):.2f}× full" if t["full"] else "")
            )
        p = group.peer(r.label)
        if t["peer"] or p:
            mo, mp = memory_of(group, r.label, "ours"), memory_of(group, r.label, "peer")
            versus = []
            if t["ours"] and t["peer"]:
                versus.append(f"step {step_ratio(group, r.label, 'ours', 'peer'):.2f}×")
            if mo and mp:
                versus.append(f"memory {mo['total'] / mp['total']:.2f}×")
            if p:
                versus.append(f"{group.metric} {paired_delta(r, p, group.metric)}")
            parts.append("vs PEFT: " + ", ".join(versus))
        lines.append(f"**{r.label}**: " + "; ".join(parts))
    return lines


def describe_machine(cell: dict) -> str:
    m = cell.get("machine") or {}
    return f"{m.get('processor')}, {m.get('cpus')} CPUs, {m.get('torch_threads')} torch threads" + (
        f", {m['cuda']}" if m.get("cuda") else ""
    )


def group_machines(group: Group) -> list[str]:
    return sorted({describe_machine(c) for r in group.rows.values() for c in r.cells})


def report_machines(collected: Collected) -> list[str]:
    return sorted({m for g in collected.groups for m in group_machines(g)})


def environment(collected: Collected) -> list[str]:
    cells = [c for g in collected.groups for r in g.rows.values() for c in r.cells]
    if not cells:
        return []
    versions, commits = {}, set()
    for c in cells:
        versions.update({k: v for k, v in (c.get("versions") or {}).items() if v})
        if c.get("git_commit"):
            commits.add(c["git_commit"][:10])
    return [
        "machine: " + "; ".join(report_machines(collected)),
        "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "peftlab commits: " + ", ".join(sorted(commits)),
    ]


READING = (
    "**How to read.** Quality is the test metric of the best validation state, mean ± standard deviation over the "
    "seeds (n). *Trainable* counts what the optimiser updates (the task head included); *changed* counts entries "
    "of the merged weights that differ from the pretrained ones; *Δ rank* is the rank of each adapted matrix's weight "
    "difference; *adapter* is the saved folder's size. *Memory* is measured on one training step of the fixed batch: "
    "W weights (parameters and buffers), G gradients, O optimiser state (plus any method state), A activations saved "
    "for the backward pass. *Step ms* is the median of alternating timed steps on that batch; *× floor* is the median "
    "over rounds of its step time divided by the floor's in the same round (the floor: the frozen base's forward plus "
    "an activation-only backward), *× full* the same against full fine-tuning's step. Train time excludes "
    "evaluation. Peer columns divide our number by Hugging Face PEFT's for the same cell (same start weights, data "
    "order, optimiser, schedule and steps); the step ratio is again the median of same-round ratios, and the quality "
    "difference compares the seeds both ran."
)


def write_report(
    folders: list[Path], stem: Path, title: str = "peftlab benchmark", preface: str | None = None
) -> tuple[Path, Path]:
    """Write ``<stem>.md``, ``<stem>.html`` and ``<stem>/*.png`` from the results in ``folders``; ``preface``
    (Markdown text, e.g. what the reader must know about the machine and budget) is quoted under the title, one
    block per paragraph."""
    collected = collect(folders)
    images = stem.parent / stem.name
    plt = _pyplot()
    doc = Doc()
    doc.h(1, title)
    for paragraph in re.split(r"\n\s*\n", preface or ""):
        if paragraph.strip():
            doc.quote(paragraph.strip())
    for s in collected.suites:
        train = ", ".join(f"{k} {v}" for k, v in s["train"].items())
        doc.p(
            f"**Suite `{s['name']}`**: {s['description']} Budget: {s['budget']} per cell"
            + (f" ({train})" if train else "")
            + f"; seeds {', '.join(map(str, s['seeds']))}."
        )
    doc.items(environment(collected))
    doc.p(READING)
    if plt is None:
        doc.p("(matplotlib is not installed: the plots are missing; `pip install matplotlib` and rebuild the report)")
    if collected.groups:
        doc.h(2, "Standings")
        for group in collected.groups:
            doc.p(f"**{group.title}** ({group.suite}; {group.budget}):")
            doc.items(standings(group))
    several_machines = len(report_machines(collected)) > 1
    for group in collected.groups:
        doc.h(2, f"{group.title} ({group.suite})")
        batch = group.speed.get("batch") if group.speed else None
        facts = [f"budget {group.budget}" if group.budget else "", f"quality: test {group.metric}"]
        if several_machines:  # say which rows came from which machine (speed is only comparable within one)
            facts.append("run on " + " and ".join(group_machines(group)))
        if batch:
            facts.append(
                f"speed and memory on one batch of {batch['examples']} examples × {batch['length']} tokens "
                f"({batch['tokens']} real tokens), {group.speed.get('repeats')} alternating repeats"
            )
        doc.p("; ".join(f for f in facts if f) + ".")
        doc.table(*method_table(group))
        header, rows = peer_table(group)
        if rows:
            doc.p("**Against Hugging Face PEFT** (the same cells run through `peft`):")
            doc.table(header, rows)
        if plt is not None:
            for kind, plot in (("quality", plot_quality), ("memory", plot_memory), ("speed", plot_speed)):
                if kind != "quality" and not memory_rows(group):  # no micro-benchmark results
                    continue
                name = f"{group.slug}-{kind}.png"
                plot(plt, group, images / name)
                doc.image(f"{images.name}/{name}", f"{group.title}: {kind}")
    doc.h(2, "Method settings")
    settings_rows = {}
    for group in collected.groups:
        for r in group.ours():
            key = (r.label, json.dumps(r.first.get("config"), sort_keys=True), r.first.get("lr"))
            settings_rows.setdefault(key, set()).add(group.suite)
    doc.table(
        ["method", "config", "lr", "suites"],
        [
            [f"**{label}**", f"`{config}`", f"{lr:g}", ", ".join(sorted(s))]
            for (label, config, lr), s in settings_rows.items()
        ],
    )
    if collected.notes:
        doc.h(2, "Notes")
        doc.items(collected.notes)
    md, page = stem.with_suffix(".md"), stem.with_suffix(".html")
    write_text(md, doc.markdown())
    write_text(page, doc.html(title))
    write_text(stem.with_suffix(".json"), json.dumps(summary(collected), indent=1) + "\n")
    return md, page


def summary(collected: Collected) -> list[dict]:
    """The aggregated numbers behind the tables, for programs (``<stem>.json``)."""
    out = []
    for group in collected.groups:
        rows = []
        for (label, implementation), r in group.rows.items():
            side = "peer" if implementation == "peft" else "ours"
            rows.append(
                {
                    "label": label,
                    "method": r.method,
                    "implementation": implementation,
                    "seeds": r.seeds,
                    "quality_mean": r.mean("quality", "value"),
                    "quality_std": r.std("quality", "value"),
                    "trainable": r.mean("params", "trainable"),
                    "changed": r.mean("params", "changed"),
                    "adapter_bytes": r.mean("adapter_bytes"),
                    "train_seconds": r.mean("train_seconds"),
                    "tokens_per_second": r.mean("tokens_per_second"),
                    "memory": memory_of(group, label, side),
                    "step_seconds": step_times(group, label)[side],
                    "lr": r.first.get("lr"),
                }
            )
        speed = {label: step_times(group, label) for label, impl in group.rows if impl == "peftlab"}
        out.append(
            {
                "suite": group.suite,
                "model": group.model,
                "task": group.task,
                "metric": group.metric,
                "higher_is_better": group.higher_is_better,
                "rows": rows,
                "step_seconds": speed,
            }
        )
    return out
