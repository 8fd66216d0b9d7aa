"""A few optimiser steps of the shared loop on a tiny classifier, checkpointing every 2 steps (for resume tests)."""

import torch

from peftlab.train.loop import ClassificationTask, TrainSettings, fit


def run_fit(adapter, data, tmp_path, steps, resume=False, hooks=None, **overrides):
    """``fit`` for ``steps`` steps at lr 1e-2, batch 8, no warmup, constant schedule, checkpoints every 2 steps,
    seed 0; ``overrides`` replace any of these settings or add others (l2sp, ewc, ...)."""
    settings = (
        dict(max_steps=steps, batch_size=8, lr=1e-2, warmup=0, schedule="constant", checkpoint_every=2, seed=0)
        | overrides
    )
    return fit(
        adapter,
        ClassificationTask(2),
        data.splits["train"],
        data.splits["validation"],
        TrainSettings(**settings),
        1e-2,
        tmp_path / "ckpt",
        lambda m, s: None,
        torch.device("cpu"),
        resume=resume,
        show_progress=False,
        hooks=hooks,
    )
