"""Stage-one adapters for AdapterFusion tests: tiny adapters with random (non-zero) up-projections, saved to folders,
each on its own task head (different label counts, as real stage-one tasks have)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import peftlab


def stage_one(
    folder: Path, make_model: Callable[[int], nn.Module], labels=(2, 3, 5), method="pfeiffer", **options
) -> list[str]:
    """One saved ``method`` adapter per label count in ``labels``, on models from ``make_model(num_labels)``."""
    paths = []
    for i, num_labels in enumerate(labels):
        adapter = peftlab.attach(make_model(num_labels), method, **{"bottleneck": 4, **options})
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in adapter.layers().values():
                for name in ("up_weight", "up_bias", "down_bias"):
                    t = getattr(layer.adapter, name)
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        paths.append(str(adapter.save(folder / f"task{i}")))
    return paths


def matrix_fusion_options(model_dir: Path) -> dict:
    """``adapter_fusion``'s options in the invariant matrix: three stage-one adapters on models of the matrix's tiny
    model (``model_dir``: any architecture), each with its own head, in a folder removed at exit."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = Path(tempfile.mkdtemp(prefix="peftlab-fusion-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)

    def make(num_labels: int) -> nn.Module:
        config = AutoConfig.from_pretrained(str(model_dir), num_labels=num_labels)
        return AutoModelForSequenceClassification.from_config(config)

    return {"adapters": stage_one(folder, make)}
