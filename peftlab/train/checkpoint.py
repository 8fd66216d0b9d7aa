"""Training checkpoints written as safetensors + JSON only (no pickles), atomically.

A checkpoint folder holds

- ``state.safetensors``: the adapter's tensors as the adapter file stores them (``model.<name>``, masks as
  sparse indices), the optimiser's per-parameter tensors (``optimizer.<index>.<key>``), the method hooks' state
  (``hooks.<name>``) and the torch RNG state(s) (``rng.cpu``, ``rng.cuda``);
- ``trainer.json``: step, timing, best validation score, history, the optimiser's param groups and scalar
  state, and the learning-rate scheduler's state.

Resuming restores all of it, so a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..core.attach import Attachment, full_tensor, load_state, read_tensors, shard_like
from ..errors import InputError
from ..fileio import atomic_folder, read_folder, read_json

STATE = "state.safetensors"
TRAINER = "trainer.json"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return full_tensor(t.detach()).to("cpu").contiguous().clone()


def save_checkpoint(
    path: Path,
    attachment: Attachment,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    hooks=None,
    write: bool = True,
) -> None:
    """Write a checkpoint; under sharded data parallelism every process calls this (gathering is collective) and only
    the one with ``write=True`` writes."""
    tensors = {f"model.{k}": v for k, v in attachment.saved_tensors().items()}
    if hooks is not None:
        tensors.update({f"hooks.{k}": _cpu(v) for k, v in hooks.state_dict().items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"optimizer.{index}.{key}"] = _cpu(value)
            else:
                scalars.setdefault(str(index), {})[key] = value.item() if torch.is_tensor(value) else value
    if not write:
        return
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        **trainer_state,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "scheduler": scheduler.state_dict(),  # plain numbers (its lr_lambdas entries are None or {})
    }
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / STATE))
        (tmp / TRAINER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def has_checkpoint(path: Path) -> bool:
    return read_folder(path) is not None


def checkpoint_step(path: Path) -> int | None:
    """The step a run resumed from ``path`` continues after (None: no readable checkpoint there)."""
    folder = read_folder(path)
    if folder is None:
        return None
    step = read_json(folder / TRAINER, "checkpoint state").get("step")
    return step if isinstance(step, int) else None


def load_checkpoint(
    path: Path, attachment: Attachment, optimizer: torch.optim.Optimizer, scheduler, hooks=None
) -> dict:
    """Restore model, optimiser, scheduler, hooks and RNG state; returns the trainer state (step, best, ...)."""
    folder = read_folder(path)
    if folder is None:
        raise InputError(f"{path}: no checkpoint to resume from")
    meta = read_json(folder / TRAINER, "checkpoint state")
    _check_trainer_state(meta, folder / TRAINER)
    tensors = read_tensors(folder / STATE)
    try:
        return _restore(folder, meta, tensors, attachment, optimizer, scheduler, hooks)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise InputError(
            f"{folder}: the checkpoint does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it was damaged or comes from another run"
        ) from None


# What the trainer state must hold, with its JSON type (an int where a number is stored as a float is accepted).
TRAINER_FIELDS = {
    "step": int,
    "train_seconds": (int, float),
    "examples": int,
    "tokens": int,
    "best_step": int,
    "history": list,
    "loss_sum": (int, float),
    "loss_count": int,
    "optimizer": dict,
    "scheduler": dict,
}


def _check_trainer_state(meta: dict, source: Path) -> None:
    for key, kind in TRAINER_FIELDS.items():
        if key not in meta:
            raise InputError(f"{source}: missing field {key!r}")
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InputError(f"{source}: field {key!r} holds {value!r:.60}, of the wrong type")
        if kind is int and value < 0:
            raise InputError(f"{source}: field {key!r} holds {value!r}, expected a count >= 0")
    if meta.get("best") is not None and not isinstance(meta["best"], dict):
        raise InputError(f"{source}: field 'best' must be an object of metrics or null")
    if not isinstance(meta["optimizer"].get("scalars"), dict) or not isinstance(
        meta["optimizer"].get("param_groups"), list
    ):
        raise InputError(f"{source}: field 'optimizer' must hold 'scalars' (an object) and 'param_groups' (a list)")


def _restore(folder: Path, meta: dict, tensors: dict, attachment, optimizer, scheduler, hooks) -> dict:
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state(attachment, model, folder / STATE)
    if hooks is not None:
        hooks.load_state_dict({k[len("hooks.") :]: v for k, v in tensors.items() if k.startswith("hooks.")})
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["optimizer"]["scalars"].items():
        for name, value in scalars.items():
            # AdamW keeps its step count as a float tensor; restore it as one.
            opt_state.setdefault(int(index), {})[name] = torch.tensor(float(value)) if name == "step" else value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in opt_state.items():  # sharded parameters get sharded optimiser state
        for name, value in values.items():
            if torch.is_tensor(value) and value.ndim > 0 and index < len(params):
                values[name] = shard_like(value, params[index])
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return {k: v for k, v in meta.items() if k not in ("optimizer", "scheduler")}
