"""The plan of a bench run: the suite's methods resolved (variants), its groups (one model on one task) and cells
(one method x learning rate x seed x implementation), what a run may be narrowed to (``Filters``), and whether a
cell is finished (its ``cell.json`` holds the fingerprint of its configuration).

Without a learning-rate grid every variant trains at its base rate only. With one, each factor of the grid gives
the variant's cells at ``base rate x factor``: the base rate's cells keep their folder (``<label>/seed<k>``), the
other rates' cells go beside it (``<label>@lr<rate>/seed<k>``). PEFT peer cells run at the base rate only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileio import read_json
from ..methods import Method, all_methods, config_from_dict, config_to_dict, get_method
from . import assets
from .peer import peer_note
from .suite import MethodEntry, Suite, TaskEntry, fingerprint

CELL = "cell.json"
FAILED = "failed.json"
SPEED = "speed.json"


@dataclass
class Variant:
    """One method entry of the suite, resolved: the registered method, its config and learning rate."""

    entry: MethodEntry
    method: Method
    config: Any
    lr: float  # the base rate: the suite's lr for the entry, else the method's own

    @property
    def label(self) -> str:
        return self.entry.label

    def peer_note(self, task_kind: str) -> str | None:
        """Why this variant has no like-for-like PEFT peer on a task of ``task_kind`` (None: it has one)."""
        return peer_note(self.method.name, self.config, task_kind)

    def has_peer(self, task_kind: str) -> bool:
        """Whether a peer cell runs: the suite did not turn it off (peer = false) and a like-for-like one exists."""
        return self.entry.peer is not False and self.peer_note(task_kind) is None


@dataclass
class Group:
    """One model on one task."""

    model_spec: str
    task: TaskEntry
    model: str
    data_name: str
    data: str

    @property
    def slug(self) -> str:
        return group_slug(self.model_spec, self.task.name)

    def options(self, method: str, out: Path | None = None):
        from ..run import RunOptions

        return RunOptions(
            model=self.model,
            data=self.data,
            method=method,
            out=str(out) if out else None,
            task=self.task.kind,
            **self.task.options,
        )


@dataclass
class Cell:
    group: Group
    variant: Variant
    seed: int
    peer: bool
    folder: Path
    lr: float  # the rate this cell trains at: the variant's base rate, or a multiple of it in a grid

    @property
    def at_base_rate(self) -> bool:
        return self.lr == self.variant.lr

    @property
    def name(self) -> str:
        who = "peft " if self.peer else ""
        rate = "" if self.at_base_rate else f" lr {self.lr:g}"
        return f"{self.group.slug} {who}{self.variant.label}{rate} seed {self.seed}"

    @property
    def tag(self) -> str:
        """How the console names the cell: ``[minilm / rotten_tomatoes / lora / seed 0]``, `` (peer)`` for PEFT's."""
        rate = "" if self.at_base_rate else f" lr {self.lr:g}"
        where = f"{self.group.model_spec} / {self.group.task.name} / {self.variant.label}{rate} / seed {self.seed}"
        return f"[{where}]" + (" (peer)" if self.peer else "")


@dataclass
class Plan:
    suite: Suite
    out: Path
    groups: list[Group]
    variants: list[Variant]
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)


@dataclass
class Filters:
    """Run only part of a suite (the report shows whatever cells are complete)."""

    methods: list[str] | None = None  # labels
    models: list[str] | None = None
    tasks: list[str] | None = None
    seeds: list[int] | None = None
    peers: bool = True
    speed: bool = True
    threads: int | None = None  # overrides the suite's threads
    reuse: list[Path] = field(default_factory=list)  # other bench folders whose identical finished cells are copied
    speed_only: bool = False  # run the micro-benchmark only, no cells
    remeasure: bool = False  # measure the micro-benchmark again even where it is done (e.g. on a quieter machine)
    model_dirs: dict[str, str] = field(default_factory=dict)  # model name -> local folder standing in for it
    lr_grid: list[float] | None = None  # factors of each base rate to search; overrides the suite's lr_grid


def group_slug(model_spec: str, task_name: str) -> str:
    """The folder of one model on one task inside a bench folder (its cells and its ``speed.json``)."""
    return f"{_slug(model_spec)}__{_slug(task_name)}"


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in text.replace(":", "-"))
    return keep.strip("-.") or "x"


def rate_folder(label: str, lr: float, base: float) -> str:
    """The folder of a method's cells at rate ``lr``: the label at the base rate, else ``<label>@lr<rate>``
    (labels hold no ``@``, so the two never meet)."""
    return label if lr == base else f"{label}@lr{lr:.12g}"


def grid_rates(base: float, factors: list[float] | None) -> list[float]:
    """The rates a variant trains at: the base rate itself (exactly) and ``base x factor`` for the other factors."""
    return [base if f == 1 else base * f for f in factors or [1.0]]


def resolve_variants(suite: Suite, notes: list[str]) -> list[Variant]:
    registered = [m.name for m in all_methods()]
    entries = list(suite.methods)
    if suite.all_methods:
        named = {e.name for e in entries}
        entries += [MethodEntry(name, name) for name in registered if name not in named]
    variants = []
    for e in entries:
        if e.name not in registered:
            notes.append(f"method {e.name!r} ({e.label}) is not registered in this peftlab: skipped")
            continue
        method = get_method(e.name)
        added = suite.all_methods and e not in suite.methods
        try:
            config = config_from_dict(method.config, e.options, f"{suite.source}: methods[{e.label}].options")
        except InputError as error:
            if not added:
                raise
            # a method added by all_methods whose defaults are not enough (AdapterFusion needs its stage-one
            # adapters): the suite must name it with options to run it
            notes.append(f"method {e.name!r} needs options the suite does not give ({error}): skipped")
            continue
        variants.append(Variant(e, method, config, e.lr or method.lr))
    return variants


def make_plan(suite: Suite, out: Path, filters: Filters | None = None) -> Plan:
    filters = filters or Filters()
    notes: list[str] = []
    variants = resolve_variants(suite, notes)
    if filters.methods:
        unknown = [m for m in filters.methods if m not in {v.label for v in variants}]
        if unknown:
            raise InputError(
                f"--methods: {unknown[0]!r} is not a method of suite {suite.name!r} "
                f"(its methods: {', '.join(v.label for v in variants)})"
            )
        variants = [v for v in variants if v.label in filters.methods]
    seeds = [s for s in suite.seeds if filters.seeds is None or s in filters.seeds]
    if filters.seeds and not seeds:
        raise InputError(f"--seeds: none of {filters.seeds} is a seed of suite {suite.name!r} ({suite.seeds})")
    asset_folder = out / "assets"
    groups = []
    for task in suite.tasks:
        if filters.tasks and task.name not in filters.tasks:
            continue
        for spec in task.models or suite.models:
            if filters.models and spec not in filters.models:
                continue
            assets.check_spec(spec)
            for d in task.data:
                assets.check_spec(d)
            model, why = assets.resolve_model(spec, asset_folder, filters.model_dirs)
            if model is None:
                notes.append(f"{spec} / {task.name}: skipped: {why}")
                continue
            data_name, data, why = assets.resolve_data(task.data, task.kind, asset_folder)
            if data is None:
                notes.append(f"{spec} / {task.name}: skipped: {why}")
                continue
            groups.append(Group(spec, task, model, data_name, data))
    if filters.tasks and not any(t.name in filters.tasks for t in suite.tasks):
        raise InputError(f"--tasks: none of {filters.tasks} is a task of suite {suite.name!r}")
    factors = filters.lr_grid or suite.lr_grid
    if factors:
        notes.append(
            f"learning-rate search over factors {', '.join(f'{f:g}' for f in factors)} of each method's base rate; "
            "PEFT peer cells and the speed micro-benchmark run at the base rate only"
        )
    cells = []
    for g in groups:
        for seed in seeds:  # seed by seed: a suite stopped early has every method at the first seeds
            for v in variants:
                for lr in grid_rates(v.lr, factors):
                    folder = out / g.slug / rate_folder(v.label, lr, v.lr) / f"seed{seed}"
                    cells.append(Cell(g, v, seed, False, folder, lr))
                    if lr == v.lr and v.has_peer(g.task.kind) and filters.peers:
                        cells.append(Cell(g, v, seed, True, folder / "peer", lr))
    for v in (v for v in variants if v.entry.peer):  # a peer asked for by name (peer = true) that cannot be had
        for kind in dict.fromkeys(g.task.kind for g in groups):
            why_not = v.peer_note(kind)
            if why_not:
                notes.append(f"{v.label}: no peer column on {kind} tasks ({why_not})")
    return Plan(suite, out, groups, variants, cells, notes)


# --- configuration fingerprints ---------------------------------------------------------------------------------


# What peftlab does where a suite says nothing, by revision: a cell trained under other defaults is not reused.
# 2: a classifier reads what its checkpoint was trained with (--pooling auto), the task head is its own group.
# 3: the task head's floor is 5e-3 (was 2e-2); DyLoRA trains every component up to b; UniPELT's LoRA is all-linear.
DEFAULTS_REVISION = 3


def cell_config(cell: Cell, suite: Suite) -> dict:
    """Everything that decides a cell's result (its fingerprint is a hash of this)."""
    g, v = cell.group, cell.variant
    return {
        "defaults": DEFAULTS_REVISION,
        "model": g.model_spec,
        "task": g.task.name,
        "kind": g.task.kind,
        "data": g.data_name,
        "task_options": g.task.options,
        "method": v.method.name,
        "label": v.label,
        "config": config_to_dict(v.config),
        "lr": cell.lr,
        "train": suite.train,
        "budget": suite.budget,
        "seed": cell.seed,
        "peer": cell.peer,
    }


def finished(cell: Cell, suite: Suite) -> bool:
    path = cell.folder / CELL
    if not path.is_file():
        return False
    try:
        return read_json(path, "bench cell").get("fingerprint") == fingerprint(cell_config(cell, suite))
    except InputError:
        return False
