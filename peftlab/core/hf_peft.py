"""Conversion between peftlab LoRA adapters and the Hugging Face PEFT format.

The PEFT format is a folder with ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``target_modules``, ``modules_to_save``, ...) and ``adapter_model.safetensors`` whose keys read
``base_model.model.<module>.lora_A.weight`` (shape (r, in)), ``...lora_B.weight`` (shape (out, r)) and
``base_model.model.<module>.<param>`` for a trained task head. Per-module ranks and alphas live in
``rank_pattern`` / ``alpha_pattern``, whose keys PEFT matches as regular expressions against the end of the
module name, first match winning.

Both directions keep the numbers exact: the same tensors, the same scaling (alpha / r, or alpha / sqrt(r) with
``use_rslora``), so outputs agree to float rounding.

PiSSA / MiLoRA adapters (whose layers subtract a frozen initial product ``B0 A0``) are written as a plain LoRA of
rank 2r, ``[B, -B0] [A; A0]``, with alpha doubled (times sqrt(2) with rsLoRA) so the scaling is unchanged -- the
form PEFT itself writes when it converts a PiSSA adapter -- so it loads onto the unmodified pretrained base. A PEFT
adapter saved with ``init_lora_weights="pissa"`` (unconverted) expects PEFT to redo the SVD of the base when it
loads; the importer does the same. Other initialisations that change the base (OLoRA, CorDA, LoftQ, LoRA-GA,
randomised PiSSA) are refused by name.

Other methods with a PEFT counterpart add their converters to ``EXPORTERS`` (by peftlab method name) and
``IMPORTERS`` (by PEFT kind: the ``peft_type``, or ``"LORA+DORA"`` for a LoRA config with ``use_dora``) from
their own module; ``export_hf`` and ``import_hf`` dispatch on them. ``export_lora`` and ``import_lora`` are the
LoRA converters, for LoRA variants to build on. Their tensors are keyed without the ``base_model.model.`` prefix,
except for the kinds in ``FULL_KEY_KINDS``, whose converters read and write complete key names (PEFT's
prompt-learning kinds keep the prompt as a top-level ``prompt_embeddings`` and the task head under ``base_model.``).

This module imports ``attach`` as a module (not its names) so that a method module, imported while ``attach`` itself
is still loading (``attach`` imports the method registry), can import this one to register its converters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import InputError
from ..fileio import atomic_folder, read_json

# The module, not its names: a method's own file registers its converters here while attach.py is still loading
# (attach imports the methods package, which imports every method file).
from . import attach as attaching
from .hub import hub_id_of_folder
from .registry import get_method

if TYPE_CHECKING:
    from ..methods.lora import LoraConfig
    from .attach import Attachment

PREFIX = "base_model.model."
HF_CONFIG = "adapter_config.json"
HF_WEIGHTS = "adapter_model.safetensors"

# PEFT LoRA options peftlab's LoRA does not implement; an adapter that turns one on is refused by name.
UNSUPPORTED = {
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "lora_bias",
    "layers_to_transform": "layers_to_transform",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA",
}


# exporter(attachment) -> (PEFT config fields, tensors keyed without the "base_model.model." prefix)
Exporter = Callable[["Attachment"], tuple[dict, dict[str, torch.Tensor]]]
# importer(model, PEFT config, tensors without the prefix, source file) -> Attachment
Importer = Callable[[nn.Module, dict, dict[str, torch.Tensor], Path], "Attachment"]
EXPORTERS: dict[str, Exporter] = {}
IMPORTERS: dict[str, Importer] = {}
# PEFT kinds whose converters handle complete key names themselves (no "base_model.model." added or removed).
FULL_KEY_KINDS: set[str] = set()


def peft_kind(cfg: dict) -> str:
    kind = str(cfg.get("peft_type"))
    return f"{kind}+DORA" if kind == "LORA" and cfg.get("use_dora") else kind


def base_reference(model: nn.Module) -> str | None:
    """What the model was loaded from, as PEFT names a base: its Hub ID (also when it was read from the Hugging
    Face cache), else the folder as given to ``from_pretrained``."""
    name = getattr(model, "name_or_path", None) or None
    if name and Path(name).is_dir():
        return hub_id_of_folder(name) or str(Path(name).resolve())
    return name


def export_hf(
    attachment: Attachment, out: str | Path, base_model_name_or_path: str | None = None, task_type: str | None = None
) -> Path:
    """Write ``attachment`` as a Hugging Face PEFT adapter folder (for the methods PEFT also has). The base is named
    as given, else as the model says it was loaded (``base_reference``)."""
    exporter = EXPORTERS.get(attachment.method.name)
    if exporter is None:
        raise InputError(
            f"method {attachment.method.name!r} cannot be written in the Hugging Face PEFT format "
            f"(convertible: {', '.join(sorted(EXPORTERS))})"
        )
    if attachment.merged:
        raise InputError("unmerge the adapter before exporting it")
    fields, tensors = exporter(attachment)
    prefix = "" if fields.get("peft_type") in FULL_KEY_KINDS else PREFIX
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
    return out


def import_hf(model: nn.Module, path: str | Path) -> Attachment:
    """Attach a Hugging Face PEFT adapter folder to ``model`` as the matching peftlab attachment."""
    path = Path(path)
    cfg_path = path / HF_CONFIG
    cfg = read_json(cfg_path, "PEFT adapter config")
    kind = peft_kind(cfg)
    importer = IMPORTERS.get(kind)
    if importer is None:
        raise InputError(
            f"{cfg_path}: PEFT adapter kind {kind!r} is not supported (supported: {', '.join(sorted(IMPORTERS))})"
        )
    weights = path / HF_WEIGHTS
    if not weights.exists() and (path / "adapter_model.bin").exists():
        raise InputError(
            f"{path / 'adapter_model.bin'}: pickle files are never loaded; save the adapter with safetensors"
        )
    tensors = attaching.read_tensors(weights)
    if kind not in FULL_KEY_KINDS:
        tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    try:
        return importer(model, cfg, tensors, weights)
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


def export_lora(attachment: Attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    """A LoRA attachment (or a LoRA variant's: its config is a ``LoraConfig``) as PEFT LoRA fields and tensors."""
    config: LoraConfig = attachment.config
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    layers = attachment.layers()
    # PiSSA / MiLoRA become a rank-2r LoRA [B, -B0] [A; A0]; alpha grows so that the scaling stays the same.
    initial_product = config.init in ("pissa", "milora")
    rank_factor = 2 if initial_product else 1
    alpha_factor = (math.sqrt(2) if config.rslora else 2.0) if initial_product else 1.0
    for name, layer in layers.items():
        r, alpha = config.rank_and_alpha(name)
        A, B = layer.lora_A, layer.lora_B  # (r, in), (out, r)
        if initial_product:
            A = torch.cat([A, layer.lora_A0], dim=0)  # (2r, in)
            B = torch.cat([B, -layer.lora_B0], dim=1)  # (out, 2r)
        tensors[f"{name}.lora_A.weight"] = A
        tensors[f"{name}.lora_B.weight"] = B
        if r != config.r:
            rank_pattern[re.escape(name)] = r * rank_factor
        if alpha != config.alpha:
            alpha_pattern[re.escape(name)] = alpha * alpha_factor
    tensors.update(head_tensors(attachment))
    fields = {
        "peft_type": "LORA",
        "r": config.r * rank_factor,
        "lora_alpha": config.alpha * alpha_factor,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": list(layers),
        "modules_to_save": attachment.trainable_modules or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return fields, tensors


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: the first key whose regex matches the name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def split_lora_tensors(
    tensors: dict[str, torch.Tensor], source: Path, model: nn.Module, extra: tuple[str, ...] = ()
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Group ``<module>.lora_<X>[.<adapter>].weight`` tensors by module (X in A, B and ``extra``); the rest are
    the task head's."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    names = "|".join(("A", "B", *extra))
    for key, value in tensors.items():
        m = re.fullmatch(rf"(.+)\.lora_({names})(?:\.[^.]+)?(?:\.weight)?", key)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = value
        elif "lora_" in key:  # a LoRA variant (embedding LoRA, ...) this importer does not handle
            raise InputError(f"{source}: tensor {key!r} belongs to a LoRA variant peftlab does not import")
        else:
            rest[key] = value
    if not lora:
        raise InputError(f"{source}: no lora_A / lora_B tensors found")
    modules = dict(model.named_modules())
    for name in lora:
        if name not in modules:
            raise InputError(f"{source}: the model has no module {name!r} (is this the adapter's base model?)")
    return lora, rest


# PEFT initialisations that leave the base weights as they were: the saved A and B are all there is to load.
PLAIN_INITS = {
    True: "kaiming",
    False: "kaiming",
    "gaussian": "gaussian",
    "eva": "kaiming",
    "orthogonal": "kaiming",
    "mica": "kaiming",
}


def lora_init(cfg: dict, source: Path) -> str:
    """peftlab's ``init`` for a PEFT ``init_lora_weights``: "pissa" (the base is changed by an exact SVD, which
    peftlab redoes), a plain init, or an InputError for an init that changes the base in a way peftlab cannot redo."""
    value = cfg.get("init_lora_weights", True)
    if value == "pissa":
        return "pissa"
    if isinstance(value, (bool, str)) and value in PLAIN_INITS:
        return PLAIN_INITS[value]
    raise InputError(
        f"{source}: init_lora_weights {value!r} changes the base weights when PEFT loads the adapter, which "
        "peftlab cannot redo; convert it to a plain LoRA first "
        "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
    )


def import_lora(
    model: nn.Module,
    cfg: dict,
    tensors: dict[str, torch.Tensor],
    weights: Path,
    method: str = "lora",
    extra: dict[str, str] | None = None,
) -> Attachment:
    """Attach a PEFT LoRA adapter as ``method`` (LoRA or a variant whose config is a ``LoraConfig``).

    ``extra`` maps further per-module PEFT tensors ``<module>.lora_<X>`` to the variant's own parameter names (DoRA:
    ``{"magnitude_vector": "magnitude"}``).
    """
    extra = extra or {}
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise InputError(f"{weights.parent / HF_CONFIG}: {key} is set; peftlab's LoRA does not implement {what}")
    init = lora_init(cfg, weights.parent / HF_CONFIG)
    lora, rest = split_lora_tensors(tensors, weights, model, extra=tuple(extra))
    for name, group in lora.items():
        lacking = sorted({"A", "B", *extra} - set(group))
        if lacking:
            raise InputError(f"{weights}: module {name!r} has no lora_{lacking[0]} tensor")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = {}, {}
    for name, pair in lora.items():
        r_i = int(pair["A"].shape[0])
        a_i = float(pattern_value(cfg.get("alpha_pattern") or {}, name, alpha))
        if r_i != r:
            rank_pattern[name] = r_i
        if a_i != alpha:
            alpha_pattern[name] = a_i
    heads = head_modules(rest, cfg.get("modules_to_save") or [], model, weights)
    config = get_method(method).config(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
        init=init,
        targets=list(lora),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    attachment = attaching.attach(model, method, config, trainable_modules=heads)
    # PiSSA's frozen initial factors come from the SVD of this base, as PEFT recomputes them on loading.
    ours = {k: v for k, v in attachment.state().items() if k.endswith((".lora_A0", ".lora_B0"))}
    for name, group in lora.items():
        ours[f"{name}.lora_A"], ours[f"{name}.lora_B"] = group["A"], group["B"]
        for theirs, own in extra.items():
            ours[f"{name}.{own}"] = group[theirs]
    attaching.load_state(attachment, ours | rest, weights)
    return attachment


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


EXPORTERS["lora"] = export_lora
IMPORTERS["LORA"] = import_lora
