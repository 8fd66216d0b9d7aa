"""The adapter folder's format: what ``adapter.json`` holds and how it is checked, the base signature and its
fingerprint, and reading and writing the two files (see ``peftlab.core.attach`` for what the folder means).

The base model is identified by its signature, parameter name -> shape with adapter wrappers looked through, and
that signature's SHA-256 fingerprint; ``base_difference`` explains a mismatch by its first difference, for every
place that compares two bases (loading an adapter, fusing stage-one adapters, composing LoRA modules).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InputError
from ..fileio import atomic_folder, read_folder, read_json
from .adapter import AdapterLayer, adapter_layers

FORMAT = "peftlab-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
HEAD_NAMES = ("classifier", "score", "qa_outputs")


def task_head_names(model: nn.Module) -> list[str]:
    """The task head: top-level modules a Hugging Face task model adds (``classifier``, ``score``, ...)."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def base_signature(model: nn.Module) -> dict[str, list[int]]:
    """Parameter name -> shape of the base model, with adapter wrappers looked through."""
    wrappers = adapter_layers(model)
    own = {f"{w}.{p}" for w, layer in wrappers.items() for p in layer.adapter_parameters()}
    signature = {}
    for name, p in model.named_parameters():
        if name not in own:
            signature[base_name(name, wrappers)] = list(p.shape)
    return signature


def base_name(name: str, wrappers: dict[str, AdapterLayer]) -> str:
    """The name a parameter has in the unadapted model: every ``base`` step into a wrapper is dropped, so
    ``x.query.base.weight`` -> ``x.query.weight`` and, with nested wrappers, ``x.self.base.query.base.weight`` ->
    ``x.self.query.weight``."""
    kept: list[str] = []
    path = ""
    for part in name.split("."):
        if part == "base" and path in wrappers:
            path = f"{path}.base" if path else "base"
            continue
        kept.append(part)
        path = f"{path}.{part}" if path else part
    return ".".join(kept)


def fingerprint(signature: dict[str, list[int]]) -> str:
    text = json.dumps(sorted(signature.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_adapter_meta(path: str | Path) -> tuple[Path, dict]:
    """The adapter folder (or its previous version after an interrupted save) and its checked metadata."""
    path = Path(path)
    folder = read_folder(path)
    if folder is None:
        raise InputError(f"{path}: adapter folder not found")
    meta = read_json(folder / CONFIG_FILE, "adapter config")
    source = folder / CONFIG_FILE
    if meta.get("format") != FORMAT:
        if (folder / "adapter_config.json").exists():
            raise InputError(f"{folder}: this is a Hugging Face PEFT adapter; load it with peftlab.import_hf")
        raise InputError(f"{source}: not a peftlab adapter (format {meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"{source}: format_version must be a positive integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"{source}: format_version {version!r} is newer than this peftlab reads (up to {FORMAT_VERSION}); "
            "upgrade peftlab"
        )
    for key, kind, what in META_FIELDS:
        if key not in meta:
            raise InputError(f"{source}: missing field {key!r}")
        value = meta[key]
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise InputError(f"{source}: field {key!r} must be {what}, found {value!r:.60}")
    parameters = meta["base"].get("parameters", {})
    if not isinstance(parameters, dict) or not all(_is_shape(v) for v in parameters.values()):
        raise InputError(f"{source}: field 'base.parameters' must map parameter names to shapes (lists of integers)")
    if not isinstance(meta["base"].get("fingerprint", ""), str):
        raise InputError(f"{source}: field 'base.fingerprint' must be text")
    return folder, meta


def _is_shape(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)


# The adapter metadata's required fields: name, JSON type, and what the error says is expected.
META_FIELDS = (
    ("method", str, "a method name"),
    ("config", dict, "an object of the method's options"),
    ("targets", list, "a list of module names"),
    ("trainable_modules", list, "a list of module names"),
    ("base", dict, "an object describing the base model"),
)


def base_difference(
    here: dict[str, list[int]],
    theirs: dict[str, list[int]],
    names: tuple[str, str] = ("this model", "the adapter's base"),
    places: tuple[str, str] = ("in this model", "in the adapter's base"),
) -> str | None:
    """What differs between two base signatures, as one phrase naming the first difference (a shape, a missing or
    an extra parameter), or None when they agree. ``names`` and ``places`` say how the message calls the two sides
    ("this model" / "the adapter's base", "in this model" / "in the adapter's base")."""
    if fingerprint(here) == fingerprint(theirs):
        return None
    shape = [k for k in here if k in theirs and list(here[k]) != list(theirs[k])]
    missing = [k for k in theirs if k not in here]
    extra = [k for k in here if k not in theirs]
    if shape:
        k = shape[0]
        return f"parameter {k!r} is {tuple(here[k])} {places[0]} but {tuple(theirs[k])} {places[1]}"
    if missing:
        return f"{names[0]} has no parameter {missing[0]!r}"
    return f"{names[0]} has parameter {extra[0]!r}, which {names[1]} lacks"


def check_base(model: nn.Module, meta: dict, source: Path) -> None:
    """Refuse a base whose parameter names and shapes differ from the adapter's, saying what differs."""
    here = base_signature(model)
    theirs = {k: list(v) for k, v in meta["base"].get("parameters", {}).items()}
    if fingerprint(here) == meta["base"].get("fingerprint"):
        return
    detail = base_difference(here, theirs) or "the recorded fingerprint does not match the recorded parameters"
    raise InputError(
        f"{source}: adapter was trained on a different base model: {detail} "
        f"({len(here)} parameters here, {len(theirs)} in the adapter's base)"
    )


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never a pickle), turning a truncated or corrupt file into a one-line error."""
    if not path.exists():
        raise InputError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def write_adapter_folder(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter.json`` and ``adapter.safetensors`` into ``path``, atomically: a reader sees the old folder or
    the complete new one."""
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path
