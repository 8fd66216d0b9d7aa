"""Tokenising once, up front, and building dynamically padded batches.

Texts are tokenised a single time before training (never inside the step). Each batch is padded only to its own
longest sequence, so short snippets do not pay for the longest one in the dataset. ``length_grouped`` goes
further (the training loop's ``--group-by-length``): each step's examples are drawn from examples of similar length.

Truncation policy: a sequence longer than ``max_length`` tokens (special tokens included) is cut at the end
(for a pair, the longer member is shortened first); the number of truncated examples is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .classification import Example


@dataclass
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    truncated: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)

    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = padded(self.input_ids, self.token_type_ids, indices, self.pad_id)
        out["labels"] = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return {k: v.to(device) for k, v in out.items()}


def padded(
    input_ids: list[list[int]], token_type_ids: list[list[int]] | None, indices: Sequence[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """The rows ``indices`` padded at the end to the longest of them: ``input_ids`` (padded with ``pad_id``),
    ``attention_mask`` and, where the encoding has them, ``token_type_ids`` (padded with 0), each (B, T)."""
    rows = [input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if token_type_ids is not None:
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(indices):
            t = token_type_ids[i]
            types[j, : len(t)] = torch.tensor(t)
        out["token_type_ids"] = types
    return out


def encode(examples: Sequence[Example], tokenizer, max_length: int) -> Encoded:
    texts = [e.text for e in examples]
    pairs = [e.pair for e in examples] if examples and examples[0].pair is not None else None
    # One token of headroom tells which examples are longer than max_length without tokenising them in full.
    probe = tokenizer(texts, pairs, truncation=True, max_length=max_length + 1)
    truncated = sum(len(ids) > max_length for ids in probe["input_ids"])
    cut = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Encoded(
        input_ids=cut["input_ids"],
        token_type_ids=cut.get("token_type_ids"),
        labels=[e.label for e in examples],
        truncated=truncated,
        pad_id=pad if pad is not None else 0,
    )


def length_grouped(
    order: Sequence[int], lengths: Sequence[int], per_step: int, generator: torch.Generator, window_steps: int = 64
) -> list[int]:
    """``order`` (a shuffled epoch) regrouped so that the examples of each step have similar lengths.

    Windows of ``window_steps`` steps' worth of examples, in ``order``, are each sorted by length and cut into
    steps; the full steps of the whole epoch are then shuffled with ``generator`` and the one short step (if the
    epoch does not divide evenly) stays last, so every step but the last still holds ``per_step`` examples. A
    deterministic function of its inputs: a resumed run rebuilds the same epoch."""
    window = per_step * window_steps
    steps: list[list[int]] = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: lengths[i])
        steps += [part[k : k + per_step] for k in range(0, len(part), per_step)]
    short = [steps.pop()] if steps and len(steps[-1]) < per_step else []
    shuffled = [steps[j] for j in torch.randperm(len(steps), generator=generator).tolist()] + short
    return [i for step in shuffled for i in step]
