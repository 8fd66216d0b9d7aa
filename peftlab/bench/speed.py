"""The speed micro-benchmark of a bench run: per group, every method's step (and its PEFT peer's, the floor's and
full fine-tuning's) timed in alternation on one fixed batch, with its memory split, in ``<group>/speed.json``."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..core.attach import attach
from ..core.hooks import TrainingHooks
from ..fileio import read_json, remove_stale_temporaries, write_json
from ..methods import config_to_dict, get_method
from .measure import FloorStep, TrainStep, alternate
from .peer import build_peer, peer_hooks
from .plan import SPEED, Group, Variant
from .suite import fingerprint, settings


class SpeedBench:
    """The micro-benchmark half of ``peftlab.bench.runner.Runner`` (which it is mixed into): it uses the runner's
    ``plan``, ``suite``, ``filters``, ``log`` and ``prepared(group)``."""

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
                if self.finished(entry, group, variant) and self.speed_entry(group, variant) is None:
                    for key in ("batch", "repeats", "warmup", "references"):
                        record.setdefault(key, theirs.get(key))
                    record.setdefault("methods", {})[variant.label] = entry
                    write_json(path, record)
                    changed = True
        if changed:
            self.log(
                f"[bench] {group.slug}: micro-benchmark entries reused from {', '.join(map(str, self.filters.reuse))}"
            )

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
        """The variant's finished measurement; None when there is none for this configuration, or it failed (so
        the next run measures it again, as it runs a failed cell again; ``--reuse`` copies only finished ones)."""
        path = self.speed_path(group)
        if not path.is_file():
            return None
        entry = read_json(path, "speed results").get("methods", {}).get(variant.label)
        return entry if self.finished(entry, group, variant) else None

    def finished(self, entry: dict | None, group: Group, variant: Variant) -> bool:
        """Whether a recorded measurement counts as done: taken with this configuration, and not failed."""
        return (
            bool(entry)
            and "error" not in entry
            and entry.get("fingerprint") == fingerprint(self.speed_config(group, variant))
        )

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
