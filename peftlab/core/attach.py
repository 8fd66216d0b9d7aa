"""Attaching a method to any ``nn.Module``, and saving or loading the result as a small adapter folder.

``attach(model, "lora", r=8)`` freezes the model, lets the method wrap its target layers, unfreezes the task
head, and returns an ``Attachment``: a handle that knows the method, its config, the adapted modules and the base
model's fingerprint, and offers ``merge()``, ``unmerge()``, ``unload()`` and ``save()``. The model stays an
ordinary model of its own class (a Hugging Face model keeps working as one); nothing is subclassed.

An adapter folder holds two files:

- ``adapter.safetensors`` -- the method's parameters and buffers and the trained task head, keyed by base module
  names; a base parameter that trains under a mask (FishMask, Child-Tuning_D) is stored sparse, as
  ``<name>::indices`` (flat positions) and ``<name>::values`` (its values there), and so is an adapter parameter
  its layer declares sparse (``AdapterLayer.sparse_parameters``: diff pruning's diff), over its non-zero entries,
  wherever that is smaller than the dense tensor;
- ``adapter.json`` -- format and version, method and config, adapted modules, task-head modules, and the base
  model's signature (parameter names and shapes) with its SHA-256 fingerprint, so loading onto a different base
  fails with a message that says what differs.

A method that trains through a reparameterisation (``Method.fold``: prefix tuning's MLP, P-tuning's prompt
encoder) is saved *folded*: the file holds what the reparameterisation computes and the config of the adapter
without it (the training config is kept under ``trained_as``), so a loaded adapter has no MLP or encoder.
``Attachment.fold()`` turns a trained attachment into that form in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, PeftlabError
from ..version import __version__
from .adapter import AdapterLayer, adapter_layers, replace_module
from .adapter_file import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    base_name,
    base_signature,
    check_base,
    fingerprint,
    read_adapter_meta,
    read_tensors,
    task_head_names,
    write_adapter_folder,
)
from .pooling import use_saved_pooling
from .precision import keep_trainable_fp32
from .registry import Method, ParamGroup, config_from_dict, config_to_dict, get_method
from .targets import matches


@dataclass
class Attachment:
    """A method attached to a model: the handle for training, accounting, merging and saving."""

    model: nn.Module
    method: Method
    config: Any
    targets: list[str]
    trainable_modules: list[str]
    signature: dict[str, list[int]]
    # Trainable base parameters as they were at attach time (pretrained values; the head's fresh init). Changed
    # parameters are counted against these, and regularisers toward the pretrained weights start from them.
    initial: dict[str, torch.Tensor] = field(repr=False)
    merged: bool = False
    # Static masks over trainable base parameters (by base name): only True entries train and are saved.
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signature)

    def layers(self) -> dict[str, AdapterLayer]:
        return adapter_layers(self.model)

    def state(self) -> dict[str, torch.Tensor]:
        """Everything the adapter stands for, dense, keyed by base module names: the method's own parameters and
        buffers, then the base parameters that train (the task head; all of them for full fine-tuning)."""
        state = self.layer_state()
        return state | self.base_state({id(p) for p in state.values()})

    def layer_state(self) -> dict[str, torch.Tensor]:
        """The adapter layers' own parameters and buffers, keyed ``<module>.<name>``."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.layers().items():
            for pname, p in layer.adapter_parameters().items():
                state[f"{name}.{pname}"] = p
            for bname, b in layer.adapter_buffers().items():
                state[f"{name}.{bname}"] = b
        return state

    def base_state(self, own: set[int]) -> dict[str, torch.Tensor]:
        """The base parameters that train (not among the ids in ``own``), keyed by base names."""
        layers = self.layers()
        return {
            base_name(name, layers): p
            for name, p in self.model.named_parameters()
            if p.requires_grad and id(p) not in own
        }

    def saved_form(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """The config and state the adapter file holds: ``(config, state())``, or for a method with ``fold`` the
        config and state of the equivalent adapter without its training-only reparameterisation."""
        folded = self._folded()
        return (self.config, self.state()) if folded is None else folded

    def _folded(self) -> tuple[Any, dict[str, torch.Tensor]] | None:
        folded = self.method.fold(self) if self.method.fold else None
        if folded is None:
            return None
        config, layer_tensors = folded
        own = {id(p) for p in self.layer_state().values()}
        return config, dict(layer_tensors) | self.base_state(own)

    @torch.no_grad()
    def fold(self) -> bool:
        """Turn the adapter into the form its file holds, in place (the reparameterisation is computed once and
        dropped); returns False when the method has nothing to fold. Afterwards ``state()`` matches a saved file."""
        folded = self._folded()
        if folded is None:
            return False
        config, tensors = folded
        for name, layer in innermost_first(self.layers()):
            layer.on_unload()
            replace_module(self.model, name, layer.base)
        targets = self.method.apply(self.model, config, self.trainable_modules)
        if list(targets) != self.targets:
            raise PeftlabError(f"folding {self.method.name!r} changed the adapted modules")
        self.config = config
        load_state(self, {k: v.detach().clone() for k, v in tensors.items()}, Path(f"folded {self.method.name}"))
        return True

    def saved_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``state`` (default: ``state()``) as written to disk: masked base parameters become sparse
        ``::indices`` / ``::values``, and so do the layers' sparse parameters where that takes fewer bytes."""
        out = {}
        sparse = self.sparse_keys()
        for key, value in (self.state() if state is None else state).items():
            value = full_tensor(value.detach()).to("cpu")
            if key in self.masks:
                out |= _sparse(key, value, self.masks[key].reshape(-1).to("cpu"))
            elif key in sparse and _sparse_is_smaller(value):
                out |= _sparse(key, value, value.reshape(-1) != 0)
            else:
                out[key] = value.contiguous().clone()
        return out

    def sparse_keys(self) -> set[str]:
        """State keys of the adapter parameters their layers save sparse (``AdapterLayer.sparse_parameters``)."""
        return {f"{name}.{p}" for name, layer in self.layers().items() for p in layer.sparse_parameters()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[tuple[ParamGroup, list[nn.Parameter]]]:
        """The trainable parameters by group: the task head first (``trainable_modules``; not where the head is all
        that trains, as in a linear probe, which learns at the run's rate), then the method's ``param_groups``
        (first matching pattern wins), the rest in a last group at the base rate; groups that match nothing are
        left out."""
        heads = [ParamGroup(f"{m}.*", why="the task head, new and randomly initialised", head=True)
                 for m in self.trainable_modules]  # fmt: skip
        trained = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if all(any(matches(h.pattern, name) for h in heads) for name, _ in trained):
            heads = []
        groups = heads + (self.method.param_groups(self.config) if self.method.param_groups else [])
        members: list[list[nn.Parameter]] = [[] for _ in groups]
        rest: list[nn.Parameter] = []
        for name, p in trained:
            index = next((i for i, g in enumerate(groups) if matches(g.pattern, name)), None)
            (rest if index is None else members[index]).append(p)
        out = [(g, params) for g, params in zip(groups, members, strict=True) if params]
        return out + ([(ParamGroup("*"), rest)] if rest else [])

    def trainable_count(self) -> int:
        """Entries the optimiser may change: a masked parameter counts only its True entries, an adapter parameter
        what its layer says (``AdapterLayer.trainable_entries``)."""
        masked = {id(p): int(self.masks[k].sum()) for k, p in self.state().items() if k in self.masks}
        for layer in self.layers().values():
            own = layer.adapter_parameters()
            masked |= {id(own[name]): n for name, n in layer.trainable_entries().items()}
        return sum(masked.get(id(p), p.numel()) for p in self.trainable_parameters())

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients outside the static masks (after the backward pass)."""
        if not self.masks:
            return
        state = self.state()
        for key in list(self.masks):
            if state[key].grad is not None:
                state[key].grad.mul_(self._on_device(self.masks, key, state[key].device))

    @torch.no_grad()
    def restore_masked(self) -> None:
        """Put masked-out entries back to their pretrained values (after the optimiser step; this undoes AdamW's
        decoupled weight decay there, so exactly the masked entries ever change)."""
        if not self.masks:
            return
        state = self.state()
        for key in list(self.masks):
            device = state[key].device
            mask, start = self._on_device(self.masks, key, device), self._on_device(self.initial, key, device)
            state[key].copy_(torch.where(mask, state[key], start))

    @staticmethod
    def _on_device(tensors: dict[str, torch.Tensor], key: str, device: torch.device) -> torch.Tensor:
        """``tensors[key]`` on ``device``, moved there once (the model may have moved to a GPU after attaching)."""
        if tensors[key].device != device:
            tensors[key] = tensors[key].to(device)
        return tensors[key]

    def merge(self) -> None:
        """Fold every adapter into its base weights (explicit; training or eval mode never merges)."""
        if self.merged:
            raise PeftlabError("the adapter is already merged")
        if not self.method.mergeable:
            raise InputError(f"method {self.method.name!r} has no weight form and cannot be merged")
        for layer in self.layers().values():
            layer.merge()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise PeftlabError("the adapter is not merged")
        for layer in self.layers().values():
            layer.unmerge()
        self.merged = False

    def unload(self) -> nn.Module:
        """Replace every wrapper by its base layer and return the plain model.

        After ``merge()`` the result is the fine-tuned model with no extra latency, loadable by plain
        ``transformers`` once saved; without it, the adapters are simply dropped (the trained head stays).
        """
        for name, layer in innermost_first(self.layers()):
            if name == "":
                raise PeftlabError("cannot unload an adapter wrapped around the whole model")
            layer.on_unload()
            replace_module(self.model, name, layer.base)
        return self.model

    def save(self, path: str | Path, extra: dict | None = None, write: bool = True) -> Path:
        """Write the adapter folder (atomically: a reader sees the old folder or the complete new one), folded
        where the method folds (see ``saved_form``).

        Under sharded data parallelism every process calls this (gathering the full tensors is collective) and only
        the one with ``write=True`` writes, so the saved adapter is always complete."""
        config, state = self.saved_form()
        tensors = self.saved_tensors(state)
        if not write:
            return Path(path)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "peftlab_version": __version__,
            "method": self.method.name,
            "config": config_to_dict(config),
            "targets": self.targets,
            "trainable_modules": self.trainable_modules,
            "base": {"fingerprint": self.fingerprint, "parameters": self.signature},
            **({"trained_as": config_to_dict(self.config)} if config is not self.config else {}),
            **(extra or {}),
        }
        return write_adapter_folder(Path(path), meta, tensors)


def _sparse(key: str, value: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """``value``'s entries where the flat boolean ``keep`` is True, as ``<key>::indices`` and ``<key>::values``."""
    indices = torch.nonzero(keep).reshape(-1)
    # int32 positions where they fit: half the bytes of the index half of a sparse tensor
    return {
        f"{key}::indices": indices.to(torch.int32) if value.numel() < 2**31 else indices,
        f"{key}::values": value.reshape(-1)[indices].clone(),
    }


def _sparse_is_smaller(value: torch.Tensor) -> bool:
    """Whether ``value``'s non-zero entries as indices and values take fewer bytes than the dense tensor."""
    index_bytes = 4 if value.numel() < 2**31 else 8
    nonzero = int(torch.count_nonzero(value))
    return nonzero * (index_bytes + value.element_size()) < value.numel() * value.element_size()


def innermost_first(layers: dict[str, AdapterLayer]) -> list[tuple[str, AdapterLayer]]:
    """Adapter layers in reverse model order, so a wrapper inside another (a hybrid's LoRA on a query projection
    inside its prefix-attention wrapper, ``x.self.base.query``) is replaced by its base before the outer one is."""
    return list(reversed(layers.items()))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor (FSDP) is gathered from every process (collective), others pass."""
    return t.full_tensor() if hasattr(type(t), "full_tensor") else t


def shard_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor read from a file) laid out like ``target``: sharded again if ``target`` is."""
    if hasattr(type(target), "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
    return value.to(target.dtype)


def attach(
    model: nn.Module,
    method: str | Method = "lora",
    config: Any = None,
    *,
    trainable_modules: Sequence[str] | str = "auto",
    fp32_trainable: bool = False,
    **options: Any,
) -> Attachment:
    """Attach ``method`` to ``model`` in place and return the handle.

    ``config`` is the method's config dataclass (built from ``options`` when omitted; ``options`` also override
    fields of a given config). ``trainable_modules`` are modules that train in full beside the method and are
    saved with it; ``"auto"`` picks the task head of a Hugging Face task model (``classifier``, ``score``).
    ``fp32_trainable`` keeps what trains in fp32 on a base stored in half precision (``core.precision``).
    """
    method = get_method(method) if isinstance(method, str) else method
    if config is None:
        config = config_from_dict(method.config, options, source=f"{method.name} options")
    elif options:
        config = dataclasses.replace(config, **options)
    if adapter_layers(model):
        raise InputError("the model already carries a peftlab adapter; unload it before attaching another")
    heads = task_head_names(model) if trainable_modules == "auto" else list(trainable_modules)
    modules = dict(model.named_modules())
    for head in heads:
        if head not in modules:
            raise InputError(f"trainable_modules: the model has no module {head!r}")
    signature = base_signature(model)
    model.requires_grad_(False)
    targets = method.apply(model, config, heads)
    for head in heads:
        model.get_submodule(head).requires_grad_(True)
    if fp32_trainable:
        keep_trainable_fp32(model)
    attachment = Attachment(model, method, config, list(targets), heads, signature, initial={})
    layers = attachment.layers()
    own = {id(p) for layer in layers.values() for p in layer.adapter_parameters().values()}
    attachment.initial = {
        base_name(n, layers): p.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and id(p) not in own
    }
    return attachment


def load_state(attachment: Attachment, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved tensors into the attachment, checking names and shapes first.

    Sparse entries (``<name>::indices`` / ``<name>::values``) are written into the parameter at those positions
    and set its mask; an adapter parameter its layer saves sparse is zero elsewhere instead, and gets no mask (it
    is the layer's own, and trains as its layer says). An adapter buffer saved with another shape is replaced by
    one of that shape when its layer accepts it (``accepts_buffer_shape``: buffers that grow in training). Every
    adapter layer's ``on_loaded`` runs afterwards.
    """
    state = attachment.state()
    sparse = {k[: -len("::indices")] for k in tensors if k.endswith("::indices")}
    present = {k for k in tensors if "::" not in k} | sparse
    missing = [k for k in state if k not in present]
    unexpected = [k for k in present if k not in state]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise InputError(
            f"{source}: tensors do not fit the adapter ({what}; {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    grown = _grown_buffers(attachment, tensors)
    for k, p in state.items():
        if k in sparse:
            indices, values = tensors[f"{k}::indices"], tensors.get(f"{k}::values")
            if (
                values is None
                or values.shape != indices.shape
                or indices.dtype not in (torch.int32, torch.int64)
                or (len(indices) and (int(indices.max()) >= p.numel() or int(indices.min()) < 0))
            ):
                raise InputError(f"{source}: sparse tensor {k!r} has inconsistent indices and values")
        elif tuple(tensors[k].shape) != tuple(p.shape) and k not in grown:
            raise InputError(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}")
        saved = tensors[f"{k}::values"] if k in sparse else tensors[k]
        _check_values(saved, p, k, source)
    for key, (layer, bname) in grown.items():
        setattr(layer, bname, getattr(layer, bname).new_zeros(tensors[key].shape))
    if grown:
        state = attachment.state()
    own_sparse = attachment.sparse_keys()
    with torch.no_grad():
        for k, p in state.items():
            if k in sparse:
                indices = tensors[f"{k}::indices"].to(p.device, torch.int64)
                if k in own_sparse:
                    p.zero_()
                else:
                    mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                    mask[indices] = True
                    attachment.masks[k] = mask.reshape(p.shape)
                p.reshape(-1)[indices] = tensors[f"{k}::values"].to(p.device, p.dtype)
            else:
                p.copy_(shard_like(tensors[k], p))
    for layer in attachment.layers().values():
        layer.on_loaded()


def _check_values(saved: torch.Tensor, target: torch.Tensor, name: str, source: Path) -> None:
    """A saved tensor must be of the target's kind (real floating point for float weights) and finite."""
    if target.is_floating_point() and (not saved.is_floating_point() or saved.is_complex()):
        raise InputError(f"{source}: tensor {name!r} is {saved.dtype}, expected floating-point values")
    if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
        raise InputError(f"{source}: tensor {name!r} holds NaN or infinite values")


def _grown_buffers(attachment: Attachment, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[AdapterLayer, str]]:
    """Adapter buffers saved with another shape that their layer accepts (buffers that grow during training)."""
    grown = {}
    for name, layer in attachment.layers().items():
        for bname, buffer in layer.adapter_buffers().items():
            saved = tensors.get(f"{name}.{bname}")
            if saved is not None and saved.shape != buffer.shape and layer.accepts_buffer_shape(bname, saved.shape):
                grown[f"{name}.{bname}"] = (layer, bname)
    return grown


def load_adapter(model: nn.Module, path: str | Path, fp32_trainable: bool = False) -> Attachment:
    """Attach the adapter saved in ``path`` to ``model`` (which must be the same base it was trained on); with
    ``fp32_trainable`` its trainable tensors are fp32 whatever the base's dtype, so the saved values load exactly."""
    folder, meta = read_adapter_meta(path)
    source = folder / CONFIG_FILE
    check_base(model, meta, source)
    use_saved_pooling(model, meta, source)
    method = get_method(meta["method"])
    config = config_from_dict(method.config, meta["config"], source=f"{source}: config")
    attachment = attach(
        model, method, config, trainable_modules=meta["trainable_modules"], fp32_trainable=fp32_trainable
    )
    if attachment.targets != list(meta["targets"]):
        raise InputError(f"{source}: the config selects other modules than the adapter was saved with")
    load_state(attachment, read_tensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    return attachment
