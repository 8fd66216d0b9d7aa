"""The Hugging Face PEFT format: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

The config names the kind (``peft_type``), the base (``base_model_name_or_path``), the task and the kind's own
fields; the weights are keyed ``base_model.model.<module>.<tensor>`` for adapter layers and
``base_model.model.<module>.<param>`` for a trained task head (PEFT's ``modules_to_save``).

Each method with a PEFT counterpart converts itself: its registry entry's ``peft`` (``core.registry.PeftFormat``)
names the kind and holds the method's exporter and importer. This module only dispatches -- ``export_hf`` writes a
folder with the exporter of the attachment's method, ``import_hf`` reads one with the importer of its kind -- and
holds what every converter shares: the file names, the key prefix, the task head's tensors and modules, and the
name of the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..fileio import atomic_folder, read_json
from .attach import Attachment, read_tensors
from .hub import hub_id_of_folder
from .registry import all_methods, get_method, peft_importer

PREFIX = "base_model.model."
HF_CONFIG = "adapter_config.json"
NOTES_FILE = "peftlab.json"  # beside a PEFT export: what its config cannot say (the classifier's pooling)
HF_WEIGHTS = "adapter_model.safetensors"


def peft_kind(cfg: dict) -> str:
    kind = str(cfg.get("peft_type"))
    return f"{kind}+DORA" if kind == "LORA" and cfg.get("use_dora") else kind


def convertible() -> list[str]:
    """The methods that can be written in the PEFT format."""
    return [m.name for m in all_methods() if m.peft is not None]


def base_reference(model: nn.Module) -> str | None:
    """What the model was loaded from, as PEFT names a base: its Hub ID (also when it was read from the Hugging
    Face cache), else the folder as given to ``from_pretrained``."""
    name = getattr(model, "name_or_path", None) or None
    if name and Path(name).is_dir():
        return hub_id_of_folder(name) or str(Path(name).resolve())
    return name


def export_hf(
    attachment: Attachment,
    out: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    notes: dict | None = None,
) -> Path:
    """Write ``attachment`` as a Hugging Face PEFT adapter folder (for the methods PEFT also has). The base is named
    as given, else as the model says it was loaded (``base_reference``). ``notes`` (what PEFT's config has no field
    for, such as the classifier's pooling) go beside it in ``peftlab.json``."""
    peft = get_method(attachment.method.name).peft
    if peft is None:
        raise InputError(
            f"method {attachment.method.name!r} cannot be written in the Hugging Face PEFT format "
            f"(convertible: {', '.join(convertible())})"
        )
    if attachment.merged:
        raise InputError("unmerge the adapter before exporting it")
    fields, tensors = peft.export(attachment)
    prefix = "" if peft.full_keys else PREFIX
    hf_config = {
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or base_reference(attachment.model),
        **fields,
        "inference_mode": True,
    }
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_file(
            {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
            str(tmp / HF_WEIGHTS),
            metadata={"format": "pt"},
        )
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if notes:
            (tmp / NOTES_FILE).write_text(json.dumps(notes, indent=2) + "\n", encoding="utf-8")
    return out


def import_hf(model: nn.Module, path: str | Path) -> Attachment:
    """Attach a Hugging Face PEFT adapter folder to ``model`` as the matching peftlab attachment."""
    path = Path(path)
    cfg_path = path / HF_CONFIG
    cfg = read_json(cfg_path, "PEFT adapter config")
    kind = peft_kind(cfg)
    method = peft_importer(kind)
    if method is None:
        known = sorted(m.peft.kind for m in all_methods() if m.peft and m.peft.load)
        raise InputError(f"{cfg_path}: PEFT adapter kind {kind!r} is not supported (supported: {', '.join(known)})")
    weights = path / HF_WEIGHTS
    if not weights.exists() and (path / "adapter_model.bin").exists():
        raise InputError(
            f"{path / 'adapter_model.bin'}: pickle files are never loaded; save the adapter with safetensors"
        )
    tensors = read_tensors(weights)
    if not method.peft.full_keys:
        tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    try:
        return method.peft.load(model, cfg, tensors, weights)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a field of the wrong type, e.g. "r": null
        raise InputError(
            f"{cfg_path}: a field holds a value of the wrong type for a {kind} adapter "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'})"
        ) from None


def head_tensors(attachment: Attachment) -> dict[str, torch.Tensor]:
    """The trained task head's tensors (PEFT's ``modules_to_save``); refuses other trained base parameters."""
    heads = tuple(h + "." for h in attachment.trainable_modules)
    loose = [k for k in attachment.initial if not k.startswith(heads)]
    if loose:
        raise InputError(
            f"parameter {loose[0]!r} trains outside the adapter and the task head; the PEFT format cannot hold it"
        )
    state = attachment.state()
    return {key: state[key] for key in attachment.initial}


def head_modules(
    rest: dict[str, torch.Tensor], modules_to_save: list[str], model: nn.Module, source: Path
) -> list[str]:
    """Full names of the modules whose weights the PEFT file saved in full (its ``modules_to_save``)."""
    modules = dict(model.named_modules())
    heads: list[str] = []
    for key in rest:
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        owner = next(
            (p for p in prefixes if p in modules and any(p == m or p.endswith("." + m) for m in modules_to_save)), None
        )
        if owner is None:
            raise InputError(f"{source}: tensor {key!r} is neither adapter nor inside a module of modules_to_save")
        if owner not in heads:
            heads.append(owner)
    return heads
