"""Benchmark suites: methods x models x tasks x seeds under one budget, read from a TOML file.

A suite file (packaged ones live in ``peftlab/bench/suites/``; any other path works too)::

    name = "methods"
    description = "every registered method on MiniLM / Rotten Tomatoes"
    seeds = [0, 1, 2]
    models = ["minilm"]                  # packaged names, Hugging Face folders, or tiny:bert / tiny:llama
    all_methods = true                   # also every registered method the list below does not name
    threads = 1                          # torch CPU threads (optional; one is fastest on an oversubscribed machine)
    lr_grid = [0.3, 1, 3]                # optional: a learning-rate search (``--lr-grid`` on the command line wins)

    [budget]                             # the same for every cell: max_steps = N or epochs = X
    max_steps = 300

    [train]                              # TrainSettings shared by every cell (not lr, seed, steps or epochs)
    batch_size = 32

    [speed]                              # the step-time micro-benchmark
    repeats = 7

    [[tasks]]
    name = "rotten_tomatoes"             # the label in the report
    task = "classify"                    # classify | tag | span | sft
    data = ["rotten_tomatoes"]           # the first one available is used
    options = { max_length = 128 }       # RunOptions fields (max_length, eval_generate, ...)
    models = ["minilm"]                  # optional: instead of the suite's models

    [[methods]]
    name = "lora"                        # a registered method; an unregistered one is skipped with a note
    label = "rslora"                     # optional: the name in the report (default: name)
    lr = 1e-3                            # optional: the tuned learning rate (default: the method's own), recorded
    options = { rslora = true }          # the method's config fields
    peer = true                          # optional: also run it through Hugging Face PEFT (default: when PEFT has it)

Every key is checked: an unknown one is an error naming the file and the nearest known key.

``lr_grid`` turns on a learning-rate search: each factor multiplies a method entry's base rate (its ``lr``, else the
method's own) and every rate trains as its own cells; factor 1 (the base rate) is always tried, added if missing.
Per model, task and method the report keeps the rate with the best mean validation metric over the finished seeds
(ties: the rate nearest the base rate on a log scale); test metrics take no part in the choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError, suggest

TASK_KINDS = ("classify", "tag", "span", "sft")
# The quality a task kind is judged by (its test metric) and whether higher is better.
DEFAULT_METRIC = {"classify": "accuracy", "tag": "f1", "span": "f1", "sft": "loss"}
LOWER_IS_BETTER = {"loss", "perplexity"}
# TrainSettings fields a suite may not set in [train]: the budget and the seed are the suite's own axes, and the
# learning rate belongs to each method.
RESERVED_TRAIN = ("lr", "seed", "max_steps", "epochs")
# RunOptions fields that each cell sets itself.
RESERVED_OPTIONS = ("model", "data", "method", "out", "task", "adapter")


@dataclass
class MethodEntry:
    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None
    peer: bool | None = None  # None: when Hugging Face PEFT has the method


@dataclass
class TaskEntry:
    name: str
    kind: str
    data: list[str]
    options: dict[str, Any] = field(default_factory=dict)
    models: list[str] | None = None
    metric: str | None = None

    @property
    def quality_metric(self) -> str:
        return self.metric or DEFAULT_METRIC[self.kind]


@dataclass
class SpeedSettings:
    enabled: bool = True
    repeats: int = 7  # timed steps per variant, taken in alternation with the others
    warmup: int = 2  # untimed steps per variant first (optimiser state, allocator, caches)
    references: list[str] = field(default_factory=lambda: ["floor", "full"])


@dataclass
class Suite:
    name: str
    description: str
    seeds: list[int]
    models: list[str]
    tasks: list[TaskEntry]
    methods: list[MethodEntry]
    budget: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    all_methods: bool = False
    threads: int | None = None  # torch CPU threads for the whole suite (None: torch's default)
    lr_grid: list[float] | None = None  # factors of each method's base rate to search (None: the base rate only)
    source: str = ""
    text: str = ""  # the file as read, kept beside the results

    def budget_text(self) -> str:
        if "max_steps" in self.budget:
            return f"{self.budget['max_steps']} optimiser steps"
        return f"{self.budget['epochs']:g} epochs"


_TOP = {
    "name",
    "description",
    "seeds",
    "models",
    "tasks",
    "methods",
    "budget",
    "train",
    "speed",
    "all_methods",
    "threads",
    "lr_grid",
}
_TASK = {"name", "task", "data", "options", "models", "metric"}
_METHOD = {"name", "label", "lr", "options", "peer"}
_SPEED = {f.name for f in dataclasses.fields(SpeedSettings)}


def packaged_suites() -> dict[str, Path]:
    """Suite name -> file, for the suites shipped with peftlab."""
    folder = resources.files("peftlab.bench") / "suites"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def find_suite(name_or_path: str) -> Path:
    suites = packaged_suites()
    if name_or_path in suites:
        return suites[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise InputError(
        f"suite: {name_or_path!r} is neither a packaged suite ({', '.join(sorted(suites))}) nor a file"
        f"{suggest(name_or_path, suites)}"
    )


def load_suite(name_or_path: str) -> Suite:
    path = find_suite(name_or_path)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not a valid TOML file ({e})") from None
    suite = parse_suite(data, str(path))
    suite.text = text
    return suite


def _keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise InputError(
                f"{where}: unknown key {key!r}{suggest(key, allowed)}; known: {', '.join(sorted(allowed))}"
            )


def _string_list(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise InputError(f"{where}: expected a name or a non-empty list of names, got {value!r}")
    return items


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a table of name = value pairs, got {value!r}")
    return value


def parse_suite(data: dict, source: str) -> Suite:
    """A Suite from the parsed TOML, every key and value checked (errors name ``source`` and the key)."""
    from ..run import RunOptions
    from ..train.loop import TrainSettings

    _keys(data, _TOP, source)
    for key in ("name", "seeds", "tasks", "budget"):
        if key not in data:
            raise InputError(f"{source}: missing key {key!r}")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise InputError(f"{source}: seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"{source}: seeds: {seeds!r} names a seed twice")
    models = _string_list(data.get("models", []), f"{source}: models") if "models" in data else []

    budget = _table(data["budget"], f"{source}: budget")
    _keys(budget, {"max_steps", "epochs"}, f"{source}: budget")
    if len(budget) != 1:
        raise InputError(f"{source}: budget: give exactly one of max_steps = N or epochs = X")
    if "max_steps" in budget and not (isinstance(budget["max_steps"], int) and budget["max_steps"] > 0):
        raise InputError(f"{source}: budget.max_steps: expected a positive integer, got {budget['max_steps']!r}")
    if "epochs" in budget:
        epochs = budget["epochs"]
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
            raise InputError(f"{source}: budget.epochs: expected a positive number, got {epochs!r}")

    train = _table(data.get("train", {}), f"{source}: train")
    train_fields = {f.name for f in dataclasses.fields(TrainSettings)} - set(RESERVED_TRAIN)
    for key in train:
        if key in RESERVED_TRAIN:
            raise InputError(
                f"{source}: train.{key}: set by the suite itself (budget, seeds, or each method's lr), not in [train]"
            )
    _keys(train, train_fields, f"{source}: train")
    settings(train, budget, seed=0, lr=None, source=f"{source}: train")  # checks the values

    speed_table = _table(data.get("speed", {}), f"{source}: speed")
    _keys(speed_table, _SPEED, f"{source}: speed")
    speed = SpeedSettings(**speed_table)
    if not isinstance(speed.repeats, int) or speed.repeats < 1:
        raise InputError(f"{source}: speed.repeats: expected a positive integer, got {speed.repeats!r}")
    if not isinstance(speed.warmup, int) or speed.warmup < 0:
        raise InputError(f"{source}: speed.warmup: expected an integer >= 0, got {speed.warmup!r}")
    unknown = [r for r in speed.references if r not in ("floor", "full")]
    if unknown:
        raise InputError(f"{source}: speed.references: expected 'floor' and/or 'full', got {unknown[0]!r}")

    option_fields = {f.name for f in dataclasses.fields(RunOptions)} - set(RESERVED_OPTIONS)
    tasks = []
    for i, t in enumerate(data["tasks"] if isinstance(data["tasks"], list) else [None]):
        where = f"{source}: tasks[{i}]"
        t = _table(t, where)
        _keys(t, _TASK, where)
        for key in ("name", "task", "data"):
            if key not in t:
                raise InputError(f"{where}: missing key {key!r}")
        if t["task"] not in TASK_KINDS:
            raise InputError(f"{where}: task: expected one of {', '.join(TASK_KINDS)}, got {t['task']!r}")
        options = _table(t.get("options", {}), f"{where}.options")
        for key in options:
            if key in RESERVED_OPTIONS:
                raise InputError(f"{where}.options: {key!r} is set by each cell, not by the task")
        _keys(options, option_fields, f"{where}.options")
        task = TaskEntry(
            name=str(t["name"]),
            kind=t["task"],
            data=_string_list(t["data"], f"{where}.data"),
            options=options,
            models=_string_list(t["models"], f"{where}.models") if "models" in t else None,
            metric=t.get("metric"),
        )
        if not (task.models or models):
            raise InputError(f"{where}: no models: give the suite's models or the task's own")
        tasks.append(task)
    if not tasks:
        raise InputError(f"{source}: tasks: expected at least one [[tasks]] table")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: tasks: two tasks are called {next(n for n in names if names.count(n) > 1)!r}")

    methods = []
    for i, m in enumerate(data.get("methods", [])):
        where = f"{source}: methods[{i}]"
        m = _table(m, where)
        _keys(m, _METHOD, where)
        if "name" not in m:
            raise InputError(f"{where}: missing key 'name'")
        lr = m.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise InputError(f"{where}: lr: expected a positive number, got {lr!r}")
        peer = m.get("peer")
        if peer is not None and not isinstance(peer, bool):
            raise InputError(f"{where}: peer: expected true or false, got {peer!r}")
        label = str(m.get("label", m["name"]))
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", label):
            raise InputError(f"{where}: label: {label!r} may hold only letters, digits and _ . + -")
        methods.append(
            MethodEntry(label, str(m["name"]), _table(m.get("options", {}), f"{where}.options"), lr and float(lr), peer)
        )
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise InputError(
            f"{source}: methods: two entries are labelled {next(x for x in labels if labels.count(x) > 1)!r}"
        )
    all_methods = data.get("all_methods", False)
    if not isinstance(all_methods, bool):
        raise InputError(f"{source}: all_methods: expected true or false, got {all_methods!r}")
    threads = data.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"{source}: threads: expected a positive integer, got {threads!r}")
    lr_grid = lr_factors(data["lr_grid"], f"{source}: lr_grid") if "lr_grid" in data else None
    if not methods and not all_methods:
        raise InputError(f"{source}: no methods: give [[methods]] tables or all_methods = true")
    return Suite(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        seeds=seeds,
        models=models,
        tasks=tasks,
        methods=methods,
        budget=budget,
        train=train,
        speed=speed,
        all_methods=all_methods,
        threads=threads,
        lr_grid=lr_grid,
        source=source,
    )


def lr_factors(values: Any, where: str) -> list[float]:
    """The factors of a learning-rate grid, checked (positive numbers, none twice), with 1 added, in rising order."""
    if not isinstance(values, list) or not values:
        raise InputError(f"{where}: expected a non-empty list of positive numbers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
            raise InputError(f"{where}: expected positive numbers, got {v!r}")  # 0, negative, nan, inf, text
    factors = [float(v) for v in values]
    twice = [f for f in factors if factors.count(f) > 1]
    if twice:
        raise InputError(f"{where}: factor {twice[0]:g} is named twice")
    return sorted({*factors, 1.0})


def parse_lr_grid(text: str) -> list[float]:
    """``--lr-grid 0.3,1,3``: the comma-separated factors, checked as ``lr_factors`` checks them."""
    values: list[Any] = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise InputError(
                f"--lr-grid: expected comma-separated positive numbers such as 0.3,1,3, got {part.strip()!r}"
            ) from None
    return lr_factors(values, "--lr-grid")


def settings(train: dict, budget: dict, seed: int, lr: float | None, source: str = "suite"):
    """The TrainSettings of one cell: the suite's [train] values, its budget, the seed and the method's lr."""
    from ..methods import config_from_dict
    from ..train.loop import TrainSettings

    values = {**train, "seed": seed, "lr": lr}
    if "max_steps" in budget:
        values["max_steps"] = budget["max_steps"]  # the steps decide (the loop ignores epochs then)
    else:
        values["epochs"] = float(budget["epochs"])
    return config_from_dict(TrainSettings, values, source)


def fingerprint(payload: dict) -> str:
    """A short stable hash of a cell's full configuration: a finished cell counts only while it matches."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
