"""Measuring training steps: time, and memory split into weights, gradients, optimiser state and activations.

Process RSS only ever grows within one process, so it cannot say what one method needs after another ran. The
split is measured directly instead, on one training step of a representative batch:

- ``weights``: bytes of every parameter and buffer of the model (tied or shared storage counted once; a quantised
  base counts its packed codes);
- ``gradients``: bytes of the ``.grad`` tensors after the backward pass;
- ``optimizer``: bytes of the tensors the optimiser keeps (AdamW's two moments) after its step;
- ``method_state``: bytes of the tensors a method's training hooks keep (AdaLoRA's importance averages, ...);
- ``activations``: bytes saved for the backward pass during the forward pass (``saved_tensors_hooks``), counted
  per storage, leaving out storages that are parameters or buffers (a weight saved for backward is no extra memory).

Step time comes from a micro-benchmark on one fixed batch: every variant (peftlab's method, Hugging Face PEFT's,
the floor, full fine-tuning) is warmed up, then the variants take turns, one step each, for ``repeats`` rounds
(the order rotating every round), and each variant's median is kept; load on the machine hits all of them alike.

**The floor** is what no fine-tuning method can beat: the frozen base's forward pass plus a backward pass that
computes only activation gradients (down to the input embeddings), no weight gradients and no optimiser step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from ..core.hooks import TrainingHooks
from ..train.step import Step, autocast_for

MEMORY_PARTS = ("weights", "gradients", "optimizer", "method_state", "activations")


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    seen: dict[int, int] = {}
    loose = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = _storage_key(t)
        if key is None:
            loose += t.numel() * t.element_size()
        elif key[0] != 0:
            seen[key[0]] = max(seen.get(key[0], 0), key[1])
    return sum(seen.values()) + loose


def _model_storages(model: nn.Module) -> set[int]:
    keys = (_storage_key(t) for t in [*model.parameters(), *model.buffers()])
    return {k[0] for k in keys if k is not None}


@contextmanager
def saved_activation_bytes(model: nn.Module, out: dict):
    """Inside the block, record every tensor saved for backward; ``out["activations"]`` gets their bytes."""
    own = _model_storages(model)
    saved: dict[int, int] = {}
    loose = [0]

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key is None:
            loose[0] += t.numel() * t.element_size()
        elif key[0] not in own and key[0] != 0:
            saved[key[0]] = max(saved.get(key[0], 0), key[1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out["activations"] = sum(saved.values()) + loose[0]


class TrainStep:
    """One optimiser step on one batch: the training loop's own step (``peftlab.train.step.Step``, the one
    ``peftlab.train.loop.fit`` takes), with the whole batch as its one micro-batch, unchecked (no loss is read back
    while it is timed). ``attachment`` is a peftlab Attachment or anything that offers the same training surface
    (the PEFT peer)."""

    def __init__(self, attachment, task, settings, lr: float, hooks: TrainingHooks, device, total_steps: int):
        self.step = Step(attachment, task, settings, lr, total_steps, device, hooks, checked=False)
        self.model = attachment.model
        self.hooks = hooks
        self.optimizer = self.step.optimizer
        self.index = 0

    def prepare(self, batches: Callable) -> None:
        """The hooks' one-off preparation (a Fisher mask, ...), as the loop runs it before the first step."""
        self.step.prepare(batches)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        self.model.train()
        self.step.backward(self.index, [self.step.whole(batch)])

    def update(self) -> None:
        self.step.update(self.index)
        self.index += 1

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        self.forward_backward(batch)
        self.update()

    def memory(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Take one step, measuring the memory split on the way."""
        out = {"weights": tensor_bytes([*self.model.parameters(), *self.model.buffers()])}
        with saved_activation_bytes(self.model, out):
            self.forward_backward(batch)
        out["gradients"] = tensor_bytes(p.grad for p in self.model.parameters())
        self.update()
        out["optimizer"] = tensor_bytes(v for state in self.optimizer.state.values() for v in state.values())
        out["method_state"] = tensor_bytes(self.hooks.state_dict().values())
        return _with_total(out)


class FloorStep:
    """The floor: the frozen base's forward plus a backward computing only activation gradients.

    Every parameter is frozen for the duration of the step (so the same model can also serve as the full
    fine-tuning reference between floor steps) and the input embeddings' output is made to require a gradient, so
    the backward pass runs through every layer down to the embeddings but computes no weight gradient."""

    def __init__(self, model: nn.Module, task, settings, device):
        self.model = model
        self.task = task
        self.autocast = autocast_for(settings.precision, device)

    @contextmanager
    def _frozen(self):
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        handle = self.model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        try:
            yield
        finally:
            handle.remove()
            for p, flag in flags:
                p.requires_grad_(flag)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> None:
        self.model.train()
        with self._frozen():
            with self.autocast():
                loss = self.task.loss(self.model, batch)
            loss.backward()

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        self.forward_backward(batch)

    def memory(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        out = {"weights": tensor_bytes([*self.model.parameters(), *self.model.buffers()])}
        with saved_activation_bytes(self.model, out):
            self.forward_backward(batch)
        out.update(gradients=0, optimizer=0, method_state=0)
        return _with_total(out)


def _with_total(parts: dict[str, int]) -> dict[str, int]:
    ordered = {k: int(parts.get(k, 0)) for k in MEMORY_PARTS}
    return ordered | {"total": sum(ordered.values())}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device="cpu"
) -> dict[str, dict[str, float | list[float]]]:
    """Time each of ``steps`` (name -> a callable taking one step) ``repeats`` times, taking turns.

    Each callable first runs ``warmup`` untimed steps. Round k starts with the k-th variant (the order rotates), so
    no variant always follows the same neighbour. Returns name -> {median, min, times} in seconds."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - started)
    return {name: {"median": statistics.median(t), "min": min(t), "times": t} for name, t in times.items()}
