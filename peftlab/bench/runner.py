"""Running a suite: the plan of groups and cells (``plan``), the speed micro-benchmark (``speed``), the cells
themselves, and resuming.

Layout of a bench folder::

    <bench>/suite.toml                         the suite as it was run
    <bench>/assets/                            tiny and derived models and data built on the fly
    <bench>/<model>__<task>/speed.json         step times and memory split per method (micro-benchmark)
    <bench>/<model>__<task>/<label>/seed<k>/run/       peftlab's run folder (results.json, adapter/, ...)
    <bench>/<model>__<task>/<label>/seed<k>/cell.json  the cell's record (see ``cell_record``)
    <bench>/<model>__<task>/<label>/seed<k>/peer/cell.json  the same cell trained through Hugging Face PEFT
    <bench>/<model>__<task>/<label>@lr<rate>/seed<k>/  a learning-rate grid's cell at a rate other than the base
    <bench>/report.md, report.html, report/*.png

A group is one model on one task. Per group, the micro-benchmark runs first (its memory split goes into every
cell's record), then the cells: each method x seed through ``peftlab.run.run_training`` in this process, and its
PEFT peer where there is one. A cell whose ``cell.json`` exists with the same configuration fingerprint is
skipped; an interrupted peftlab cell continues from its last checkpoint; a cell that fails leaves ``failed.json``
with the error and is tried again on the next run.
"""

from __future__ import annotations

import shutil
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import progress
from ..core.attach import attach
from ..errors import InputError
from ..fileio import read_json, write_json, write_text
from .peer import build_peer, peer_bytes, peer_hooks
from .plan import CELL, FAILED, Cell, Filters, Group, Plan, cell_config, finished
from .speed import SpeedBench, torch_time, total_steps
from .suite import LOWER_IS_BETTER, fingerprint, settings


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


class Runner(SpeedBench):
    def __init__(self, plan: Plan, filters: Filters, show_progress: bool, log=print):
        self.plan = plan
        self.suite = plan.suite
        self.filters = filters
        self.show_progress = show_progress
        self.log = log
        self._prepared: tuple[str, Any] | None = None
        self.summary: list[dict[str, Any]] = []  # one row per cell run or reused now (``cell_row``)

    def prepared(self, group: Group):
        """The group's tokenised data (cached for the group's peer cells and micro-benchmark)."""
        from ..run import prepare_data

        if self._prepared is None or self._prepared[0] != group.slug:
            self._prepared = (group.slug, prepare_data(group.options("full"), quiet=True))
        return self._prepared[1]

    def run(self) -> dict[str, Any]:
        """Run what is missing; the counts of cells (``cells``, ``done_before``, ``reused``, ``ran``, ``failed``)
        and ``summary``, a row per cell run or reused now."""
        plan, suite = self.plan, self.suite
        threads = self.filters.threads or suite.threads
        if threads:
            torch.set_num_threads(threads)
        plan.out.mkdir(parents=True, exist_ok=True)
        write_text(plan.out / "suite.toml", suite.text or "")
        todo = [] if self.filters.speed_only else [c for c in plan.cells if not finished(c, suite)]
        reused = [c for c in todo if self.reuse_cell(c)]
        for cell in reused:
            self.summary.append(cell_row(cell, read_json(cell.folder / CELL, "bench cell"), "reused"))
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
        speed_text = f", speed of {units - len(todo)} methods to measure" if units > len(todo) else ""
        self.log(
            f"bench {suite.name}: {len(plan.cells)} cells: {len(todo)} to run, {counts['done_before']} done before, "
            f"{len(reused)} reused{speed_text}; results in {plan.out}"
        )
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
        return counts | {"summary": self.summary}

    # --- reusing identical cells of other bench folders ------------------------------------------------------

    def reuse_cell(self, cell: Cell) -> bool:
        """Copy the cell from a ``--reuse`` folder where the same cell (same fingerprint) is finished: in the same
        place, or under another label folder of its group (a learning-rate search keeps a rate that has since become
        the method's default under ``<label>@lr<rate>``)."""
        want = fingerprint(cell_config(cell, self.suite))
        for source in self.reuse_candidates(cell):
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

    def reuse_candidates(self, cell: Cell) -> list[Path]:
        """The folders of ``--reuse`` where this cell may be: its own place first, then its group's other labels."""
        relative = cell.folder.relative_to(self.plan.out)  # group / label / seedN [/ peer]
        group, tail = relative.parts[0], Path(*relative.parts[2:])
        found = []
        for other in self.filters.reuse:
            found.append(other / relative)
            found += [label / tail for label in sorted((other / group).glob("*")) if label / tail != other / relative]
        return found

    # --- cells ----------------------------------------------------------------------------------------------

    def run_cell(self, cell: Cell) -> bool:
        cell.folder.mkdir(parents=True, exist_ok=True)
        (cell.folder / FAILED).unlink(missing_ok=True)
        try:
            with progress.showing("off"):  # a cell says one line when it ends, nothing per step or evaluation
                record = self.run_peer(cell) if cell.peer else self.run_ours(cell)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failing cell is recorded and the suite goes on
            message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.log(f"{cell.tag} failed: {message}")
            write_json(
                cell.folder / FAILED,
                {"cell": cell.name, "error": message, "traceback": traceback.format_exc().splitlines()[-12:]},
            )
            self.summary.append(cell_row(cell, {}, "failed"))
            return False
        write_json(cell.folder / CELL, record)
        row = cell_row(cell, record, "done")
        self.summary.append(row)
        self.log(f"{cell.tag} {row['quality']}, trainable {row['trainable']}, train {row['train_seconds']}")
        return True

    def cell_settings(self, cell: Cell):
        return settings(self.suite.train, self.suite.budget, cell.seed, cell.lr, f"{self.suite.source}: train")

    def run_ours(self, cell: Cell) -> dict:
        from ..run import run_training

        run = cell.folder / "run"
        resume = (run / "checkpoint").exists() and (run / "config.json").exists()
        if run.exists() and not resume:
            shutil.rmtree(run)
        options = cell.group.options(cell.variant.method.name, run)
        results = run_training(
            options, self.cell_settings(cell), cell.variant.config, resume=resume, show_progress=False, quiet=True
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
            cell.lr,
            scratch / "checkpoint",
            lambda metrics, step: best.update(state=peer.snapshot()),
            device,
            show_progress=False,
            hooks=peer_hooks(peer),
            epoch_lines=False,
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
            "lr": cell.lr,
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
        # a grid's cell at another rate names its base rate (the speed entry, measured at the base rate, is shared)
        base = {} if cell.at_base_rate else {"lr_base": cell.variant.lr}
        return {
            "suite": self.suite.name,
            "fingerprint": fingerprint(config),
            **config,
            "implementation": "peft" if cell.peer else "peftlab",
            **base,
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


def cell_row(cell: Cell, record: dict, state: str) -> dict[str, Any]:
    """A cell's line in the console summary: its tag, quality, trainable parameters, train time and state."""
    quality = record.get("quality") or {}
    value, trainable = quality.get("value"), (record.get("params") or {}).get("trainable")
    seconds = record.get("train_seconds")
    return {
        "cell": cell.tag,
        "quality": f"{quality.get('metric', 'quality')} {value:.4f}" if isinstance(value, float | int) else "-",
        "trainable": f"{trainable:,}" if isinstance(trainable, int) else "-",
        "train_seconds": f"{seconds:.1f} s" if isinstance(seconds, float | int) else "-",
        "state": state,
    }


def _peft_version() -> str | None:
    try:
        import peft

        return peft.__version__
    except ImportError:  # pragma: no cover - peft is a test dependency
        return None


def run_bench(plan: Plan, filters: Filters, show_progress: bool, log=print) -> dict[str, Any]:
    if not plan.cells:
        raise InputError(f"suite {plan.suite.name!r}: nothing to run ({'; '.join(plan.notes) or 'no cells'})")
    return Runner(plan, filters, show_progress, log).run()
