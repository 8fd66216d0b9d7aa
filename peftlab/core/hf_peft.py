"""Conversion between peftlab LoRA adapters and the Hugging Face PEFT format.

The PEFT format is a folder with ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``target_modules``, ``modules_to_save``, ...) and ``adapter_model.safetensors`` whose keys read
``base_model.model.<module>.lora_A.weight`` (shape (r, in)), ``...lora_B.weight`` (shape (out, r)) and
``base_model.model.<module>.<param>`` for a trained task head. Per-module ranks and alphas live in
``rank_pattern`` / ``alpha_pattern``, whose keys PEFT matches as regular expressions against the end of the
module name, first match winning.

Both directions keep the numbers exact: the same tensors, the same scaling (alpha / r, or alpha / sqrt(r) with
``use_rslora``), so outputs agree to float rounding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..fileio import atomic_folder, read_json
from ..methods.lora import LoraConfig
from .attach import Attachment, attach, load_state, read_tensors

PREFIX = "base_model.model."
HF_CONFIG = "adapter_config.json"
HF_WEIGHTS = "adapter_model.safetensors"

# PEFT LoRA options peftlab's LoRA does not implement; an adapter that turns one on is refused by name.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "lora_bias",
    "layers_to_transform": "layers_to_transform",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA",
}


def export_hf(
    attachment: Attachment, out: str | Path, base_model_name_or_path: str | None = None, task_type: str | None = None
) -> Path:
    """Write ``attachment`` (a LoRA adapter) as a Hugging Face PEFT adapter folder."""
    if attachment.method.name != "lora":
        raise InputError(f"method {attachment.method.name!r} cannot be written in the Hugging Face PEFT LoRA format")
    if attachment.merged:
        raise InputError("unmerge the adapter before exporting it")
    config: LoraConfig = attachment.config
    state = attachment.state()
    heads = tuple(h + "." for h in attachment.trainable_modules)
    layers = attachment.layers()
    loose = [k for k in attachment.initial if not k.startswith(heads)]
    if loose:
        raise InputError(
            f"parameter {loose[0]!r} trains outside LoRA and the task head; PEFT's LoRA format cannot hold it"
        )
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in layers.items():
        r, alpha = config.rank_and_alpha(name)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if r != config.r:
            rank_pattern[re.escape(name)] = r
        if alpha != config.alpha:
            alpha_pattern[re.escape(name)] = alpha
    for key in attachment.initial:
        tensors[PREFIX + key] = state[key]
    hf_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": list(layers),
        "modules_to_save": attachment.trainable_modules or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_file(
            {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},
            str(tmp / HF_WEIGHTS),
            metadata={"format": "pt"},
        )
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return out


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():  # PEFT's rule: first key whose regex matches the end of the name
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def import_hf(model: nn.Module, path: str | Path) -> Attachment:
    """Attach a Hugging Face PEFT LoRA adapter folder to ``model`` as a peftlab LoRA attachment."""
    path = Path(path)
    cfg_path = path / HF_CONFIG
    cfg = read_json(cfg_path, "PEFT adapter config")
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (expected 'LORA')")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(f"{cfg_path}: {key} is set; peftlab's LoRA does not implement {what}")
    weights = path / HF_WEIGHTS
    if not weights.exists() and (path / "adapter_model.bin").exists():
        raise InputError(
            f"{path / 'adapter_model.bin'}: pickle files are never loaded; save the adapter with safetensors"
        )
    tensors = {k.removeprefix(PREFIX): v for k, v in read_tensors(weights).items()}
    lora, rest = {}, {}
    for key, value in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = value
        elif "lora_" in key:  # a LoRA variant (embedding LoRA, DoRA magnitude) this importer does not handle
            raise InputError(f"{weights}: tensor {key!r} belongs to a LoRA variant peftlab does not import")
        else:
            rest[key] = value
    if not lora:
        raise InputError(f"{weights}: no lora_A / lora_B tensors found")
    modules = dict(model.named_modules())
    for name, pair in lora.items():
        if name not in modules:
            raise InputError(f"{weights}: the model has no module {name!r} (is this the adapter's base model?)")
        if set(pair) != {"A", "B"}:
            raise InputError(f"{weights}: module {name!r} has lora_{next(iter(pair))} without its partner")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = {}, {}
    for name, pair in lora.items():
        r_i = int(pair["A"].shape[0])
        a_i = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, alpha))
        if r_i != r:
            rank_pattern[name] = r_i
        if a_i != alpha:
            alpha_pattern[name] = a_i
    heads = _head_modules(rest, cfg.get("modules_to_save") or [], modules, weights)
    config = LoraConfig(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
        targets=list(lora),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    attachment = attach(model, "lora", config, trainable_modules=heads)
    ours = {}
    for name, pair in lora.items():
        ours[f"{name}.lora_A"], ours[f"{name}.lora_B"] = pair["A"], pair["B"]
    load_state(attachment, ours | rest, weights)
    return attachment


def _head_modules(rest: dict[str, torch.Tensor], modules_to_save: list[str], modules: dict, source: Path) -> list[str]:
    """Full names of the modules whose weights the PEFT file saved in full (its ``modules_to_save``)."""
    heads: list[str] = []
    for key in rest:
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        owner = next(
            (p for p in prefixes if p in modules and any(p == m or p.endswith("." + m) for m in modules_to_save)), None
        )
        if owner is None:
            raise InputError(f"{source}: tensor {key!r} is neither LoRA nor inside a module of modules_to_save")
        if owner not in heads:
            heads.append(owner)
    return heads
