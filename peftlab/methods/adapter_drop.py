"""AdapterDrop (Rücklé et al. 2021, https://arxiv.org/abs/2010.11918): the adapters of the lowest n blocks are
skipped, so those blocks run at the plain model's cost. ``drop_layers`` is the fixed n for evaluation and
inference (saved in the config); with ``drop_train`` every training step draws its own n uniformly from
0..``drop_train_max`` (default: blocks - 1, the paper's robust AdapterDrop) from a generator seeded by the step,
so data-parallel processes and a resumed run draw the same n. A fixed ``drop_layers`` without ``drop_train`` also
holds during training (the paper's specialised AdapterDrop). ``drop_speed`` measures what dropping saves.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core.hooks import StepRandom, TrainingHooks
from ..errors import InputError, require
from .bottleneck import BlockAdapter


def block_adapters(attachment) -> list[BlockAdapter]:
    return [layer for layer in attachment.layers().values() if isinstance(layer, BlockAdapter)]


def drop_lowest(layers: Sequence[BlockAdapter], n: int) -> None:
    """Skip the adapters of blocks 0..n-1; every other adapter runs."""
    for layer in layers:
        layer.dropped = layer.block is not None and layer.block < n


def set_drop(attachment, n: int) -> None:
    """From now on skip the adapters of the lowest ``n`` layers; the config records it, so a saved adapter keeps it."""
    layers = block_adapters(attachment)
    blocks = max((layer.blocks or 0) for layer in layers)
    require(isinstance(n, int) and 0 <= n <= blocks, "drop_layers", f"an integer from 0 to {blocks}", n)
    if n and any(layer.block is None for layer in layers):
        raise InputError("drop_layers: AdapterDrop needs every adapter inside one list of layers")
    drop_lowest(layers, n)
    attachment.config.drop_layers = n


class AdapterDropHooks(TrainingHooks):
    """With ``drop_train``, each step skips the adapters of the lowest n layers, n drawn uniformly from
    0..``drop_train_max`` by a generator seeded by the step (``StepRandom``: data-parallel processes and a resumed
    run draw the same n); between steps
    the config's fixed ``drop_layers`` holds. ``report`` gives the validation metrics at n = 0, layers / 4,
    layers / 2 and layers - 1."""

    def __init__(self, attachment, config):
        self.config = config
        self.layers = block_adapters(attachment)
        self.blocks = max((layer.blocks or 0) for layer in self.layers)
        self.largest = config.drop_train_max if config.drop_train_max is not None else max(self.blocks - 1, 0)
        self.drawn: list[int] = []  # n of every step so far in this process (for tests and curiosity)
        self.random = StepRandom()

    def before_step(self, step: int) -> None:
        if self.config.drop_train:
            n = int(torch.randint(0, self.largest + 1, (), generator=self.random.generator(step)).item())
            self.drawn.append(n)
            drop_lowest(self.layers, n)

    def after_step(self, step: int, optimizer, scheduler) -> None:
        if self.config.drop_train:
            drop_lowest(self.layers, self.config.drop_layers)

    def report(self, evaluate: Callable[[], dict]) -> dict:
        if not self.config.drop_train or not self.blocks:
            return {}
        by_n = {}
        for n in sorted({0, self.blocks // 4, self.blocks // 2, self.blocks - 1}):
            drop_lowest(self.layers, n)
            by_n[str(n)] = evaluate()
        drop_lowest(self.layers, self.config.drop_layers)
        return {"drop_layers": self.config.drop_layers, "validation_by_drop_layers": by_n}


@torch.no_grad()
def forward_seconds(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass of ``model`` on ``batch`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        model(**batch)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    model.train(was_training)
    return statistics.median(times)


def drop_speed(
    attachment, batch: dict[str, torch.Tensor], drops: Sequence[int], repeats: int = 20, plain: nn.Module | None = None
) -> dict[int | str, float]:
    """AdapterDrop's inference gain: median forward seconds with the adapters of the lowest n layers skipped, for
    each n in ``drops``, and for ``plain`` (the model without adapters, under ``"plain"``) when given. The settings
    take turns round by round, so a slow patch of a shared machine hits all of them alike. The attachment's own
    ``drop_layers`` is restored afterwards."""
    layers = block_adapters(attachment)
    times: dict[int | str, list[float]] = {n: [] for n in drops} | ({"plain": []} if plain is not None else {})
    for _ in range(repeats):
        for n in drops:
            drop_lowest(layers, n)
            times[n].append(forward_seconds(attachment.model, batch, repeats=1, warmup=1))
        if plain is not None:
            times["plain"].append(forward_seconds(plain, batch, repeats=1, warmup=1))
    drop_lowest(layers, attachment.config.drop_layers)
    return {n: statistics.median(t) for n, t in times.items()}
