"""A few optimiser steps of the shared loop on a tiny classifier, checkpointing every 2 steps (for resume tests)."""

import torch

from peftlab.train.loop import ClassificationTask, TrainSettings, fit


def run_fit(adapter, data, tmp_path, steps, resume=False, **settings):
    settings = TrainSettings(
        max_steps=steps, batch_size=8, lr=1e-2, warmup=0, schedule="constant", checkpoint_every=2, seed=0, **settings
    )
    fit(
        adapter,
        ClassificationTask(2),
        data.splits["train"],
        data.splits["validation"],
        settings,
        1e-2,
        tmp_path / "ckpt",
        lambda m, s: None,
        torch.device("cpu"),
        resume=resume,
        show_progress=False,
    )
