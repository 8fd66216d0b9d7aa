"""The method registry: every method registers itself here by name.

A method is a small record: its config dataclass (whose fields become CLI flags and config-file keys), an
``apply`` function that adapts a model in place, and a few facts the rest of peftlab needs (family, default
learning rate, whether it merges into the base weights).

``apply(model, config, protected)`` receives a model whose parameters are all frozen. It wraps layers in
adapter layers (their parameters train) and/or unfreezes base parameters the method trains itself, and returns
the names of the modules it adapted. ``protected`` names the task head, which a method must not adapt. A method
that acts during training (gradient masks, pruning schedules, periodic merges) also gives ``hooks``, a factory
``hooks(attachment, config) -> TrainingHooks`` (see ``peftlab.core.hooks``).

A method that trains through a reparameterisation it does not need afterwards (prefix tuning's MLP, P-tuning's
prompt encoder) gives ``fold``: ``fold(attachment) -> (config, tensors) | None`` returns the config of the
equivalent adapter without the reparameterisation and its adapter layers' tensors (keyed ``<module>.<name>``, as
that adapter's ``state()`` keys them), computed from the current parameters; None when there is nothing to fold.
``Attachment.save`` writes that folded form, so ``load_adapter`` rebuilds the adapter without the
reparameterisation; training checkpoints keep the unfolded state for an exact resume.

A method whose parts want their own learning rate (LoRA+'s B, a prefix MLP) gives ``param_groups``:
``param_groups(config) -> [ParamGroup]``, each a parameter-name pattern (the glob rule of ``peftlab.core.targets``)
with a learning-rate scale (or a fixed rate) and optionally its own weight decay; the trainer builds the optimiser
from them, first matching group first, the rest at the base rate, with no method-name branching.

A method with a Hugging Face PEFT counterpart gives ``peft``, a ``PeftFormat``: the PEFT kind it converts to and its
own converters; ``peftlab.core.hf_peft`` only dispatches to them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InputError, suggest

if TYPE_CHECKING:
    from .attach import Attachment
    from .hooks import TrainingHooks

# exporter(attachment) -> (PEFT config fields, tensors: keyed without "base_model.model." unless full_keys)
PeftExporter = Callable[["Attachment"], tuple[dict, dict[str, torch.Tensor]]]
# importer(model, PEFT config, tensors as the exporter keys them, weights file) -> Attachment
PeftImporter = Callable[[nn.Module, dict, dict[str, torch.Tensor], Path], "Attachment"]


@dataclass(frozen=True)
class PeftFormat:
    """How a method converts to and from the Hugging Face PEFT format."""

    # PEFT's kind: its ``peft_type``, or "LORA+DORA" for a LoRA config with ``use_dora``.
    kind: str
    export: PeftExporter
    # The importer of adapters of this kind; None when the method only exports (QLoRA and DyLoRA write plain LoRA).
    load: PeftImporter | None = None
    # Whether the converters read and write complete key names (PEFT's prompt-learning kinds keep the prompt as a
    # top-level ``prompt_embeddings`` and the task head under ``base_model.``) instead of keys without
    # the ``base_model.model.`` prefix.
    full_keys: bool = False


@dataclass(frozen=True)
class ParamGroup:
    """Trainable parameters whose names match ``pattern`` learn at ``lr_scale`` times the run's learning rate, or at
    the fixed peak rate ``lr`` when given (for parameters on a scale of their own, such as diff pruning's gate
    logits, whose rate must not follow the weights'), with ``weight_decay`` when given (else the run's; vectors such
    as biases never decay)."""

    pattern: str
    lr_scale: float = 1.0
    weight_decay: float | None = None
    why: str = ""  # shown by ``peftlab methods NAME``
    head: bool = False  # the new task head: learns at the run's head rate when one is set (``--head-lr``)
    lr: float | None = None  # a fixed peak rate, whatever the run's (``lr_scale`` is then unused)


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    apply: Callable[[nn.Module, Any, Sequence[str]], list[str]]
    family: str
    summary: str
    paper: str
    lr: float
    mergeable: bool
    # Whether a freshly attached method leaves the model's outputs unchanged (soft prompts do not).
    identity_at_init: bool = True
    # Factory of the method's training hooks (peftlab.core.hooks.TrainingHooks), or None for plain training.
    hooks: Callable[[Attachment, Any], TrainingHooks] | None = None
    # The adapter as saved, without a training-only reparameterisation: (config, layer tensors), or None.
    fold: Callable[[Attachment], tuple[Any, dict] | None] | None = None
    # The method's conversion to and from the Hugging Face PEFT format, or None when PEFT cannot hold it.
    peft: PeftFormat | None = None
    # Parts that learn at their own rate: param_groups(config) -> [ParamGroup], or None (one rate for all).
    param_groups: Callable[[Any], list[ParamGroup]] | None = None
    # What to expect when the setting is one the method's paper warns about: caution(model, config, total_steps)
    # -> one line said at the start of training (and recorded in results.json), or None.
    caution: Callable[[nn.Module, Any, int], str | None] | None = None


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InputError(f"method: unknown method {name!r}{suggest(name, _REGISTRY)}; known: {known}") from None


def all_methods() -> list[Method]:
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def peft_importer(kind: str) -> Method | None:
    """The method that imports PEFT adapters of ``kind``, or None."""
    return next((m for m in all_methods() if m.peft and m.peft.load and m.peft.kind == kind), None)


def config_fields(config_class: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def config_types(config_class: type) -> dict[str, Any]:
    """Each field's declared type, resolved (the method files use postponed annotations)."""
    return typing.get_type_hints(config_class)


def config_from_dict(config_class: type, values: dict, source: str) -> Any:
    """Build a method config from plain values (a JSON or config file), naming ``source`` in every error."""
    fields = config_fields(config_class)
    for key in values:
        if key not in fields:
            raise InputError(f"{source}: unknown option {key!r}{suggest(key, fields)}")
    types_ = config_types(config_class)
    converted = {k: coerce(v, types_[k], f"{source}: {k}") for k, v in values.items()}
    return config_class(**converted)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def coerce(value: Any, annotation: Any, field: str) -> Any:
    """Convert a value read from text or JSON to the type a config field declares, or raise InputError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{field}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], field)
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(v, args[0], field) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{field}: expected a table of name = value pairs, got {value!r}")
        return {str(k): coerce(v, args[1], f"{field}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise InputError(f"{field}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise InputError(f"{field}: expected a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise InputError(
                f"{field}: expected {'an integer' if annotation is int else 'a number'}, got {value!r}"
            ) from None
        if annotation is int and isinstance(value, float) and value != number:
            raise InputError(f"{field}: expected an integer, got {value!r}")
        if annotation is float and not math.isfinite(number):
            raise InputError(f"{field}: expected a finite number, got {value!r}")
        if annotation is int and not -(2**63) <= number < 2**63:
            raise InputError(f"{field}: expected an integer that fits in 64 bits, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise InputError(f"{field}: expected text, got {value!r}")
        return str(value)
    return value
