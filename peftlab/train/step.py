"""One optimiser step, the same for the training loop (``peftlab.train.loop.fit``) and the benchmark's measured step
(``peftlab.bench.measure.TrainStep``).

A ``Step`` owns the optimiser (AdamW, no weight decay on biases and norms), the learning-rate schedule (linear
warmup, then linear or cosine decay or constant), the autocast (bf16; fp16 with a gradient scaler, whose scale
skips the steps whose gradients overflow; fp32 runs use neither) and the order of one step:

1. ``hooks.before_step``;
2. per micro-batch: the task loss, plus ``hooks.penalty()``, backward with the micro-batch's weight (gradient
   accumulation; under data parallelism each process weighs its share so that the sum over processes is the mean
   over the step's examples);
3. gradients summed over processes (plain data parallelism; FSDP exchanges them itself);
4. (fp16) the gradients unscaled; ``hooks.after_backward``, the static masks on base parameters applied to the
   gradients, gradient clipping;
5. the optimiser step, the scheduler step, ``zero_grad``, masked-out entries restored, ``hooks.after_step``.

Its state (optimiser, scheduler, hooks) goes into the loop's checkpoints through ``peftlab.train.checkpoint`` with
``optimizer``, ``scheduler`` and ``hooks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext

import torch

from ..core.hooks import TrainContext, TrainingHooks
from ..data.batches import Encoded
from .distributed import SINGLE, Distributed

# One micro-batch of a step: the batch, its number of examples, and the weight of each example's loss.
Micro = tuple[dict[str, torch.Tensor], int, float]


class Diverged(Exception):
    """A loss or gradient norm that is NaN or infinite; the message says which (``loss is nan``, ...)."""


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device) -> Callable:
    """A factory of autocast contexts: bf16 or fp16 autocast on ``device``, or no-op contexts for fp32."""
    if precision in AUTOCAST:
        return lambda: torch.autocast(device.type, dtype=AUTOCAST[precision])
    return nullcontext


# The task head is new and randomly initialised, and must be learned within the budget: unless ``--head-lr`` says
# otherwise it learns at least at this rate. Measured with MiniLM and LoRA (docs/results.md), head at 1e-3 / 5e-3 /
# 2e-2: WNUT-16 entity F1 after 200 steps of 16 0.0 / 0.444 / 0.420 (at the run's rate every word is tagged O);
# Rotten Tomatoes test accuracy after the default run (full data, 2 epochs) 85.0 / 85.3 / 83.4 %, and after 1,500
# reviews for one epoch 74.9 (mean pooling, one rate) / 75.0 / 75.1 %.
HEAD_LR_FLOOR = 5e-3


def group_rate(group, lr: float, head_lr: float | None) -> float:
    """A parameter group's peak learning rate: the task head's is ``head_lr``, else the run's rate raised to
    ``HEAD_LR_FLOOR``; the others learn at their fixed rate where they have one, else at their scale times the
    run's rate."""
    if group.head:
        return head_lr if head_lr is not None else max(lr * group.lr_scale, HEAD_LR_FLOOR)
    return group.lr if group.lr is not None else lr * group.lr_scale


def param_groups(attachment, weight_decay: float, lr: float, head_lr: float | None = None) -> list[dict]:
    """The optimiser's parameter groups: the task head and the method's parts (``Attachment.parameter_groups``:
    their own learning rate and weight decay), each split into matrices, which decay, and vectors (biases, norms),
    which do not. ``lr_scale`` is each group's rate over ``lr``."""
    out = []
    for group, params in attachment.parameter_groups():
        scale, name = group_rate(group, lr, head_lr) / lr, group.pattern
        decay = group.weight_decay if group.weight_decay is not None else weight_decay
        matrices, vectors = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
        out.append({"params": matrices, "weight_decay": decay, "lr": lr * scale, "name": name, "lr_scale": scale})
        out.append({"params": vectors, "weight_decay": 0.0, "lr": lr * scale, "name": name, "lr_scale": scale})
    return out


class Step:
    """The optimiser, the schedule and the order of one training step (see the module docstring).

    ``attachment`` is a peftlab Attachment or anything offering the same training surface (the PEFT peer);
    ``settings`` a ``TrainSettings``; ``total_steps`` the length of the schedule. ``forward`` is the module the
    training loss runs through (default: the attachment's model; the loop passes a ``torch.compile`` wrapper
    under ``--compile``). With ``checked`` (the loop), every step reads its loss back and a loss or gradient norm
    that is NaN or infinite raises ``Diverged``; unchecked (the benchmark's timed step) nothing is read back.
    """

    def __init__(
        self,
        attachment,
        task,
        settings,
        lr: float,
        total_steps: int,
        device: torch.device,
        hooks: TrainingHooks,
        dist: Distributed = SINGLE,
        forward: torch.nn.Module | None = None,
        checked: bool = True,
    ):
        self.attachment = attachment
        self.model = attachment.model
        self.forward = forward if forward is not None else self.model
        self.task = task
        self.settings = settings
        self.total_steps = total_steps
        self.device = device
        self.hooks = hooks
        self.dist = dist
        self.checked = checked
        self.params = attachment.trainable_parameters()
        groups = param_groups(attachment, settings.weight_decay, lr, settings.head_lr)
        self.optimizer = torch.optim.AdamW(groups, lr=lr)
        schedule = settings.schedule if settings.schedule != "constant" else "constant_with_warmup"
        from transformers import get_scheduler  # not at module level: its import sets TORCHINDUCTOR_CACHE_DIR

        self.scheduler = get_scheduler(
            schedule,
            self.optimizer,
            num_warmup_steps=round(settings.warmup * total_steps),
            num_training_steps=total_steps,
        )
        self.autocast = autocast_for(settings.precision, device)
        # fp16's narrow range: the loss is scaled up before backward and the gradients down before they are used.
        self.scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
        # The gradient norm of the last step (a tensor, before clipping): measured by the clipping, or, where
        # clipping is off, only when ``measure_grad_norm`` asks for it (tracking); None when not measured.
        self.measure_grad_norm = False
        self.grad_norm: torch.Tensor | None = None

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of ``batch`` under the autocast, through the training forward."""
        with self.autocast():
            return self.task.loss(self.forward, batch)

    def prepare(self, batches: Callable) -> None:
        """The hooks' one-off preparation before the first step (a Fisher mask, ...); ``batches(examples,
        batch_size)`` yields training batches for it."""
        ctx = TrainContext(self.attachment, self.loss, batches, self.total_steps, self.settings, self.device)
        self.hooks.prepare(ctx)

    def micro_batches(self, chunk: Sequence[int], data: Encoded) -> Iterator[Micro]:
        """This process's micro-batches of the step over examples ``chunk`` of ``data``, built as they are needed.

        A process left without examples still takes part in the gradient exchange, with one example weighted
        zero; under FSDP every process makes the same number of passes (it gathers weights in each)."""
        dist, size = self.dist, self.settings.batch_size
        share = dist.shard(list(chunk))
        weight = 1 / len(chunk) if share else 0.0  # summed over processes: the single-process mean
        if dist.sharded:
            weight *= dist.world  # FSDP averages gradients over processes instead of summing them
        micro: list[list[int] | None] = [share[k : k + size] for k in range(0, len(share), size)]
        if dist.sharded:
            passes = math.ceil(math.ceil(len(chunk) / dist.world) / size)
            micro += [None] * (passes - len(micro))  # extra passes weigh zero
        for idx in micro:
            scale = weight
            if idx is None:  # a zero-weight pass that keeps the processes in step
                idx, scale = list(chunk[:1]), 0.0
            yield data.batch(idx, self.device), len(idx), scale

    @staticmethod
    def whole(batch: dict[str, torch.Tensor]) -> Micro:
        """``batch`` as the one micro-batch of a step (each example weighted 1 / its size: the batch mean)."""
        n = len(batch["input_ids"])
        return batch, n, 1 / n

    def backward(self, index: int, micro: Iterable[Micro]) -> float | None:
        """``before_step``, then the loss (plus the hooks' penalty) and backward pass of every micro-batch, and the
        gradients summed over processes. Returns the step's mean loss over all processes when ``checked``."""
        self.hooks.before_step(index)
        dist = self.dist
        step_loss = 0.0
        for batch, n, scale in micro:
            loss = self.loss(batch)
            if self.checked and not dist.enabled and not torch.isfinite(loss):
                raise Diverged(f"loss is {loss.item()}")
            penalty = self.hooks.penalty()
            objective = loss if penalty is None else loss + penalty
            weighted = objective * (n * scale)
            (weighted if self.scaler is None else self.scaler.scale(weighted)).backward()
            if self.checked:
                step_loss += loss.item() * n * scale / (dist.world if dist.sharded else 1)
        if not dist.sharded:
            dist.sum_gradients(self.params)  # only what trains is exchanged (FSDP exchanges them itself)
        if not self.checked:
            return None
        step_loss = dist.all_sum(step_loss)
        if not math.isfinite(step_loss):
            raise Diverged(f"loss is {step_loss}")
        return step_loss

    def update(self, index: int) -> None:
        """``after_backward``, gradient masks, clipping, the optimiser and scheduler steps, ``zero_grad``, masked
        entries restored, ``after_step``. Under fp16 a step whose gradients overflowed is skipped by the scaler
        (which lowers its scale), not reported as divergence."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # the hooks and the clipping see the true gradients
        self.hooks.after_backward(index)
        self.attachment.mask_gradients()
        if self.settings.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
            if self.checked and self.scaler is None and not torch.isfinite(norm):
                raise Diverged(f"the gradient norm is {norm.item()}")
            self.grad_norm = norm
        elif self.measure_grad_norm:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, math.inf)  # measures; scales by 1
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.attachment.restore_masked()
        self.hooks.after_step(index, self.optimizer, self.scheduler)

    def take(self, index: int, micro: Iterable[Micro]) -> float | None:
        """Step number ``index`` (from 0) over ``micro``; returns the step's loss when ``checked``."""
        loss = self.backward(index, micro)
        self.update(index)
        return loss
