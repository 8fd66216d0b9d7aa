"""One fine-tuning run, from names to a finished run folder.

``run_training`` resolves the model and data (pulling packaged assets on first use), tokenises once, attaches the
method, trains with the shared loop, evaluates the best validation state on the test split, counts parameters
honestly and writes the run folder:

    <out>/config.json      the full resolved configuration (a valid --config file: it reproduces the run)
    <out>/adapter/         the best adapter (peftlab format: adapter.safetensors + adapter.json)
    <out>/checkpoint/      the last training checkpoint, for --resume
    <out>/results.json     metrics, parameter counts, adapter bytes, memory, time, versions
"""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..core.accounting import delta_ranks, folder_bytes, parameter_counts, rank_summary
from ..core.adapter_file import WEIGHTS_FILE, read_tensors
from ..core.attach import attach, load_adapter, load_state
from ..errors import InputError, Interrupted
from ..fileio import LOCK_FILE, folder_lock, remove_stale_temporaries, write_json
from ..methods import get_method
from ..methods.prompt_tuning import SoftPrompt
from ..train import tracking
from ..train.checkpoint import checkpoint_step
from ..train.distributed import from_environment, shard_model
from ..train.loop import TrainSettings, autocast_for, fit, make_hooks, total_steps
from ..train.step import group_rate
from .announce import start_header
from .machine import git_commit, machine, peak_memory, versions
from .options import RunOptions, default_out, flat_config, pick_device
from .prepare import (
    build_model,
    forgetting_report,
    forgetting_samples,
    generation_metrics,
    make_task,
    prepare_data,
    recorded,
    task_meta,
)


def run_training(
    options: RunOptions,
    settings: TrainSettings,
    method_config: Any,
    resume: bool = False,
    show_progress: bool = True,
    quiet: bool = False,
) -> dict:
    """Train and write the run folder (see the module docstring); its results. ``show_progress``: bars over training
    and evaluation; ``quiet``: no start header and no line per epoch (a benchmark cell)."""
    wall_start = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)
    dist, dist_device = from_environment(options.device)  # torchrun's process group, if launched by it
    device = dist_device or pick_device(options.device)
    if options.fsdp and not dist.enabled:
        raise InputError("fsdp: shards the model across processes; start several with --nproc N or torchrun")
    method = get_method(options.method)
    tracking.require(options.report_to)  # a tracker's missing library stops the run before any work
    out = Path(options.out) if options.out else default_out(options)
    if dist.enabled and not options.out:
        out = Path(dist.broadcast(str(out)))  # one folder for every process
    # One process trains into a folder at a time; a lock left by a killed run is reported and taken over.
    lock = folder_lock(out, report=lambda note: print(note, file=sys.stderr)) if dist.main else nullcontext()
    with lock, progress.showing(progress.for_run(show_progress, dist.main)):
        if not resume and out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise InputError(
                f"{out}: run folder already exists and is not empty (continue it with --resume {out}, "
                "or choose another --out)"
            )
        dist.barrier()  # every process checked the folder before rank 0 writes into it
        if resume and dist.main:
            remove_stale_temporaries(out)
        prepared = prepare_data(options, quiet=not show_progress)
        options = recorded(options, prepared)
        settings = compute_precision(options, settings)
        model = build_model(options, prepared, settings.seed)
        task = make_task(prepared)
        autocast = autocast_for(settings.precision, device)
        general = forgetting_samples(options, prepared)
        if general:  # the pretrained model, before any method is attached
            model.to(device)
            before = {}
            for n, e in general.items():
                with progress.stage(f"{n} (before)"):
                    before[n] = task.evaluate(model, e, settings.eval_batch_size, device, autocast)
        fp32_trainable = options.dtype != "fp32"  # a half-precision base: what trains is kept in fp32
        if options.adapter:
            attachment = load_adapter(model, options.adapter, fp32_trainable)
            if attachment.method.name != method.name:
                raise InputError(
                    f"adapter: {options.adapter} holds a {attachment.method.name!r} adapter, "
                    f"but --method is {method.name!r}"
                )
        else:
            attachment = attach(model, method, method_config, fp32_trainable=fp32_trainable)
        if options.packing and any(isinstance(layer, SoftPrompt) for layer in attachment.layers().values()):
            raise InputError(
                f"packing: {method.name} puts its virtual tokens in front of each row, and a packed row's later "
                "conversations cannot see them (each attends only to itself); train it without --packing"
            )
        caution = (
            method.caution(model, attachment.config, total_steps(len(prepared.splits["train"]), settings))
            if method.caution
            else None
        )
        if caution and dist.main:
            print(f"note: {caution}", file=sys.stderr)
        model.to(device)
        if options.fsdp:
            shard_model(model)
            dist = dataclasses.replace(dist, sharded=True)
        lr = settings.lr if settings.lr is not None else method.lr
        if dist.main:
            write_json(out / "config.json", flat_config(options, settings, attachment.config))
        meta = task_meta(options, prepared)

        def save_best(metrics: dict, step: int) -> None:
            if dist.main or dist.sharded:  # sharded tensors are gathered by every process; rank 0 writes
                attachment.save(out / "adapter", extra={**meta, "validation": metrics, "step": step}, write=dist.main)

        hooks = make_hooks(attachment, settings)
        # The optimiser's groups, as training builds them (a folded adapter no longer has its reparameterisation).
        trained_groups = [
            {
                "pattern": g.pattern,
                "lr": group_rate(g, lr, settings.head_lr),
                "lr_scale": group_rate(g, lr, settings.head_lr) / lr,
                "weight_decay": g.weight_decay,
                "parameters": sum(p.numel() for p in params),
            }
            for g, params in attachment.parameter_groups()
        ]
        if dist.main and not quiet:
            head = [group_rate(g, lr, settings.head_lr) for g, _ in attachment.parameter_groups() if g.head]
            header = start_header(
                model=options.model,
                method=method.name,
                task=prepared.kind,
                data=options.data,
                sizes={name: len(split) for name, split in prepared.splits.items()},
                labels=prepared.labels,
                settings=settings,
                lr=lr,
                head_lr=head[0] if head else None,
                device=str(device),
                dtype=options.dtype,
                trainable=attachment.trainable_count(),
                total_params=sum(p.numel() for p in model.parameters()),
                out=out,
                resumed_step=checkpoint_step(out / "checkpoint") if resume else None,
            )
            print("\n".join(header), flush=True)
        # Only the main process tracks; the configuration, the resolved rate and the counts before training.
        tracker = tracking.open_trackers(options.report_to, out, resume) if dist.main else None
        if tracker is not None:
            tracker.start(
                {
                    **flat_config(options, settings, attachment.config),
                    "resolved_lr": lr,
                    "params_total": sum(p.numel() for p in model.parameters()),
                    "params_trainable": attachment.trainable_count(),
                }
            )
        try:
            result = fit(
                attachment,
                task,
                prepared.splits["train"],
                prepared.splits["validation"],
                settings,
                lr,
                out / "checkpoint",
                save_best,
                device,
                resume=resume,
                show_progress=show_progress,
                hooks=hooks,
                dist=dist,
                tracker=tracker,
                log_every=options.log_every,
                epoch_lines=not quiet,
            )
        except BaseException as e:
            if tracker is not None:
                tracker.finish(failed=True)
            if isinstance(e, KeyboardInterrupt) and not isinstance(e, Interrupted):
                raise Interrupted(out.resolve()) from e  # the folder --resume takes
            raise
        dist.barrier()  # rank 0 has written the best adapter; every process loads it
        # A method trained through a reparameterisation takes the form its adapter file holds (prefix tuning's MLP
        # computed into the prefixes); "trainable" still counts what the optimiser updated.
        trained = attachment.trainable_count()
        folded = attachment.fold()
        load_state(attachment, read_tensors(out / "adapter" / WEIGHTS_FILE), out / "adapter" / WEIGHTS_FILE)
        evaluation = dist.for_evaluation
        forgetting = {}
        if general:
            after = {}
            for n, e in general.items():
                with progress.stage(f"{n} (after)"):
                    after[n] = task.evaluate(model, e, settings.eval_batch_size, device, autocast, evaluation)
            forgetting = forgetting_report(before, after)
        with progress.stage("test"):
            test = task.evaluate(model, prepared.splits["test"], settings.eval_batch_size, device, autocast, evaluation)
        generating = dist.main or dist.sharded  # under FSDP every process must take part in every forward pass
        generated = generation_metrics(options, prepared, model, settings.eval_batch_size) if generating else {}
        test.update({k: v for k, v in generated.pop("test", {}).items()})
        with progress.stage("validation"):
            method_report = hooks.report(
                lambda: task.evaluate(
                    model, prepared.splits["validation"], settings.eval_batch_size, device, autocast, evaluation
                )
            )
        accounted = attachment
        if dist.sharded:  # count on a whole (unsharded) copy: the base plus the adapter rank 0 wrote
            accounted = load_adapter(build_model(options, prepared, settings.seed), out / "adapter")
        counts = parameter_counts(accounted)
        if folded:
            counts["trainable"] = trained
        ranks = delta_ranks(accounted)
        if ranks:
            counts["delta_rank"] = rank_summary(ranks)
        memory, memory_source = peak_memory()
        results = {
            "method": method.name,
            "model": options.model,
            "data": options.data,
            **({"pooling": prepared.pooling} if prepared.kind == "classify" else {}),
            "seed": settings.seed,
            "metrics": {"validation": result.best, "test": test, **generated},
            "params": counts,
            **({"forgetting": forgetting} if forgetting else {}),
            "method_report": method_report,
            "adapter_bytes": folder_bytes(out / "adapter"),
            "peak_memory_bytes": memory,
            "peak_memory_source": memory_source,
            "train_seconds": result.train_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "examples_per_second": result.examples / max(result.train_seconds, 1e-9),
            "tokens_per_second": result.tokens / max(result.train_seconds, 1e-9),
            "steps": result.steps,
            "best_step": result.best_step,
            "lr": lr,
            "param_groups": trained_groups,
            **({"caution": caution} if caution else {}),  # fmt: skip
            "data_sizes": prepared.data.sizes(),
            "labels": prepared.labels,
            "truncated": {k: v.truncated for k, v in prepared.splits.items()},
            "notes": prepared.data.notes,
            "history": result.history,
            "versions": versions(),
            "git_commit": git_commit(),
            "machine": machine(),
            "device": str(device),
            "run_dir": str(out),
            "processes": dist.world,
        }
        if dist.main:
            write_json(out / "results.json", results)
        if tracker is not None:  # the test metrics and the final accounting, at the last step
            final = {**tracking.numbers("test", test), **tracking.numbers("params", counts)}
            tracker.log(result.steps, {**final, "adapter_bytes": float(results["adapter_bytes"])})
            tracker.finish()
        dist.barrier()
        return results


def compute_precision(options: RunOptions, settings: TrainSettings) -> TrainSettings:
    """The settings with the forward pass's autocast matching the base's storage: a bf16 or fp16 base computes in
    its own dtype (fp32 compute with a half-precision base is not offered: it would cast every weight up each step)."""
    if options.dtype == "fp32" or settings.precision == options.dtype:
        return settings
    if settings.precision != "fp32":
        raise InputError(
            f"precision: {settings.precision} autocast cannot run a base stored in {options.dtype}; "
            f"use --precision {options.dtype} (or leave it out)"
        )
    return dataclasses.replace(settings, precision=options.dtype)
