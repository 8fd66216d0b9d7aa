"""The lines a run prints before its first step: what will run (model, method, task, data, labels, steps, batch,
learning rates, device, folder), or from where a resumed run continues."""

from __future__ import annotations

import math
from pathlib import Path

from ..train.loop import TrainSettings, total_steps

NAMED_LABELS = 8  # more labels than this are counted, not named


def start_header(
    *,
    model: str,
    method: str,
    task: str,
    data: str,
    sizes: dict[str, int],
    labels: list[str] | None,
    settings: TrainSettings,
    lr: float,
    head_lr: float | None,
    device: str,
    dtype: str,
    trainable: int,
    total_params: int,
    out: Path,
    resumed_step: int | None = None,
) -> list[str]:
    """The header's lines (``head_lr``: the task head's rate where the model has a new head)."""
    train = sizes.get("train", 0)
    per_step = settings.batch_size * settings.grad_accum
    per_epoch = max(1, math.ceil(train / per_step))
    steps = total_steps(train, settings)
    split_text = ", ".join(f"{n} {name}" for name, n in sizes.items())
    lines = [
        f"run: {method} on {model}, task {task}, data {data}",
        f"  examples: {split_text}",
    ]
    if labels:
        named = f": {', '.join(labels)}" if len(labels) <= NAMED_LABELS else ""
        lines.append(f"  labels: {len(labels)}{named}")
    if settings.max_steps:
        epochs = f"{settings.epochs:g} epochs would be {math.ceil(settings.epochs * per_epoch)}"
        step_text = f"{steps} (--max-steps; {per_epoch} per epoch, {epochs})"
    else:
        step_text = f"{steps} ({per_epoch} per epoch, {settings.epochs:g} epochs)"
    lines += [
        f"  steps: {step_text}",
        f"  batch: {settings.batch_size} x {settings.grad_accum} accumulation = {per_step} examples per step",
        f"  learning rate: {lr:g}" + (f", head {head_lr:g}" if head_lr is not None else "") + f" ({settings.schedule})",
        f"  trainable parameters: {trainable:,} of {total_params:,} ({100 * trainable / max(total_params, 1):.3f}%)",
        f"  device: {device}, weights {dtype}, compute {settings.precision}",
        f"  folder: {out}",
    ]
    if resumed_step is not None:
        lines.append(f"resuming {out} from step {resumed_step} of {steps}")
    return lines
