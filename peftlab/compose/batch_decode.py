"""Decoding several requests together: one left-padded batch, one KV cache, every row its own settings and stop.

Each row is a prompt's token ids with its own budget (``max_tokens``), temperature, top-p, seed, stop strings and
adapter (chosen by the caller, e.g. through ``MultiLoraModel.rows``). The batch is prefilled once::

    ids, mask: (B, T)  left-padded, so every row's last prompt token sits in column T-1
    positions = cumsum(mask) - 1    (pads get position 1, as transformers' generate gives them)

then decoded one token per step for all rows at once, feeding each row's new token with the cache. A row that has
finished (end-of-turn token, a stop string, its budget, or its caller gone) keeps a place in the batch but its
tokens are no longer read; the loop ends when every row has finished. Greedy rows take the argmax, so a row equals
the same prompt decoded alone; sampling rows draw from their own seeded generator, so a seed gives the same text
whatever else shares the batch.

Text is given to the caller as it grows (``on_text``), holding back what could still be the start of a stop
string or an unfinished multi-byte character, so the streamed pieces join up to exactly the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..core.precision import autocast_of


@dataclass
class DecodeRow:
    """One request's prompt and settings, and (filled in while decoding) its tokens, text and finish reason."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None  # called with each new piece of text
    cancelled: Callable[[], bool] | None = None  # the caller is gone: stop this row
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already given to on_text
    finish_reason: str | None = None  # "stop" (end of turn or stop string), "length", "cancelled"

    def generator(self) -> torch.Generator:
        g = torch.Generator(device="cpu")
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def left_pad(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T), the prompts aligned on the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[j, width - len(p) :] = 1
    return ids, mask


def sampled_token(logits: torch.Tensor, row: DecodeRow, generator: torch.Generator) -> int:
    """A draw from the row's last logits (V,) at its temperature and top-p."""
    probs = torch.softmax(logits.float().cpu() / row.temperature, dim=-1)  # (V,)
    if row.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < row.top_p  # the smallest set reaching top_p (first kept)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters to hold back: the longest end of ``text`` that begins a stop string, or one
    replacement character of a multi-byte character still being decoded."""
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


def update_text(row: DecodeRow, tokenizer, eos: int | None, finish: bool) -> None:
    """Decode the row's tokens, cut at the first stop string (finishing the row), and pass on the new text."""
    tokens = row.tokens[:-1] if row.tokens and row.tokens[-1] == eos else row.tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.find(s) for s in row.stop if s and s in text]
    if cuts:
        text = text[: min(cuts)]
        row.finish_reason = "stop"
    row.text = text
    done = finish or row.finish_reason is not None
    end = len(text) if done else len(text) - held_back(text, row.stop)
    if end > row.sent and row.on_text is not None:
        row.on_text(text[row.sent : end])
    row.sent = max(row.sent, end)


@torch.no_grad()
def decode_together(model, tokenizer, rows: Sequence[DecodeRow], eos: int | None, pad: int) -> None:
    """Decode every row to its end in one batch with a KV cache (see the module's docstring); fills the rows."""
    device = next(model.parameters()).device
    ids, mask = left_pad([r.prompt for r in rows], pad)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
    generators = [r.generator() for r in rows]
    cache = None
    step_ids = ids
    with autocast_of(model)():
        for _ in range(max(r.max_tokens for r in rows)):
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1, :]  # (B, V)
            greedy = logits.argmax(-1).tolist()  # one transfer for every greedy row
            chosen = []
            for j, row in enumerate(rows):
                if row.finish_reason is None and row.cancelled is not None and row.cancelled():
                    row.finish_reason = "cancelled"
                if row.finish_reason is not None:
                    chosen.append(pad)
                    continue
                token = greedy[j] if row.temperature <= 0 else sampled_token(logits[j], row, generators[j])
                row.tokens.append(token)
                chosen.append(token)
                if token == eos:
                    row.finish_reason = "stop"
                elif len(row.tokens) >= row.max_tokens:
                    row.finish_reason = "length"
                update_text(row, tokenizer, eos, row.finish_reason is not None)
            if all(r.finish_reason is not None for r in rows):
                break
            step_ids = torch.tensor(chosen, dtype=torch.long, device=device)[:, None]  # (B, 1)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (B, T + step + 1)
            positions = positions[:, -1:] + 1  # (B, 1)
    for row in rows:
        if row.finish_reason is None:  # a budget of 0 tokens
            row.finish_reason = "length"
            update_text(row, tokenizer, eos, True)
