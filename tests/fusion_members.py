"""Stage-one adapters for AdapterFusion tests: tiny adapters with random (non-zero) up-projections, saved to folders,
each on its own task head (different label counts, as real stage-one tasks have)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
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


class MatrixFusionOptions(Mapping):
    """``adapter_fusion``'s options in the invariant matrix: its stage-one adapters are made on first use, on a
    model with the signature of the matrix's tiny model (the conftest vocabulary), in a folder removed at exit."""

    def __init__(self):
        self.options: dict | None = None

    def built(self) -> dict:
        if self.options is None:
            from transformers import BertForSequenceClassification

            from peftlab.bench.assets import BERT_SPECIALS
            from tests.conftest import FILLER, NEGATIVE, POSITIVE, tiny_config

            vocab = len(BERT_SPECIALS + POSITIVE + NEGATIVE + FILLER)
            folder = Path(tempfile.mkdtemp(prefix="peftlab-fusion-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            make = lambda n: BertForSequenceClassification(tiny_config(num_labels=n, vocab_size=vocab))  # noqa: E731
            self.options = {"adapters": stage_one(folder, make)}
        return self.options

    def __getitem__(self, key: str):
        return self.built()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.built())

    def __len__(self) -> int:
        return len(self.built())
