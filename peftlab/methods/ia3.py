"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022,
https://arxiv.org/abs/2205.05638).

Learned vectors rescale activations elementwise. In a transformer block the paper rescales the keys and values
(the outputs of the k and v projections) and the feed-forward activation (the input of the feed-forward block's
second linear layer)::

    k = l_k * (W_k x + b_k),   v = l_v * (W_v x + b_v),   FFN(x) = W_2 (l_ff * gelu(W_1 x)) + b_2

Two kinds of layer, chosen by two lists of module name patterns:

- ``targets``: layers whose *output* is scaled, ``h = l * (W x + b)`` with ``l: (out,)``;
- ``feedforward``: layers whose *input* is scaled, ``h = W (l * x) + b`` with ``l: (in,)``.

Every ``l`` starts at ones, so the outputs are unchanged at step 0. Merging folds the vectors into the weights:
output scaling multiplies the rows of W and the bias, ``W' = diag(l) W``, ``b' = l * b``; input scaling multiplies
the columns, ``W' = W diag(l)``. Unmerging divides them back out (exact up to float rounding; a zero entry cannot
be divided out, so merging refuses it). The weight difference ``W' - W`` is a row or column rescaling of W, so its
rank is generally full, and the bias change of output-scaled layers is not part of ``delta_weight``.

``auto`` (the default of both lists) picks the layer names of a known architecture from
``peftlab.core.layouts.LAYOUTS`` (first match wins): the key and value projections, and the feed-forward block's
second linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import attach as attaching
from ..core.adapter import AdapterLayer, replace_module
from ..core.hf_peft import HF_CONFIG, head_modules, head_tensors
from ..core.layouts import LAYOUTS, find_layout
from ..core.registry import Method, PeftFormat, register
from ..core.targets import find_targets
from ..errors import InputError, PeftlabError, require

AUTO, NONE = "auto", "none"

# The roles of peftlab.core.layouts each list scales under "auto": keys and values (output), the feed-forward
# block's second linear layer (input).
AUTO_ROLES = {"targets": ("key", "value"), "feedforward": ("ffn_output",)}


@dataclass
class Ia3Config:
    targets: list[str] = field(
        default_factory=lambda: [AUTO],
        metadata={
            "help": "layers whose output is scaled (keys and values): module name patterns, 'auto' (k and v "
            "projections of BERT-, Llama/Qwen- or DistilBERT-style models) or 'none'"
        },
    )
    feedforward: list[str] = field(
        default_factory=lambda: [AUTO],
        metadata={
            "help": "layers whose input is scaled (the feed-forward block's second linear layer): module name "
            "patterns, 'auto' (BERT '*[0-9].output.dense', Llama/Qwen 'mlp.down_proj', DistilBERT 'ffn.lin2') or 'none'"
        },
    )

    def __post_init__(self):
        for name, patterns in (("targets", self.targets), ("feedforward", self.feedforward)):
            require(len(patterns) > 0, name, "at least one pattern, 'auto' or 'none'", patterns)
            special = [p for p in patterns if p in (AUTO, NONE)]
            require(not special or len(patterns) == 1, name, f"'{AUTO}' or '{NONE}' alone", patterns)
        require(self.targets != [NONE] or self.feedforward != [NONE], "targets", "some layers to scale", self.targets)


class Ia3Linear(AdapterLayer):
    """``l * base(x)`` (output scaling) or ``base(l * x)`` (input scaling) around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, scale_input: bool):
        super().__init__(base)
        self.scale_input = scale_input
        size = base.in_features if scale_input else base.out_features
        self.scale = nn.Parameter(torch.ones(size, dtype=base.weight.dtype, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.scale_input:
            return self.base(x * self.scale)  # (..., out): W (l * x) + b
        return self.base(x) * self.scale  # (..., out): l * (W x + b)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"scale": self.scale}

    def weight_scale(self) -> torch.Tensor:
        """The vector shaped to multiply the weight: columns (1, in) for input scaling, rows (out, 1) otherwise."""
        scale = self.scale.detach()
        return scale[None, :] if self.scale_input else scale[:, None]

    def pretrained_weight(self) -> torch.Tensor:
        weight = self.base.weight.detach()
        return weight / self.weight_scale() if self.merged else weight

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``W' - W`` (out, in): W's rows or columns times ``l - 1``."""
        if self.merged:
            return self.base.weight - self.pretrained_weight()
        return self.base.weight * (self.weight_scale() - 1)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise PeftlabError("Ia3Linear is already merged")
        if not bool(torch.all(self.scale != 0)):
            raise PeftlabError("an (IA)^3 scale entry is zero: merging could not be undone")
        self.base.weight.mul_(self.weight_scale())
        if not self.scale_input and self.base.bias is not None:
            self.base.bias.mul_(self.scale)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise PeftlabError("Ia3Linear is not merged")
        self.base.weight.div_(self.weight_scale())
        if not self.scale_input and self.base.bias is not None:
            self.base.bias.div_(self.scale)
        self.merged = False


def resolve(model: nn.Module, patterns: list[str], field_name: str, protected: Sequence[str]) -> list[str]:
    """Module names for one list: ``none`` -> [], ``auto`` -> the first known layout that fits, else the patterns
    themselves (a pattern that selects nothing is an error)."""
    if patterns == [NONE]:
        return []
    if patterns != [AUTO]:
        try:
            return find_targets(model, patterns, (nn.Linear,), protected)
        except InputError as e:  # find_targets names the field "targets"; this list may be "feedforward"
            raise InputError(f"{field_name}: {str(e).removeprefix('targets: ')}") from None
    found = find_layout(model, AUTO_ROLES[field_name], protected)
    if found is None:
        raise InputError(
            f"{field_name}: 'auto' knows the layer names of {', '.join(LAYOUTS)} models and found none of them "
            "here; give --targets and --feedforward patterns"
        )
    return found[1]


def apply(model: nn.Module, config: Ia3Config, protected: Sequence[str] = ()) -> list[str]:
    outputs = resolve(model, config.targets, "targets", protected)
    inputs = resolve(model, config.feedforward, "feedforward", protected)
    both = [n for n in inputs if n in outputs]
    if both:
        raise InputError(
            f"feedforward: module {both[0]!r} is also selected by targets; (IA)^3 scales a layer's output or its "
            "input, not both"
        )
    for name in outputs + inputs:
        replace_module(model, name, Ia3Linear(model.get_submodule(name), scale_input=name in inputs))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(outputs + inputs, key=order.__getitem__)


# --- Hugging Face PEFT: peft_type "IA3", <module>.ia3_l of shape (out, 1), or (1, in) for feedforward_modules -------


def export_ia3(attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors, feedforward = {}, []
    layers = attachment.layers()
    for name, layer in layers.items():
        tensors[f"{name}.ia3_l"] = layer.weight_scale()
        if layer.scale_input:
            feedforward.append(name)
    tensors.update(head_tensors(attachment))
    fields = {
        "peft_type": "IA3",
        "target_modules": list(layers),
        "feedforward_modules": feedforward,
        "modules_to_save": attachment.trainable_modules or None,
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
    }
    return fields, tensors


def import_ia3(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], weights):
    if cfg.get("fan_in_fan_out"):
        raise InputError(f"{weights.parent / HF_CONFIG}: fan_in_fan_out is set; peftlab's (IA)^3 adapts only nn.Linear")
    modules = dict(model.named_modules())
    vectors, rest = {}, {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        (vectors if leaf == "ia3_l" else rest)[module if leaf == "ia3_l" else key] = value
    if not vectors:
        raise InputError(f"{weights}: no ia3_l tensors found")
    outputs, inputs = [], []
    for name, value in vectors.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise InputError(f"{weights}: the model has no linear layer {name!r} (is this the adapter's base model?)")
        if tuple(value.shape) == (layer.out_features, 1):
            outputs.append(name)
        elif tuple(value.shape) == (1, layer.in_features):
            inputs.append(name)
        else:
            raise InputError(
                f"{weights}: {name}.ia3_l has shape {tuple(value.shape)}; expected ({layer.out_features}, 1) or "
                f"(1, {layer.in_features})"
            )
    heads = head_modules(rest, cfg.get("modules_to_save") or [], model, weights)
    config = Ia3Config(targets=outputs or [NONE], feedforward=inputs or [NONE])
    attachment = attaching.attach(model, "ia3", config, trainable_modules=heads)
    ours = {f"{name}.scale": value.reshape(-1) for name, value in vectors.items()}
    attaching.load_state(attachment, ours | rest, weights)
    return attachment


METHOD = register(
    Method(
        name="ia3",
        config=Ia3Config,
        apply=apply,
        family="reparameterised",
        summary="learned vectors rescale keys, values and the feed-forward activation; merges into the weights",
        paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
        "Learning ((IA)^3, arXiv:2205.05638)",
        lr=3e-3,
        mergeable=True,
        peft=PeftFormat("IA3", export=export_ia3, load=import_ia3),
    )
)
