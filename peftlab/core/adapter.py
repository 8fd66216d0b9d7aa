"""The adapter protocol: how the core finds a method's own parameters and merges them.

A method that adds parameters to a layer *wraps* that layer instead of subclassing the model: the wrapper holds
the original layer as ``self.base`` and adds the method's contribution in ``forward``. The core never guesses from
parameter names which weights belong to a method; it asks each wrapper through this protocol:

- ``adapter_parameters()`` -- the method's own parameters, by name relative to the wrapper;
- ``adapter_buffers()``    -- tensors the adapter needs to be rebuilt but does not train (saved with it);
- ``delta_weight()``       -- the change to the pretrained weight the adapter stands for (None if it has none);
- ``pretrained_weight()``  -- the pretrained weight itself (what accounting compares against);
- ``deltas()``             -- (pretrained, change) for every base parameter the adapter changes, by its name in the
                              base layer; by default just the weight, from the two above. A layer that changes
                              several (diff pruning: weight and bias) overrides this instead; accounting, merging
                              and unmerging read it;
- ``sparse_parameters()``  -- adapter parameters that are mostly zeros, saved as their non-zero entries only;
- ``trainable_entries()``  -- how many entries of each adapter parameter the optimiser may change (all, unless a
                              layer trains a parameter under a fixed mask of its own);
- ``merge()`` / ``unmerge()`` -- explicit calls, never hidden inside ``.train()`` or ``.eval()``;
- ``on_loaded()``          -- called after saved tensors were copied in (to rebuild derived state);
- ``accepts_buffer_shape()`` -- whether a buffer that grows during training (ReLoRA's merged history) may be
                              loaded with the shape it was saved with; fixed-shape buffers refuse.
- ``on_unload()``          -- called before the wrapper is replaced by its base (to remove what the adapter
                              installed outside itself: forward hooks on the model, attention extensions).

Merging adds the changes into the base parameters, after which ``forward`` skips the adapter branch, so a merged model
runs at the speed of the plain base.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PeftlabError


class AdapterLayer(nn.Module):
    """Base class of every wrapper: ``self.base`` is the wrapped layer, ``self.merged`` says where the delta lives."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.merged = False

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks are read from the wrapped layer, so model code that reads e.g.
        ``self_attn.layer_idx`` or ``q_proj.weight`` keeps working on a wrapped layer."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The method's own parameters, keyed by their name inside this wrapper (e.g. ``lora_A``)."""
        raise NotImplementedError

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Tensors saved with the adapter that do not train (e.g. frozen initial factors), by name in this layer."""
        return {}

    def delta_weight(self) -> torch.Tensor | None:
        """The additive change to the pretrained weight this adapter stands for, or None without a weight form."""
        return None

    def pretrained_weight(self) -> torch.Tensor:
        """The pretrained weight; by default ``base.weight``, minus the delta while it is merged."""
        weight = self.base.weight.detach()
        if self.merged:
            weight = weight - self.delta_weight().to(weight.dtype)
        return weight

    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """``{name in base: (pretrained value, additive change)}`` for every base parameter this adapter changes, or
        None without a weight form. By default the weight alone (``pretrained_weight()``, ``delta_weight()``)."""
        delta = self.delta_weight()
        if delta is None:
            return None
        weight = self.pretrained_weight()
        return {"weight": (weight, delta.to(weight.dtype))}

    def sparse_parameters(self) -> set[str]:
        """Names of adapter parameters saved sparse: their non-zero entries as ``::indices`` / ``::values`` (where
        that is smaller than the dense tensor), read back as zeros elsewhere. None by default."""
        return set()

    def trainable_entries(self) -> dict[str, int]:
        """Entries of each adapter parameter the optimiser may change; all of them by default."""
        return {name: p.numel() for name, p in self.adapter_parameters().items()}

    def on_loaded(self) -> None:
        """Hook run after saved tensors were copied into this layer; rebuild anything derived from them."""

    def accepts_buffer_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether adapter buffer ``name`` (an attribute of this layer) may be loaded with a saved ``shape`` that
        differs from its current one. Only buffers whose size changes during training say yes (ReLoRA's merged
        history); loading then replaces the buffer by one of the saved shape. By default every buffer is fixed."""
        return False

    def on_unload(self) -> None:
        """Hook run before this wrapper is replaced by its base layer: undo whatever the adapter installed outside
        itself (soft prompts hook the model's forward, prefixes extend attention), so the model is plain again."""

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter's changes (``deltas()``) into the base parameters; afterwards ``forward`` costs what the
        base layer costs."""
        if self.merged:
            raise PeftlabError(f"{type(self).__name__} is already merged")
        changes = self.deltas()
        if changes is None:
            raise PeftlabError(f"{type(self).__name__} has no weight form and cannot be merged")
        for name, (_, delta) in changes.items():
            target = getattr(self.base, name)
            target.add_(delta.to(target.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of the base parameters (the exact inverse of ``merge`` up to float rounding)."""
        if not self.merged:
            raise PeftlabError(f"{type(self).__name__} is not merged")
        for name, (_, delta) in self.deltas().items():
            target = getattr(self.base, name)
            target.sub_(delta.to(target.dtype))
        self.merged = False


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter wrapper in ``model``, keyed by the wrapped layer's module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is (a plain setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
