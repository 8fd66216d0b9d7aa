"""How a sequence classifier reads one vector out of the encoder's token states: its pooling.

A Hugging Face sequence classifier reads a fixed position: BERT passes [CLS] through its pretrained pooler (a dense
layer with tanh), RoBERTa, MPNet and DistilBERT read the first token, decoders the last real token. That fits a
checkpoint pretrained with that readout. Sentence-transformers checkpoints (all-MiniLM-L6-v2, all-mpnet-base-v2,
most embedding models) were trained instead to be read by the mean of their token states, and their BERT pooler was
never trained for them: on a small training set the [CLS] readout starts far behind (a frozen MiniLM's mean-pooled
features give 72 % on Rotten Tomatoes with a logistic regression, its [CLS] state 67 %).

Choices (``--pooling``):

- ``model``: the classifier's own readout, as above;
- ``cls``: the first token's final state, without BERT's pretrained pooler;
- ``mean``: the mean of the token states over the attention mask (virtual tokens a method inserts included);
- ``max``: their element-wise maximum over the mask;
- ``auto``: what the checkpoint says it was trained with (sentence-transformers' ``modules.json`` and its Pooling
  module's ``config.json``), else ``model``.

A pooling other than ``model`` is a forward hook on the classifier's body (``model.base_model``): it replaces the
body's token states by the pooled vector at every position (a broadcast view, no copy) and its ``pooler_output``
(BERT) by the pooled vector, so whichever position the unchanged task head reads, it reads the pooled vector. The
model's source and weights are untouched, and a saved model says how it is read through the sentence-transformers
files ``write_pooling_files`` writes beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import InputError
from ..fileio import write_json

POOLINGS = ("auto", "model", "cls", "mean", "max")
# sentence-transformers' Pooling config switch -> our pooling (lasttoken is what a decoder classifier reads anyway)
SENTENCE_TRANSFORMERS_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "model",
}
POOLING_MODULE = "sentence_transformers.models.Pooling"


def checkpoint_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with, from its ``modules.json`` and its Pooling
    module's config; None for a folder without them, or one whose pooling has no equivalent here (several modes
    at once, weighted or sqrt-length means)."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if isinstance(m, dict) and m.get("type") == POOLING_MODULE)
        config = json.loads((folder / str(pooling.get("path", "")) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, TypeError, AttributeError):
        return None
    if not isinstance(config, dict):
        return None
    on = [key for key, value in config.items() if key.startswith("pooling_mode_") and value is True]
    if len(on) != 1 or on[0] not in SENTENCE_TRANSFORMERS_MODES:
        return None
    return SENTENCE_TRANSFORMERS_MODES[on[0]]


def resolve_pooling(choice: str, folder: Path) -> str:
    """The pooling a classifier of the model in ``folder`` uses: ``choice``, or for ``auto`` the checkpoint's own."""
    if choice not in POOLINGS:
        raise InputError(f"pooling: {choice!r} is not one of {', '.join(POOLINGS)}")
    if choice != "auto":
        return choice
    return checkpoint_pooling(folder) or "model"


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """(B, T, H) token states -> (B, H) by ``mode`` over the positions where ``mask`` is 1 (all when None)."""
    if mode == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    keep = mask.to(torch.bool).unsqueeze(-1)  # the mask the body was given (virtual tokens included)
    if mode == "mean":
        total = hidden.masked_fill(~keep, 0).sum(dim=1)
        return total / keep.sum(dim=1).clamp(min=1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(~keep, torch.finfo(hidden.dtype).min).amax(dim=1)
    raise ValueError(f"unknown pooling {mode!r}")


def install_pooling(model: nn.Module, mode: str) -> RemovableHandle | None:
    """Make the sequence classifier ``model`` read its body's token states by ``mode`` (see the module's doc);
    returns the hook's handle (None for ``model``, which changes nothing)."""
    if mode == "model":
        return None
    if mode not in POOLINGS[2:]:
        raise InputError(f"pooling: {mode!r} is not one of {', '.join(POOLINGS[1:])}")
    body = getattr(model, "base_model", model)
    if body is model:
        raise InputError(f"pooling: {type(model).__name__} has no separate body to pool; use --pooling model")

    def read_pooled(module: nn.Module, args: tuple, kwargs: dict, output):
        hidden = output[0]
        pooled = pool(hidden, kwargs.get("attention_mask"), mode)
        everywhere = pooled.unsqueeze(1).expand_as(hidden)
        if isinstance(output, tuple):
            rest = tuple(pooled if _is_pooler_output(x, pooled) else x for x in output[1:])
            return (everywhere, *rest)
        output["last_hidden_state"] = everywhere
        if output.get("pooler_output") is not None:
            output["pooler_output"] = pooled
        return output

    model.peftlab_pooling = mode  # what ``pooling_of`` reads
    return body.register_forward_hook(read_pooled, with_kwargs=True)


def pooling_of(model: nn.Module) -> str:
    """The pooling ``install_pooling`` gave ``model`` (``model`` when none)."""
    return getattr(model, "peftlab_pooling", "model")


def _is_pooler_output(x, pooled: torch.Tensor) -> bool:
    return isinstance(x, torch.Tensor) and x.shape == pooled.shape


def write_pooling_files(folder: Path, mode: str, hidden_size: int) -> None:
    """sentence-transformers' ``modules.json`` and Pooling config for a saved model read by ``mode`` (not
    ``model``), so that peftlab's ``auto`` and sentence-transformers read it back the same way."""
    if mode in ("model", "auto"):
        return
    switches = {key: SENTENCE_TRANSFORMERS_MODES[key] == mode for key in SENTENCE_TRANSFORMERS_MODES}
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING_MODULE},
    ]
    write_json(folder / "modules.json", modules)
    write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": hidden_size, **switches})


def saved_pooling(meta: dict) -> str:
    """The pooling an adapter's metadata records for its classifier (``model`` where it records none: adapters saved
    before pooling was recorded, and those of other tasks)."""
    task = meta.get("task")
    return str(task.get("pooling", "model")) if isinstance(task, dict) else "model"


def use_saved_pooling(model: nn.Module, meta: dict, source: Path) -> None:
    """Give ``model`` the pooling a saved classifier adapter was trained with (``saved_pooling``); refuse a model
    already set to read another way."""
    task = meta.get("task")
    if not isinstance(task, dict) or task.get("type") != "classification":
        return
    saved, have = saved_pooling(meta), pooling_of(model)
    if saved == have:
        return
    if have != "model":
        raise InputError(
            f"{source}: the adapter's classifier was trained on {saved!r} pooling, but the model reads {have!r} "
            f"pooling (give --pooling {saved}, or train a new adapter)"
        )
    install_pooling(model, saved)
