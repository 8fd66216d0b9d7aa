"""Running a suite: the plan of groups and cells, the speed micro-benchmark, the cells themselves, and resuming.

Layout of a bench folder::

    <bench>/suite.toml                         the suite as it was run
    <bench>/assets/                            tiny and derived models and data built on the fly
    <bench>/<model>__<task>/speed.json         step times and memory split per method (micro-benchmark)
    <bench>/<model>__<task>/<label>/seed<k>/run/       peftlab's run folder (results.json, adapter/, ...)
    <bench>/<model>__<task>/<label>/seed<k>/cell.json  the cell's record (see ``cell_record``)
    <bench>/<model>__<task>/<label>/seed<k>/peer/cell.json  the same cell trained through Hugging Face PEFT
    <bench>/report.md, report.html, report/*.png

A group is one model on one task. Per group, the micro-benchmark runs first (its memory split goes into every
cell's record), then the cells: each method x seed through ``peftlab.run.run_training`` in this process, and its
PEFT peer where there is one. A cell whose ``cell.json`` exists with the same configuration fingerprint is
skipped; an interrupted peftlab cell continues from its last checkpoint; a cell that fails leaves ``failed.json``
with the error and is tried again on the next run.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..core.attach import attach
from ..core.hooks import TrainingHooks
from ..errors import InputError
from ..fileio import read_json, remove_stale_temporaries, write_json, write_text
from ..methods import Method, all_methods, config_from_dict, config_to_dict, get_method
from . import assets
from .measure import FloorStep, TrainStep, alternate
from .peer import build_peer, peer_bytes, peer_hooks, peer_note
from .suite import LOWER_IS_BETTER, MethodEntry, Suite, TaskEntry, fingerprint, settings

CELL = "cell.json"
FAILED = "failed.json"
SPEED = "speed.json"


@dataclass
class Variant:
    """One method entry of the suite, resolved: the registered method, its config and learning rate."""

    entry: MethodEntry
    method: Method
    config: Any
    lr: float

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
        return f"{_slug(self.model_spec)}__{_slug(self.task.name)}"

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

    @property
    def name(self) -> str:
        who = "peft " if self.peer else ""
        return f"{self.group.slug} {who}{self.variant.label} seed {self.seed}"


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


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in text.replace(":", "-"))
    return keep.strip("-.") or "x"


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
    cells = []
    for g in groups:
        for seed in seeds:  # seed by seed: a suite stopped early has every method at the first seeds
            for v in variants:
                folder = out / g.slug / v.label / f"seed{seed}"
                cells.append(Cell(g, v, seed, False, folder))
                if v.has_peer(g.task.kind) and filters.peers:
                    cells.append(Cell(g, v, seed, True, folder / "peer"))
    for v in (v for v in variants if v.entry.peer):  # a peer asked for by name (peer = true) that cannot be had
        for kind in dict.fromkeys(g.task.kind for g in groups):
            why_not = v.peer_note(kind)
            if why_not:
                notes.append(f"{v.label}: no peer column on {kind} tasks ({why_not})")
    return Plan(suite, out, groups, variants, cells, notes)


# --- configuration fingerprints ---------------------------------------------------------------------------------


def cell_config(cell: Cell, suite: Suite) -> dict:
    """Everything that decides a cell's result (its fingerprint is a hash of this)."""
    g, v = cell.group, cell.variant
    return {
        "model": g.model_spec,
        "task": g.task.name,
        "kind": g.task.kind,
        "data": g.data_name,
        "task_options": g.task.options,
        "method": v.method.name,
        "label": v.label,
        "config": config_to_dict(v.config),
        "lr": v.lr,
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


# --- running ----------------------------------------------------------------------------------------------------


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        disable=not enabled,
    )


class Runner:
    def __init__(self, plan: Plan, filters: Filters, show_progress: bool, log=print):
        self.plan = plan
        self.suite = plan.suite
        self.filters = filters
        self.show_progress = show_progress
        self.log = log
        self._prepared: tuple[str, Any] | None = None

    def prepared(self, group: Group):
        """The group's tokenised data (cached for the group's peer cells and micro-benchmark)."""
        from ..run import prepare_data

        if self._prepared is None or self._prepared[0] != group.slug:
            self._prepared = (group.slug, prepare_data(group.options("full"), quiet=True))
        return self._prepared[1]

    def run(self) -> dict[str, int]:
        plan, suite = self.plan, self.suite
        threads = self.filters.threads or suite.threads
        if threads:
            torch.set_num_threads(threads)
        plan.out.mkdir(parents=True, exist_ok=True)
        write_text(plan.out / "suite.toml", suite.text or "")
        todo = [] if self.filters.speed_only else [c for c in plan.cells if not finished(c, suite)]
        reused = [c for c in todo if self.reuse_cell(c)]
        todo = [c for c in todo if c not in reused]
        for group in plan.groups:
            self.reuse_speed(group)
        speed_todo = {g.slug: self.speed_missing(g) for g in plan.groups} if self.filters.speed else {}
        units = len(todo) + sum(len(v) for v in speed_todo.values())
        counts = {
            "cells": len(plan.cells),
            "done_before": len(plan.cells) - len(todo) - len(reused),
            "reused": len(reused),
            "ran": 0,
            "failed": 0,
        }
        with _progress(self.show_progress) as bar:
            job = bar.add_task("", total=max(units, 1), rate="")
            completed = 0

            def advance(what: str, seconds: float) -> None:
                nonlocal completed
                completed += 1
                bar.update(job, completed=completed, rate=f"{seconds:.0f} s/unit", description=what)

            for group in plan.groups:
                missing = speed_todo.get(group.slug, [])
                if missing:
                    self.measure_speed(group, missing, advance, bar, job)
                for cell in [c for c in todo if c.group is group]:
                    bar.update(job, description=cell.name)
                    started = torch_time()
                    ok = self.run_cell(cell)
                    counts["ran"] += 1
                    counts["failed"] += not ok
                    advance(cell.name, torch_time() - started)
        return counts

    # --- reusing identical cells of other bench folders ------------------------------------------------------

    def reuse_cell(self, cell: Cell) -> bool:
        """Copy the cell from a ``--reuse`` folder where the same cell (same fingerprint) is finished."""
        want = fingerprint(cell_config(cell, self.suite))
        for other in self.filters.reuse:
            source = other / cell.folder.relative_to(self.plan.out)
            path = source / CELL
            if not path.is_file() or read_json(path, "bench cell").get("fingerprint") != want:
                continue
            shutil.copytree(
                source, cell.folder, ignore=shutil.ignore_patterns("peer", "checkpoint", "scratch"), dirs_exist_ok=True
            )
            record = read_json(path, "bench cell") | {"suite": self.suite.name, "reused_from": str(source)}
            write_json(cell.folder / CELL, record)
            return True
        return False

    def reuse_speed(self, group: Group) -> None:
        """Copy micro-benchmark entries measured with the same configuration in a ``--reuse`` folder."""
        path = self.speed_path(group)
        record = read_json(path, "speed results") if path.is_file() else {}
        changed = False
        for other in self.filters.reuse:
            theirs_path = other / path.relative_to(self.plan.out)
            if not theirs_path.is_file():
                continue
            theirs = read_json(theirs_path, "speed results")
            for variant in self.plan.variants:
                entry = (theirs.get("methods") or {}).get(variant.label)
                if (
                    entry
                    and entry.get("fingerprint") == fingerprint(self.speed_config(group, variant))
                    and self.speed_entry(group, variant) is None
                ):
                    for key in ("batch", "repeats", "warmup", "references"):
                        record.setdefault(key, theirs.get(key))
                    record.setdefault("methods", {})[variant.label] = entry
                    write_json(path, record)
                    changed = True
        if changed:
            self.log(
                f"[bench] {group.slug}: micro-benchmark entries reused from {', '.join(map(str, self.filters.reuse))}"
            )

    # --- cells ----------------------------------------------------------------------------------------------

    def run_cell(self, cell: Cell) -> bool:
        cell.folder.mkdir(parents=True, exist_ok=True)
        (cell.folder / FAILED).unlink(missing_ok=True)
        try:
            record = self.run_peer(cell) if cell.peer else self.run_ours(cell)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failing cell is recorded and the suite goes on
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.log(f"[bench] {cell.name}: failed: {message}")
            write_json(
                cell.folder / FAILED,
                {"cell": cell.name, "error": message, "traceback": traceback.format_exc().splitlines()[-12:]},
            )
            return False
        write_json(cell.folder / CELL, record)
        return True

    def cell_settings(self, cell: Cell):
        return settings(self.suite.train, self.suite.budget, cell.seed, cell.variant.lr, f"{self.suite.source}: train")

    def run_ours(self, cell: Cell) -> dict:
        from ..run import run_training

        run = cell.folder / "run"
        resume = (run / "checkpoint").exists() and (run / "config.json").exists()
        if run.exists() and not resume:
            shutil.rmtree(run)
        options = cell.group.options(cell.variant.method.name, run)
        results = run_training(
            options, self.cell_settings(cell), cell.variant.config, resume=resume, show_progress=False
        )
        shutil.rmtree(run / "checkpoint", ignore_errors=True)  # only needed to resume; can be large
        return self.cell_record(cell, results)

    def run_peer(self, cell: Cell) -> dict:
        from ..run import build_model, generation_metrics, git_commit, machine, make_task, pick_device, versions
        from ..train.loop import autocast_for, fit

        group, variant = cell.group, cell.variant
        scratch = cell.folder / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        prepared = self.prepared(group)
        options = group.options(variant.method.name)
        train_settings = self.cell_settings(cell)
        device = pick_device(options.device)
        total = total_steps(train_settings, len(prepared.splits["train"]))
        ours = attach(build_model(options, prepared, cell.seed), variant.method, variant.config)
        peer = build_peer(ours, build_model(options, prepared, cell.seed), group.task.kind, scratch / "init", total)
        del ours
        peer.model.to(device)
        task = make_task(prepared)
        best: dict[str, Any] = {}
        result = fit(
            peer,
            task,
            prepared.splits["train"],
            prepared.splits["validation"],
            train_settings,
            variant.lr,
            scratch / "checkpoint",
            lambda metrics, step: best.update(state=peer.snapshot()),
            device,
            show_progress=False,
            hooks=peer_hooks(peer),
        )
        peer.restore(best["state"])
        autocast = autocast_for(train_settings.precision, device)
        test = task.evaluate(peer.model, prepared.splits["test"], train_settings.eval_batch_size, device, autocast)
        generated = generation_metrics(options, prepared, peer.model, train_settings.eval_batch_size)
        test.update(generated.pop("test", {}))
        adapter_bytes = peer_bytes(peer, cell.folder / "adapter")
        shutil.rmtree(scratch, ignore_errors=True)
        results = {
            "metrics": {"validation": result.best, "test": test, **generated},
            "params": {"total": sum(p.numel() for p in peer.model.parameters()), "trainable": peer.trainable_count()},
            "adapter_bytes": adapter_bytes,
            "train_seconds": result.train_seconds,
            "examples_per_second": result.examples / max(result.train_seconds, 1e-9),
            "tokens_per_second": result.tokens / max(result.train_seconds, 1e-9),
            "steps": result.steps,
            "best_step": result.best_step,
            "lr": variant.lr,
            "versions": versions() | {"peft": _peft_version()},
            "git_commit": git_commit(),
            "machine": machine(),
        }
        return self.cell_record(cell, results)

    def cell_record(self, cell: Cell, results: dict) -> dict:
        """The cell's JSON: configuration, accounting, cost and quality (see the module docstring)."""
        config = cell_config(cell, self.suite)
        metric = cell.group.task.quality_metric
        test = (results.get("metrics") or {}).get("test") or {}
        params = dict(results.get("params") or {})
        if isinstance(params.get("delta_rank"), dict):  # the summary; the per-matrix ranks stay in results.json
            params["delta_rank"] = {k: v for k, v in params["delta_rank"].items() if k != "per_matrix"}
        speed = self.speed_entry(cell.group, cell.variant)
        side = "peer" if cell.peer else "ours"
        return {
            "suite": self.suite.name,
            "fingerprint": fingerprint(config),
            **config,
            "implementation": "peft" if cell.peer else "peftlab",
            "quality": {
                "metric": metric,
                "value": test.get(metric),
                "higher_is_better": metric not in LOWER_IS_BETTER,
            },
            "metrics": results.get("metrics"),
            "params": params,
            "adapter_bytes": results.get("adapter_bytes"),
            "memory": (speed or {}).get(side, {}).get("memory"),
            "step_seconds": (speed or {}).get(side, {}).get("median"),
            "peak_memory_bytes": results.get("peak_memory_bytes"),
            "peak_memory_source": results.get("peak_memory_source"),
            "train_seconds": results.get("train_seconds"),
            "wall_seconds": results.get("wall_seconds"),
            "examples_per_second": results.get("examples_per_second"),
            "tokens_per_second": results.get("tokens_per_second"),
            "steps": results.get("steps"),
            "best_step": results.get("best_step"),
            "forgetting": results.get("forgetting"),
            "method_report": results.get("method_report"),
            "data_sizes": results.get("data_sizes"),
            "versions": results.get("versions"),
            "git_commit": results.get("git_commit"),
            "machine": results.get("machine"),
            "run_dir": results.get("run_dir"),
        }

    # --- the speed micro-benchmark --------------------------------------------------------------------------

    def speed_path(self, group: Group) -> Path:
        return self.plan.out / group.slug / SPEED

    def speed_config(self, group: Group, variant: Variant) -> dict:
        s = self.suite
        return {
            "model": group.model_spec,
            "data": group.data_name,
            "task_options": group.task.options,
            "method": variant.method.name,
            "config": config_to_dict(variant.config),
            "lr": variant.lr,
            "peer": variant.has_peer(group.task.kind) and self.filters.peers,
            "train": s.train,
            "speed": dataclasses.asdict(s.speed),
        }

    def speed_entry(self, group: Group, variant: Variant) -> dict | None:
        path = self.speed_path(group)
        if not path.is_file():
            return None
        entry = read_json(path, "speed results").get("methods", {}).get(variant.label)
        if entry and entry.get("fingerprint") == fingerprint(self.speed_config(group, variant)):
            return entry
        return None

    def speed_missing(self, group: Group) -> list[Variant]:
        if not self.suite.speed.enabled:
            return []
        if self.filters.remeasure:
            return list(self.plan.variants)
        return [v for v in self.plan.variants if self.speed_entry(group, v) is None]

    def measure_speed(self, group: Group, variants: list[Variant], advance, bar, job) -> None:
        from ..run import build_model, make_task, pick_device
        from ..train.loop import make_hooks

        speed = self.suite.speed
        prepared = self.prepared(group)
        options = group.options("full")
        device = pick_device(options.device)
        train_settings = settings(self.suite.train, self.suite.budget, 0, None, f"{self.suite.source}: train")
        total = total_steps(train_settings, len(prepared.splits["train"]))
        batch, shape = fixed_batch(prepared, train_settings.batch_size, device)
        task = make_task(prepared)
        path = self.speed_path(group)
        record = read_json(path, "speed results") if path.is_file() else {}
        record.update(batch=shape, repeats=speed.repeats, warmup=speed.warmup, methods=record.get("methods", {}))
        remove_stale_temporaries(path.parent)

        def sampler(examples: int, batch_size: int):
            g = torch.Generator().manual_seed(12345)
            order = torch.randperm(len(prepared.splits["train"]), generator=g)[:examples].tolist()
            for k in range(0, len(order), batch_size):
                yield prepared.splits["train"].batch(order[k : k + batch_size], device)

        def trainer(attachment, hooks, lr):
            step = TrainStep(attachment, task, train_settings, lr, hooks, device, total)
            step.prepare(sampler)
            return step

        references = {}
        base = None
        if "floor" in speed.references or "full" in speed.references:
            base = attach(build_model(options, prepared, 0).to(device), "full")
            if "floor" in speed.references:
                references["floor"] = FloorStep(base.model, task, train_settings, device)
            if "full" in speed.references:
                references["full"] = trainer(base, TrainingHooks(), get_method("full").lr)
            memory = {name: step.memory(batch) for name, step in references.items()}
            record["references"] = {name: {"memory": m} for name, m in memory.items()}
        for variant in variants:
            bar.update(job, description=f"{group.slug} speed {variant.label}")
            started = torch_time()
            entry: dict[str, Any] = {"fingerprint": fingerprint(self.speed_config(group, variant))}
            steps = dict(references)
            try:
                if variant.method.name == "full" and "full" in references:
                    entry["ours_is"] = "full"
                else:
                    model = build_model(options, prepared, 0).to(device)
                    ours = attach(model, variant.method, variant.config)
                    steps["ours"] = trainer(ours, make_hooks(ours, train_settings), variant.lr)
                    entry["ours"] = {"memory": steps["ours"].memory(batch)}
                if variant.has_peer(group.task.kind) and self.filters.peers:
                    ours_for_peer = attach(build_model(options, prepared, 0), variant.method, variant.config)
                    peer = build_peer(
                        ours_for_peer,
                        build_model(options, prepared, 0),
                        group.task.kind,
                        path.parent / f".peer-{variant.label}.tmp",
                        total,
                    )
                    shutil.rmtree(path.parent / f".peer-{variant.label}.tmp", ignore_errors=True)
                    del ours_for_peer
                    peer.model.to(device)
                    steps["peer"] = trainer(peer, peer_hooks(peer), variant.lr)
                    entry["peer"] = {"memory": steps["peer"].memory(batch)}
                timings = alternate(
                    {name: (lambda s=s: s(batch)) for name, s in steps.items()}, speed.repeats, speed.warmup, device
                )
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - recorded; the cells will show the failure too
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.log(f"[bench] {group.slug} speed {variant.label}: failed: {entry['error']}")
                timings = {}
            for name, timing in timings.items():
                side = "ours" if name == "ours" else name
                entry.setdefault(side, {}).update(timing)
            if entry.get("ours_is") == "full" and "full" in timings:
                entry["ours"] = {**timings["full"], "memory": record["references"]["full"]["memory"]}
            for name in references:
                entry.setdefault(name, {})["memory"] = record["references"][name]["memory"]
            record["methods"][variant.label] = entry
            write_json(path, record)
            steps.pop("ours", None)
            steps.pop("peer", None)
            advance(f"{group.slug} speed {variant.label}", torch_time() - started)
        del base


def total_steps(train_settings, examples: int) -> int:
    """The optimiser steps a run of ``examples`` training examples takes (as ``fit`` counts them)."""
    per_step = train_settings.batch_size * train_settings.grad_accum
    steps_per_epoch = max(1, math.ceil(examples / per_step))
    return train_settings.max_steps or max(1, math.ceil(train_settings.epochs * steps_per_epoch))


def fixed_batch(prepared, batch_size: int, device) -> tuple[dict[str, torch.Tensor], dict]:
    """The micro-benchmark's batch: ``batch_size`` training examples from a fixed shuffle (seed 0), padded to the
    longest of them, as a training batch is."""
    train = prepared.splits["train"]
    g = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(train), generator=g)[: min(batch_size, len(train))].tolist()
    batch = train.batch(indices, device)
    tokens = int(batch["attention_mask"].sum())
    return batch, {"examples": len(indices), "length": int(batch["input_ids"].shape[1]), "tokens": tokens}


def torch_time() -> float:
    import time

    return time.perf_counter()


def _peft_version() -> str | None:
    try:
        import peft

        return peft.__version__
    except ImportError:  # pragma: no cover - peft is a test dependency
        return None


def run_bench(plan: Plan, filters: Filters, show_progress: bool, log=print) -> dict[str, int]:
    if not plan.cells:
        raise InputError(f"suite {plan.suite.name!r}: nothing to run ({'; '.join(plan.notes) or 'no cells'})")
    return Runner(plan, filters, show_progress, log).run()
