"""A few optimiser steps of the shared loop on a tiny classifier, and crashes injected after a checkpoint (for resume
tests)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from peftlab.train import loop
from peftlab.train.loop import ClassificationTask, TrainSettings


@contextmanager
def crash_after_checkpoint(step: int | None) -> Iterator[None]:
    """Inside the block, training stops with KeyboardInterrupt right after it has written the checkpoint of
    ``step`` (as if the process were killed there); None: no crash."""
    save = loop.save_checkpoint

    def save_then_crash(path, attachment, optimizer, scheduler, state, *rest, **kw):
        save(path, attachment, optimizer, scheduler, state, *rest, **kw)
        if state["step"] == step:
            raise KeyboardInterrupt

    with mock.patch.object(loop, "save_checkpoint", save_then_crash):
        yield


def fit_tiny(
    adapter, data, folder: Path, settings: TrainSettings, resume=False, hooks=None, crash_after=None, on_best=None
):
    """``fit`` on the tiny two-label task at ``settings.lr``, checkpoints in ``folder``, quietly on the CPU;
    ``crash_after`` interrupts the run after that step's checkpoint; ``on_best(metrics, step)`` is called at each new
    best validation score (default: nothing)."""
    with crash_after_checkpoint(crash_after):
        return loop.fit(
            adapter,
            ClassificationTask(2),
            data.splits["train"],
            data.splits["validation"],
            settings,
            settings.lr,
            folder,
            on_best or (lambda m, s: None),
            torch.device("cpu"),
            resume=resume,
            show_progress=False,
            hooks=hooks,
        )


def run_fit(adapter, data, tmp_path, steps, resume=False, hooks=None, **overrides):
    """``fit`` for ``steps`` steps at lr 1e-2, batch 8, no warmup, constant schedule, checkpoints every 2 steps,
    seed 0; ``overrides`` replace any of these settings or add others (l2sp, ewc, ...)."""
    settings = (
        dict(max_steps=steps, batch_size=8, lr=1e-2, warmup=0, schedule="constant", checkpoint_every=2, seed=0)
        | overrides
    )
    return fit_tiny(adapter, data, tmp_path / "ckpt", TrainSettings(**settings), resume, hooks)
