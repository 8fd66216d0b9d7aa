"""Reading a benchmark's results: every ``cell.json`` and ``speed.json`` under the bench folders, aggregated over
seeds per model and task (``collect``), and the micro-benchmark numbers of one method in a group (step times,
same-round step ratios, the memory split). Where a method's cells span a learning-rate grid, its rows keep the cells
at the rate chosen on validation data (``lr_search``) and the group records the search."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .lr_search import LrSearch, search_rates


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
        """The first seed's cell; empty for a method measured by the micro-benchmark only (no cells)."""
        return self.cells[0] if self.cells else {}

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
    lr_search: dict[str, LrSearch] = field(default_factory=dict)  # label -> its learning-rate search, if it had one

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
    speed_read: set[Path] = set()
    counted: set[tuple] = set()  # (group, cell fingerprint): each cell counts once, however many folders hold it
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
            group = groups[key]
            speed_file = path.parents[3 if path.parent.name == "peer" else 2] / "speed.json"
            if speed_file not in speed_read and speed_file.is_file():
                speed_read.add(speed_file)
                merge_speed(group, json.loads(speed_file.read_text(encoding="utf-8")))
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
            if (key, cell.get("fingerprint")) in counted:  # the same cell copied into another folder (--reuse)
                continue
            counted.add((key, cell.get("fingerprint")))
            group.rows[row_key].cells.append(cell)
        if suite is not None:
            add_speed_only_groups(folder, suite, groups, speed_read)
        for path in sorted(folder.glob("*/*/seed*/failed.json")) + sorted(folder.glob("*/*/seed*/peer/failed.json")):
            failure = json.loads(path.read_text(encoding="utf-8"))
            notes.append(f"failed: {failure['cell']}: {failure['error']}")
    ordered = sorted(groups.values(), key=lambda g: (g.suite, g.task, g.model))
    for group in ordered:
        group.rows = dict(sorted(group.rows.items(), key=lambda kv: _method_order(kv[0][0])))
        group.lr_search = keep_chosen_rates(group)
    return Collected(ordered, notes, suites)


def add_speed_only_groups(folder: Path, suite, groups: dict, speed_read: set[Path]) -> None:
    """Groups whose micro-benchmark ran without cells (``--speed-only``, e.g. a model too large to train here): a
    group of the suite's model and task with a row per measured method, so the report shows their memory split and
    step ratios (quality "-")."""
    from .plan import group_slug
    from .suite import DEFAULT_METRIC

    methods = {m.label: m.name for m in suite.methods}
    for model in suite.models:
        for task in suite.tasks:
            path = folder / group_slug(model, task.name) / "speed.json"
            if path in speed_read or not path.is_file():
                continue
            speed_read.add(path)
            speed = json.loads(path.read_text(encoding="utf-8"))
            key = (suite.name, model, task.name)
            if key not in groups:
                metric = task.metric or DEFAULT_METRIC[task.kind]
                groups[key] = Group(suite.name, model, task.name, task.kind, metric, metric != "loss",
                                    budget=suite.budget_text(), seeds=suite.seeds)  # fmt: skip
            group = groups[key]
            merge_speed(group, speed)
            for label, entry in (speed.get("methods") or {}).items():
                if "ours" in entry and (label, "peftlab") not in group.rows:
                    method = methods.get(label, label)
                    group.rows[(label, "peftlab")] = Row(suite.name, model, task.name, task.kind, label, method,
                                                         "peftlab")  # fmt: skip


def merge_speed(group: Group, speed: dict) -> None:
    """Add one folder's micro-benchmark to its group: a report over several folders of one suite (methods split
    across runs) gets every method's step and memory, but only from measurements on the same batch, so the
    columns stay comparable; the first folder's measurement of a method wins."""
    if not group.speed:
        group.speed = speed
        return
    if speed.get("batch") != group.speed.get("batch"):
        return
    for part in ("methods", "references"):
        have = group.speed.setdefault(part, {})
        for label, entry in (speed.get(part) or {}).items():
            have.setdefault(label, entry)


def keep_chosen_rates(group: Group) -> dict[str, LrSearch]:
    """The learning-rate search of each method whose cells span a grid; its rows (peftlab's and the peer's) keep
    only the cells at the chosen rate (a peer row with none there is dropped: peers run at the base rate only)."""
    searches = {}
    for label, implementation in list(group.rows):
        if implementation != "peftlab":
            continue
        search = search_rates(label, group.rows[(label, implementation)].cells)
        if search is None:
            continue
        searches[label] = search
        for key in ((label, "peftlab"), (label, "peft")):
            if key in group.rows:
                group.rows[key].cells = [c for c in group.rows[key].cells if c["lr"] == search.chosen]
                if not group.rows[key].cells:
                    del group.rows[key]
    return searches


def _method_order(label: str) -> tuple[int, str]:
    return (0 if label == "full" else 1, label)


# --- the micro-benchmark's numbers ------------------------------------------------------------------------------


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
