"""P-tuning (v1; Liu, Zheng, Du, Ding, Qian, Yang and Tang, 2021, GPT Understands, Too,
https://arxiv.org/abs/2103.10385).

m virtual tokens enter the frozen model's input, as in prompt tuning, but they are not trained directly: a prompt
encoder computes them from m learned inputs u_1..u_m, so that they depend on each other::

    h_1..h_m = MLP(BiLSTM(u_1..u_m))                                  (encoder "lstm", the paper's)
    h_i      = W3 relu(W2 relu(W1 u_i + b1) + b2) + b3               (encoder "mlp", as in Hugging Face PEFT)
    y        = f([x_<k; h_1..h_m; x_>=k])                            (the tokens go in at position k)

The LSTM is two-layer and bidirectional with hidden size ``encoder_hidden``, followed by Linear(2h, 2h), ReLU,
Linear(2h, d); with the default h = d / 2 this is the paper's code (Linear(d, d), ReLU, Linear(d, d) after the
LSTM). The tokens go in through ``core.virtual_tokens`` (see prompt_tuning.py).

Position (``position``): ``front`` puts the prompt before everything; ``after-first`` after the first token,
so a BERT-style encoder keeps [CLS] first, where its pooler and its pretrained position 0 expect it; an integer k
puts it before token k. ``auto`` (the default) is ``after-first`` for encoders and ``front`` for decoders. A decoder
takes only ``front``: peftlab pads decoder prompts on the left when generating, so a fixed column would fall inside
the padding of shorter rows.

What is saved: the encoder exists to make the prompt easier to optimise; at inference only its output matters. So
the adapter file holds the m virtual tokens it computes (folded through ``Method.fold``; the config saved says
``encoder = "none"``, the training config is kept as ``trained_as``): 20 x 384 numbers for MiniLM instead of an
LSTM encoder of 2.08M parameters. Hugging Face PEFT saves the same. ``keep_encoder`` saves the encoder instead, for
a later run that continues training through it (``train --adapter``); a folded adapter trains its tokens directly.
``encoder = "none"`` trains the tokens directly from the start (prompt tuning at a chosen position).

PEFT format: ``P_TUNING`` with the folded tokens as ``prompt_embeddings`` (position ``front`` only, as PEFT has
it); both directions keep the numbers exact.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..core.registry import Method, PeftFormat, register
from ..errors import InputError, require
from .prompt_tuning import (
    attach_soft_prompt,
    import_peft_prompt,
    peft_head_tensors,
    peft_prompt_fields,
    the_soft_prompt,
)

POSITIONS = ("auto", "front", "after-first")


@dataclass
class PTuningConfig:
    num_virtual_tokens: int = field(default=20, metadata={"help": "virtual tokens m the encoder computes"})
    encoder: Literal["lstm", "mlp", "none"] = field(
        default="lstm",
        metadata={"help": "prompt encoder: bidirectional LSTM + MLP (the paper), a 3-layer MLP, or none"},
    )
    encoder_hidden: int | None = field(
        default=None, metadata={"help": "encoder hidden size (default: half the model's width for lstm, all for mlp)"}
    )
    position: str = field(
        default="auto",
        metadata={"help": "where the prompt goes: front, after-first, a token index, or auto (encoders after [CLS])"},
    )
    keep_encoder: bool = field(
        default=False, metadata={"help": "save the encoder instead of the virtual tokens it computes"}
    )

    def __post_init__(self):
        require(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
            "num_virtual_tokens",
            "a positive integer",
            self.num_virtual_tokens,
        )
        require(self.encoder in ("lstm", "mlp", "none"), "encoder", "lstm, mlp or none", self.encoder)
        require(
            self.encoder_hidden is None or (isinstance(self.encoder_hidden, int) and self.encoder_hidden > 0),
            "encoder_hidden",
            "a positive integer",
            self.encoder_hidden,
        )
        self.position = str(self.position)
        require(
            self.position in POSITIONS or re.fullmatch(r"\d+", self.position) is not None,
            "position",
            "front, after-first, auto or a token index >= 0",
            self.position,
        )


class PromptEncoder(nn.Module):
    """m learned inputs u (m, d) -> m virtual tokens (m, d), through a BiLSTM + MLP or an MLP."""

    def __init__(self, count: int, width: int, kind: str, hidden: int):
        super().__init__()
        self.kind = kind
        self.inputs = nn.Parameter(torch.randn(count, width))  # (m, d)
        if kind == "lstm":
            self.lstm = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            self.head = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, width)
            )

    def forward(self) -> torch.Tensor:
        x = self.inputs
        if self.kind == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)  # (m, 2h)
        return self.head(x)  # (m, d)


def is_decoder(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def position_index(position: str, decoder: bool) -> int:
    """The token index a position names; ``auto`` is in front (0) on a decoder, after the first token (1) elsewhere."""
    if position == "auto":
        return 0 if decoder else 1
    index = {"front": 0, "after-first": 1}.get(position)
    return int(position) if index is None else index


def insertion_index(model: nn.Module, position: str) -> int:
    decoder = is_decoder(model)
    index = position_index(position, decoder)
    if decoder and index != 0:
        raise InputError(
            f"position: {type(model).__name__} is a decoder and takes its prompt in front (generation pads prompts "
            f"on the left, so position {position!r} would fall inside the padding); use front"
        )
    return index


def apply(model: nn.Module, config: PTuningConfig, protected: Sequence[str] = ()) -> list[str]:
    at = insertion_index(model, config.position)

    def make(embed: nn.Module):
        weight = embed.weight
        width = weight.shape[1]
        if config.encoder == "none":
            prompt = torch.randn(config.num_virtual_tokens, width, device=weight.device, dtype=weight.dtype)
            return prompt * weight.detach().float().std(), None
        hidden = config.encoder_hidden or (max(1, width // 2) if config.encoder == "lstm" else width)
        encoder = PromptEncoder(config.num_virtual_tokens, width, config.encoder, hidden)
        return None, encoder.to(device=weight.device, dtype=weight.dtype)

    return attach_soft_prompt(model, at, make)


def fold(attachment) -> tuple[PTuningConfig, dict[str, torch.Tensor]] | None:
    """The encoder computed once into the virtual tokens it produces (unless asked to keep it)."""
    config: PTuningConfig = attachment.config
    if config.encoder == "none" or config.keep_encoder:
        return None
    (name, layer), *_ = attachment.layers().items()
    return dataclasses.replace(config, encoder="none"), {f"{name}.prompt": layer.folded()}


def _export_p_tuning(attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    config: PTuningConfig = attachment.config
    layer = the_soft_prompt(attachment)
    if layer.at != 0:
        raise InputError(
            f"position: PEFT's P-tuning puts the prompt in front; this adapter puts it at token {layer.at}"
        )
    prompt = layer.folded()
    fields = {
        "peft_type": "P_TUNING",
        **peft_prompt_fields(attachment, prompt),
        "encoder_reparameterization_type": "LSTM" if config.encoder == "lstm" else "MLP",
        "encoder_hidden_size": config.encoder_hidden or prompt.shape[1],
    }
    return fields, {"prompt_embeddings": prompt} | peft_head_tensors(attachment)


def _import_p_tuning(model, cfg: dict, tensors: dict, weights: Path):
    count = int(cfg.get("num_virtual_tokens") or 0)
    config = PTuningConfig(num_virtual_tokens=count, encoder="none", position="front")
    return import_peft_prompt(model, cfg, tensors, weights, "p_tuning", config)


METHOD = register(
    Method(
        name="p_tuning",
        config=PTuningConfig,
        apply=apply,
        family="soft prompts",
        summary="virtual tokens computed by a BiLSTM/MLP prompt encoder, at a chosen position; saved folded",
        paper="Liu et al. 2021, GPT Understands, Too (arXiv:2103.10385)",
        lr=1e-3,
        mergeable=False,
        identity_at_init=False,
        fold=fold,
        peft=PeftFormat("P_TUNING", export=_export_p_tuning, load=_import_p_tuning, full_keys=True),
    )
)
