"""The one training loop every method shares.

Each optimiser step is a ``peftlab.train.step.Step`` (the step the benchmark measures too): AdamW (no weight decay
on biases and norms) with linear warmup then linear or cosine decay, gradient accumulation, gradient clipping, an
optional bf16 autocast. Around it the loop orders the batches, evaluates at the end of every epoch, keeps the best
validation state as the run's adapter, and writes a checkpoint every ``checkpoint_every`` steps and at each epoch end.

Methods act inside the step through ``TrainingHooks`` (``peftlab.core.hooks``); the regularisers toward the
pretrained weights (``--l2sp``, ``--ewc``: ``peftlab.train.regularise``) are hooks too, run after the method's own.
Static masks on base parameters are enforced by the step: masked-out gradients are zeroed and masked-out entries
restored after every step.

Only an evaluation of the model in the form training ends in can be the best state (``hooks.final_form``: diff
pruning's dense diff before its projection cannot); the last evaluation of a run that has no best yet always is, so
every run leaves an adapter.

Determinism: the order of the training set in epoch ``e`` comes from a generator seeded with (seed, e); the global
torch RNG (dropout) is seeded from the seed when training starts and saved in every checkpoint, so a resumed run
retraces the uninterrupted one exactly, and two models with the same start weights (ours and a PEFT peer) see the
same dropout masks.
A loss or gradient that turns NaN or infinite stops the run with a message; the last good checkpoint stays.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .. import progress
from ..core.attach import Attachment
from ..core.hooks import HookList, TrainingHooks
from ..data.batches import Encoded, length_grouped
from ..errors import InputError, PeftlabError, require
from ..evaluate.metrics import classification_metrics
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .distributed import SINGLE, Distributed
from .regularise import regularisers
from .step import HEAD_LR_FLOOR, Diverged, Step
from .step import autocast_for as autocast_for  # re-exported: run and cli build evaluation autocasts with it
from .tracking import Tracker, Window, learning_rates, numbers, peak_process_memory

# Random streams of a run besides the epochs' data orders (streams 0, 1, ...): see ``stream_seed``.
SAMPLING = -1  # the batches a hook draws before training (``TrainContext.batches``: the Fisher information)
DROPOUT = -2  # the global torch RNG, seeded when training starts


@dataclass
class TrainSettings:
    epochs: float = field(default=2.0, metadata={"help": "passes over the training set (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimiser steps"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's own)"})
    head_lr: float | None = field(
        default=None,
        metadata={
            "help": f"peak learning rate of the new task head (default: the run's rate, raised to {HEAD_LR_FLOOR:g} "
            "where lower: the head starts from random and must be learned within the budget)"
        },
    )
    batch_size: int = field(default=32, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    eval_batch_size: int = field(default=128, metadata={"help": "examples per evaluation batch"})
    warmup: float = field(default=0.06, metadata={"help": "share of the steps spent warming the learning rate up"})
    schedule: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "decay after warmup"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm (0 turns clipping off)"})
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata={"help": "autocast of the forward pass: bf16, fp16 (with loss scaling) or plain fp32"},
    )
    metric: Literal["auto", "accuracy", "f1", "loss"] = field(
        default="auto",
        metadata={"help": "validation metric that picks the best state (auto: accuracy, or loss for sft)"},
    )
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints (0: epoch ends only)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and dropout"})
    group_by_length: bool = field(
        default=False,
        metadata={"help": "draw each step's examples from examples of similar length (less padding, same epochs)"},
    )
    l2sp: float = field(
        default=0.0, metadata={"help": "L2-SP, 0 = off: adds l2sp * ||theta - theta_0||^2 over the pretrained weights"}
    )
    ewc: float = field(
        default=0.0,
        metadata={"help": "EWC, 0 = off: adds ewc * sum F (theta - theta_0)^2, F the empirical Fisher at theta_0"},
    )
    ewc_examples: int = field(default=256, metadata={"help": "training examples that estimate EWC's Fisher"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "keep only each transformer block's input and recompute its activations in the backward pass "
            "(non-reentrant): activation memory of about one block, for about a third more compute"
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the model for the training steps: fewer, fused kernels (on an H100 a MiniLM LoRA "
            "step of a fixed shape takes 0.68x the eager time), after tens of seconds of compiling per new batch "
            "shape; for long GPU runs, not CPUs"
        },
    )

    def __post_init__(self):
        require(self.epochs > 0, "epochs", "a positive number", self.epochs)
        require(self.max_steps is None or self.max_steps > 0, "max_steps", "a positive integer", self.max_steps)
        require(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "lr", "a positive number", self.lr)
        require(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        require(self.grad_accum > 0, "grad_accum", "a positive integer", self.grad_accum)
        require(self.eval_batch_size > 0, "eval_batch_size", "a positive integer", self.eval_batch_size)
        require(0 <= self.warmup < 1, "warmup", "a share in [0, 1)", self.warmup)
        require(
            self.head_lr is None or (self.head_lr > 0 and math.isfinite(self.head_lr)),
            "head_lr",
            "a positive number",
            self.head_lr,
        )
        require(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require(self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0", self.max_grad_norm)
        require(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0", self.checkpoint_every)
        require(self.l2sp >= 0 and math.isfinite(self.l2sp), "l2sp", "a number >= 0", self.l2sp)
        require(self.ewc >= 0 and math.isfinite(self.ewc), "ewc", "a number >= 0", self.ewc)
        require(self.ewc_examples > 0, "ewc_examples", "a positive integer", self.ewc_examples)
        # seeds are combined into per-stream seeds (seed * 100_003 + stream) that must stay within 64 bits
        require(0 <= self.seed < 2**40, "seed", "an integer from 0 to 2^40 - 1", self.seed)


@dataclass
class FitResult:
    steps: int
    best: dict | None
    best_step: int
    train_seconds: float
    examples: int
    tokens: int
    history: list[dict]


class ClassificationTask:
    """Cross-entropy on the [CLS]/last-token logits; accuracy and macro P/R/F1 for evaluation."""

    metric = "accuracy"

    def __init__(self, num_labels: int):
        self.num_labels = num_labels

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits  # (B, num_labels)
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, data: Encoded, batch_size: int, device, autocast, dist: Distributed = SINGLE) -> dict:
        """Metrics over all of ``data``; under data parallelism each process scores its shard and all gather."""
        if len(data) == 0:
            return classification_metrics([], [], self.num_labels)
        was_training = model.training
        model.eval()
        mine = dist.shard(list(range(len(data))))
        order = sorted(mine, key=lambda i: len(data.input_ids[i]))  # less padding per batch
        predictions: dict[int, int] = {}
        total_loss = 0.0
        with progress.track(len(order)) as advance:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = data.batch(idx, device)
                with autocast():
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
                total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
                predictions.update(zip(idx, logits.argmax(-1).tolist(), strict=True))
                advance(len(idx))
        model.train(was_training)
        parts = dist.gather((predictions, total_loss))  # every process's share, on every process
        predictions = {i: p for part, _ in parts for i, p in part.items()}
        total_loss = sum(loss for _, loss in parts)
        ordered = [predictions[i] for i in range(len(data))]
        metrics = classification_metrics(data.labels, ordered, self.num_labels)
        metrics["loss"] = total_loss / len(data)
        return metrics


def better(value: float, best: float, metric: str) -> bool:
    return value < best if metric == "loss" else value > best


def make_hooks(attachment: Attachment, settings: TrainSettings) -> TrainingHooks:
    """The hooks a run trains with: the method's own (if any), then the regularisers toward the pretrained
    weights that ``settings`` turns on (L2-SP, EWC; ``peftlab.train.regularise``)."""
    factory = attachment.method.hooks
    hooks = [factory(attachment, attachment.config)] if factory else []
    hooks += regularisers(attachment, settings)
    if len(hooks) > 1:
        return HookList(hooks)
    return hooks[0] if hooks else TrainingHooks()


def total_steps(examples: int, settings: TrainSettings) -> int:
    """The optimiser steps of a run over ``examples`` training examples."""
    steps_per_epoch = max(1, math.ceil(examples / (settings.batch_size * settings.grad_accum)))
    return settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing of every transformer block, through transformers' own switch (non-reentrant, so it
    works with frozen inputs, prefix-style methods and FSDP); effective in training mode only."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def stream_seed(seed: int, stream: int) -> int:
    """One seed per random stream of a run: each epoch's data order (streams 0, 1, ...), the batches a hook samples
    before training (SAMPLING) and dropout (DROPOUT), apart from each other for every run seed."""
    return seed * 100_003 + stream


def epoch_order(train: Encoded, settings: TrainSettings, epoch: int) -> list[int]:
    """The order in which ``fit`` visits the examples of ``train`` in epoch ``epoch`` (from 0): step ``k`` of the
    epoch takes the next ``batch_size * grad_accum`` of them."""
    g = torch.Generator().manual_seed(stream_seed(settings.seed, epoch))
    order = torch.randperm(len(train), generator=g).tolist()
    if settings.group_by_length:
        lengths = [len(ids) for ids in train.input_ids]
        order = length_grouped(order, lengths, settings.batch_size * settings.grad_accum, g)
    return order


@dataclass
class LoopState:
    """Where ``fit`` stands: the trainer state of its checkpoints (``trainer.json``, these fields in this order)."""

    step: int = 0
    train_seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    best: dict | None = None
    best_step: int = 0
    history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0  # the training loss summed since the last evaluation, over loss_count steps
    loss_count: int = 0
    prepare_seconds: float | None = None  # the hooks' preparation, when this run (or the one it resumes) made it
    grad_scaler: dict | None = None  # fp16: the gradient scaler's state (its scale and growth count)

    def as_dict(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        for optional in ("prepare_seconds", "grad_scaler"):
            if state[optional] is None:
                del state[optional]
        return state

    @classmethod
    def from_dict(cls, state: dict) -> LoopState:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    def add_step(self, examples: int, tokens: int, seconds: float, loss: float) -> None:
        self.step += 1
        self.examples += examples
        self.tokens += tokens
        self.train_seconds += seconds
        self.loss_sum += loss
        self.loss_count += 1

    def add_evaluation(
        self, metrics: dict, metric: str, epoch: float, lr: float, eligible: bool = True
    ) -> tuple[dict, bool]:
        """Record the validation ``metrics`` at the current step; (the history entry, whether it is a new best). An
        evaluation that is not ``eligible`` is recorded but never the best."""
        entry = {
            "step": self.step,
            "epoch": epoch,
            "train_loss": self.loss_sum / max(self.loss_count, 1),
            "lr": lr,
            "validation": metrics,
        }
        self.history.append(entry)
        self.loss_sum, self.loss_count = 0.0, 0
        is_best = eligible and (self.best is None or better(metrics[metric], self.best[metric], metric))
        if is_best:
            self.best, self.best_step = metrics, self.step
        return entry, is_best


def fit(
    attachment: Attachment,
    task: ClassificationTask,
    train: Encoded,
    validation: Encoded,
    settings: TrainSettings,
    lr: float,
    checkpoint_dir: Path,
    on_best: Callable[[dict, int], None],
    device: torch.device,
    resume: bool = False,
    show_progress: bool = True,
    hooks: TrainingHooks | None = None,
    dist: Distributed = SINGLE,
    tracker: Tracker | None = None,
    log_every: int = 10,
    epoch_lines: bool = True,
) -> FitResult:
    """Train to the end of ``settings``' schedule (see the module docstring). ``tracker`` (``peftlab.train.tracking``,
    the main process's only) receives the training metrics every ``log_every`` steps, at the first step and the
    last, and the validation metrics at every evaluation."""
    model = attachment.model
    model.train()
    per_step = settings.batch_size * settings.grad_accum
    steps_per_epoch = max(1, math.ceil(len(train) / per_step))
    total = total_steps(len(train), settings)
    hooks = hooks or make_hooks(attachment, settings)
    metric = task.metric if settings.metric == "auto" else settings.metric
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # The training forward may go through a compiled wrapper; it shares the parameters, and everything else
    # (evaluation, checkpoints, the saved adapter) uses the plain model.
    forward = torch.compile(model) if settings.compile else model
    trainer = Step(attachment, task, settings, lr, total, device, hooks, dist, forward)
    trainer.measure_grad_norm = tracker is not None

    def sample_batches(examples: int, batch_size: int):
        g = torch.Generator().manual_seed(stream_seed(settings.seed, SAMPLING))
        order = torch.randperm(len(train), generator=g)[:examples].tolist()
        for k in range(0, len(order), batch_size):
            yield train.batch(order[k : k + batch_size], device)

    if resume and has_checkpoint(checkpoint_dir):
        state = LoopState.from_dict(
            load_checkpoint(checkpoint_dir, attachment, trainer.optimizer, trainer.scheduler, hooks)
        )
        if trainer.scaler is not None and state.grad_scaler is not None:
            trainer.scaler.load_state_dict(state.grad_scaler)
    else:
        state = LoopState()
        # Dropout draws from the global RNG: seed it here, so the masks depend on the seed alone, not on what built
        # the model (a PEFT peer built from the same start then retraces this run step for step).
        torch.manual_seed(stream_seed(settings.seed, DROPOUT))
        started = time.perf_counter()
        trainer.prepare(sample_batches)
        state.prepare_seconds = time.perf_counter() - started

    orders: dict[int, list[int]] = {}  # the current epoch's order
    window, first = Window(), state.step + 1  # the steps since the last log; this process's first step

    # The bar's rate and time left come from this process's own steps, by the wall clock (evaluations included):
    # right from the first step, however slow the steps are.
    resumed_at, wall = state.step, time.perf_counter()
    drawn = show_progress and dist.main
    bar = progress.new_bar(drawn)
    with bar, progress.showing(progress.for_run(show_progress, dist.main), host=bar if drawn else None):
        job = bar.add_task("train", total=total, completed=state.step, info="", eta=progress.time_left(0, 1, 0))
        while state.step < total:
            step = state.step
            epoch, position = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders.clear()
                orders[epoch] = epoch_order(train, settings, epoch)
            chunk = orders[epoch][position * per_step : (position + 1) * per_step]
            rates = [g["lr"] for g in trainer.optimizer.param_groups]  # the rates this step uses
            started = time.perf_counter()
            try:
                step_loss = trainer.take(step, trainer.micro_batches(chunk, train))
            except Diverged as e:
                raise _diverged(str(e), step, checkpoint_dir) from None
            tokens = sum(len(train.input_ids[i]) for i in chunk)
            seconds = time.perf_counter() - started
            state.add_step(len(chunk), tokens, seconds, step_loss)
            step = state.step
            if drawn:
                speed = progress.rate_text(state.examples, state.train_seconds, state.step)
                left = progress.time_left(step - resumed_at, total - resumed_at, time.perf_counter() - wall)
                bar.update(job, completed=step, info=f"loss {step_loss:.4f}  {speed}", eta=left)
            if tracker is not None:
                window.add(step_loss, len(chunk), tokens, seconds)
                if step in (first, total) or step % log_every == 0:
                    logged = {**window.metrics(), **learning_rates(trainer.optimizer.param_groups, rates)}
                    norm = trainer.grad_norm
                    if norm is not None and math.isfinite(norm := float(norm)):  # fp16: a skipped step's is inf
                        logged["train/grad_norm"] = norm
                    logged["train/epoch"] = step / steps_per_epoch
                    tracker.log(step, {**logged, **peak_process_memory(device)})
                    window.reset()

            epoch_end = step % steps_per_epoch == 0 or step == total
            if epoch_end:
                with progress.stage("validation"):
                    metrics = task.evaluate(
                        model, validation, settings.eval_batch_size, device, trainer.autocast, dist.for_evaluation
                    )
                lr_now = trainer.scheduler.get_last_lr()[0]
                eligible = hooks.final_form(step) or (step == total and state.best is None)
                epoch_now = round(step / steps_per_epoch, 3)
                entry, is_best = state.add_evaluation(metrics, metric, epoch_now, lr_now, eligible)
                if is_best:
                    on_best(metrics, step)
                if tracker is not None:
                    tracker.log(step, {**numbers("validation", metrics), "train/epoch_loss": entry["train_loss"]})
                if dist.main and epoch_lines:
                    bar.console.print(
                        f"epoch {entry['epoch']:g}  step {step}  train loss {entry['train_loss']:.4f}  "
                        f"validation {metric} {metrics[metric]:.4f}" + ("  (best)" if is_best else "")
                    )
            checkpoint_due = epoch_end or (settings.checkpoint_every and step % settings.checkpoint_every == 0)
            if checkpoint_due and (dist.main or dist.sharded):  # only rank 0 writes; every rank reads it on resume
                state.grad_scaler = trainer.scaler.state_dict() if trainer.scaler is not None else None
                save_checkpoint(
                    checkpoint_dir,
                    attachment,
                    trainer.optimizer,
                    trainer.scheduler,
                    state.as_dict(),
                    hooks,
                    write=dist.main,
                )
    return FitResult(
        state.step, state.best, state.best_step, state.train_seconds, state.examples, state.tokens, state.history
    )


def _diverged(what: str, step: int, checkpoint_dir: Path) -> PeftlabError:
    kept = f"; the last good checkpoint is kept in {checkpoint_dir}" if has_checkpoint(checkpoint_dir) else ""
    return PeftlabError(f"training diverged at step {step + 1}: {what}{kept}; lower --lr or keep --max-grad-norm on")
