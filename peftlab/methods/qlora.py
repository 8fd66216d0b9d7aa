"""QLoRA: LoRA on a frozen 4-bit NormalFloat base (Dettmers, Pagnoni, Holtzman and Zettlemoyer, 2023,
https://arxiv.org/abs/2305.14314).

Every target linear layer's weight W (out, in) is quantised to NF4 with double quantisation (block-wise absmax,
blocks of 64; the absmax constants quantised again to 8 bits in blocks of 256; see ``peftlab.quant.nf4``) and the
dense weight is dropped. LoRA trains on top in the base's dtype::

    h = W' x + b + s * B A x,    W' = dequant(NF4(W)),  A: (r, in),  B: (out, r),  B = 0 at the start

W' is dequantised on the fly in forward and again in backward, where the gradient reaches x (and through it the
earlier layers' A and B) as ``dL/dx = dL/dh W'``. The paper's bf16 compute and paged optimisers are not part of
this (``--precision bf16`` autocasts as for any method).

Facts the rest of peftlab relies on:

- a fresh QLoRA model equals the *quantised* base exactly (B = 0), not the fp32 base: attaching changes the
  outputs by the quantisation error, so ``identity_at_init`` is False;
- the adapter file holds only A, B and the task head; loading it onto the pretrained base quantises that base
  again, which is deterministic (on the same kind of device; a peftlab run attaches on the CPU), so outputs
  round-trip exactly;
- ``pretrained_weight()`` is W' (the base the adapter was trained on), so changed parameters and delta ranks are
  counted against the quantised base;
- merging is an explicit choice, ``merge_into``: ``dequantized`` (default) replaces the layer by a dense
  ``nn.Linear`` holding W' + s B A (exact: merged equals unmerged up to float rounding, but the layer is full size
  again); ``requantized`` quantises W' + s B A to NF4 again (a 4-bit merged model; lossy, and the method report
  gives the re-quantisation error: an update much smaller than the NF4 step is largely rounded away, so the
  error can be as large as the update itself). Either way the NF4 base is kept while merged, so ``unmerge()``
  restores it exactly;
- the Hugging Face PEFT export is plain LoRA (a QLoRA adapter is a LoRA adapter; the quantisation belongs to how
  the base is loaded). Imported back it becomes a ``lora`` attachment on a full-precision base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..core.hooks import TrainingHooks
from ..core.registry import Method, PeftFormat, register
from ..errors import InputError, PeftlabError, require
from ..quant.nf4 import ABSMAX_BLOCK_SIZE, NF4_BLOCK_SIZE, NF4Linear
from .lora import LoraConfig, LoraLinear, export_lora, lora_plus_groups, wrap_linear_layers

MergeInto = Literal["dequantized", "requantized"]


@dataclass
class QLoraConfig(LoraConfig):
    quant_block_size: int = field(
        default=NF4_BLOCK_SIZE, metadata={"help": "weights per NF4 block (one absmax constant each)"}
    )
    double_quant: bool = field(
        default=True, metadata={"help": "quantise the absmax constants again to 8 bits (about 4.127 bits per weight)"}
    )
    double_quant_block_size: int = field(
        default=ABSMAX_BLOCK_SIZE, metadata={"help": "absmax constants per 8-bit block of the double quantisation"}
    )
    merge_into: MergeInto = field(
        default="dequantized",
        metadata={"help": "merge into a dense dequantised weight (exact) or re-quantise to NF4 (4-bit, lossy)"},
    )

    def __post_init__(self):
        super().__post_init__()
        require(
            isinstance(self.quant_block_size, int) and self.quant_block_size > 0,
            "quant_block_size",
            "a positive integer",
            self.quant_block_size,
        )
        require(
            isinstance(self.double_quant_block_size, int) and self.double_quant_block_size > 0,
            "double_quant_block_size",
            "a positive integer",
            self.double_quant_block_size,
        )
        require(
            self.merge_into in ("dequantized", "requantized"),
            "merge_into",
            "dequantized or requantized",
            self.merge_into,
        )


class QLoraLinear(LoraLinear):
    """``base(x) + scaling * B(A(dropout(x)))`` around a frozen ``NF4Linear``; merging replaces the base."""

    def __init__(
        self,
        base: NF4Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "kaiming",
        merge_into: MergeInto = "dequantized",
    ):
        super().__init__(base, r, alpha, dropout, rslora, init)
        self.merge_into = merge_into
        # While merged, the NF4 base waits here, outside the module tree: the merged layer alone is what the model
        # counts, saves and moves; unmerge() brings it back (to the factors' device).
        self._unmerged: list[NF4Linear] = []

    def factor_dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        return self.base.weight_dtype, self.base.codes.device

    def quantized_base(self) -> NF4Linear:
        """The NF4 layer the adapter sits on (kept aside while merged)."""
        return self._unmerged[0].to(self.lora_A.device) if self.merged else self.base

    def pretrained_weight(self) -> torch.Tensor:
        return self.quantized_base().dequantized_weight()

    @torch.no_grad()
    def merge(self, into: MergeInto | None = None) -> None:
        """Replace the NF4 base by one holding W' + s B A: dense (``dequantized``) or NF4 again (``requantized``)."""
        if self.merged:
            raise PeftlabError("QLoraLinear is already merged")
        into = into or self.merge_into
        nf4 = self.base
        weight = nf4.dequantized_weight() + self.delta_weight().to(nf4.weight_dtype)  # (out, in)
        if into == "requantized":
            merged = NF4Linear.from_weight(weight, nf4.bias, **nf4.quantization_settings())
        else:
            merged = nn.Linear(nf4.in_features, nf4.out_features, bias=False, device="meta")  # no throwaway init
            merged.weight = nn.Parameter(weight, requires_grad=False)
            merged.bias = nf4.bias
        self.base = merged
        self._unmerged = [nf4]
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original NF4 base back (exactly: it was kept while merged)."""
        if not self.merged:
            raise PeftlabError("QLoraLinear is not merged")
        self.base = self.quantized_base()
        self._unmerged = []
        self.merged = False


def apply(model: nn.Module, config: QLoraConfig, protected: Sequence[str] = ()) -> list[str]:
    def make_layer(name: str, linear: nn.Linear) -> QLoraLinear:
        if not torch.isfinite(linear.weight).all():
            raise InputError(f"targets: layer {name!r} has non-finite weights, which NF4 cannot quantise")
        settings = (config.quant_block_size, config.double_quant, config.double_quant_block_size)
        base = NF4Linear.from_linear(linear, *settings)
        r, alpha = config.rank_and_alpha(name)
        return QLoraLinear(base, r, alpha, config.dropout, config.rslora, config.init, config.merge_into)

    return wrap_linear_layers(model, config.targets, protected, lambda n: config.rank_and_alpha(n)[0], make_layer)


@torch.no_grad()
def quantization_report(attachment) -> dict:
    """Bits per base weight, sizes in bytes and the quantisation error, per layer and summarised."""
    layers = {name: layer.quantized_base() for name, layer in attachment.layers().items()}
    weights = sum(q.in_features * q.out_features for q in layers.values())
    nf4_bytes = sum(q.nbytes() for q in layers.values())
    dense_bytes = sum(q.in_features * q.out_features * q.weight_dtype.itemsize for q in layers.values())
    own = {id(p) for layer in attachment.layers().values() for p in layer.adapter_parameters().values()}
    other_bytes = sum(p.numel() * p.element_size() for p in attachment.model.parameters() if id(p) not in own)
    errors = {name: q.error for name, q in layers.items() if q.error is not None}
    relative = [e["relative_frobenius"] for e in errors.values()]
    return {
        "nf4_layers": len(layers),
        "nf4_parameters": weights,
        "bits_per_parameter": 8 * nf4_bytes / max(weights, 1),
        "nf4_weight_bytes": nf4_bytes,
        "dense_weight_bytes": dense_bytes,
        # the whole base (embeddings, norms and head stay dense), with the target weights in NF4 or dense
        "base_bytes_nf4": other_bytes + nf4_bytes,
        "base_bytes_dense": other_bytes + dense_bytes,
        "quantization_error": {
            "relative_frobenius_mean": sum(relative) / len(relative) if relative else None,
            "relative_frobenius_max": max(relative, default=None),
            "max_abs": max((e["max_abs"] for e in errors.values()), default=None),
            "per_layer": errors,
        },
    }


@torch.no_grad()
def requantized_merge_report(attachment, evaluate) -> dict:
    """What merging with re-quantisation costs: the mean relative weight error and the validation metrics before and
    after (the adapter is unmerged again afterwards)."""
    layers = list(attachment.layers().values())
    before = evaluate()
    for layer in layers:
        layer.merge("requantized")
    after = evaluate()
    relative = [layer.base.error["relative_frobenius"] for layer in layers]
    for layer in layers:
        layer.unmerge()
    keys = ("accuracy", "loss")
    return {
        "weight_relative_frobenius_mean": sum(relative) / len(relative) if relative else None,
        "validation_unmerged": {k: before[k] for k in keys if k in before},
        "validation_requantized": {k: after[k] for k in keys if k in after},
    }


class QLoraHooks(TrainingHooks):
    """Training is plain LoRA training; the hooks only report the quantisation numbers at the end."""

    def __init__(self, attachment, config: QLoraConfig):
        self.attachment = attachment

    def report(self, evaluate) -> dict:
        report = quantization_report(self.attachment)
        report["requantized_merge"] = requantized_merge_report(self.attachment, evaluate)
        return report


METHOD = register(
    Method(
        name="qlora",
        config=QLoraConfig,
        apply=apply,
        family="reparameterised",
        summary="LoRA on a frozen 4-bit NormalFloat base with double quantisation; merges dequantised or 4-bit",
        paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)",
        # LoRA's rate: the factors train as in LoRA (the paper's 2e-4 suits r = 64, alpha = 16 on 7B-65B models)
        lr=1e-3,
        mergeable=True,
        identity_at_init=False,  # the quantised base differs from the pretrained one; see the module docstring
        hooks=QLoraHooks,
        # A QLoRA adapter is a LoRA adapter in the PEFT format (imported back as ``lora``).
        peft=PeftFormat("LORA", export=export_lora),
        param_groups=lora_plus_groups,
    )
)
