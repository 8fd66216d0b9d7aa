"""The span task (extractive reading comprehension): cross-entropy of the answer's start token and of its end token,
averaged; evaluation reads the best span of every example over all its windows and scores it as SQuAD v2 does.

Post-processing, per example: in each window, the best valid span -- start <= end, at most ``max_answer_tokens``
tokens, both ends in the passage part -- scored ``start_logit + end_logit``; the example's answer is the best of its
windows' spans, unless its null score beats it (then: no answer). The null score is ``start[0] + end[0]`` (the
[CLS] position), taken from the window where it is lowest: a window that does not hold the answer is trained to
point at [CLS], so only the window most sure of a span speaks for the example (null threshold 0).

Soft prompts insert virtual tokens into the model's input; ``core.virtual_tokens`` takes them back out of the
start and end logits, so positions here are always the caller's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import progress
from ..data.spans import SpanEncoded
from ..evaluate.metrics import span_metrics
from .distributed import SINGLE, Distributed

NO_SPAN = float("-inf")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def span_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) logits, (B, T) each, with padding positions at -inf. A model that returns logits for virtual
    tokens in front of the input (PEFT's prompt-learning question answerer, the benchmark's peer) has them dropped."""
    out = model(**{k: v for k, v in batch.items() if k in INPUTS})
    pad = batch["attention_mask"] == 0
    extra = out.start_logits.shape[1] - pad.shape[1]  # (B, m + T) from PEFT's prompt learning, else 0
    start, end = out.start_logits[:, extra:].float(), out.end_logits[:, extra:].float()
    return start.masked_fill(pad, NO_SPAN), end.masked_fill(pad, NO_SPAN)


def best_span(
    start: torch.Tensor, end: torch.Tensor, inside: Sequence[bool], max_answer_tokens: int
) -> tuple[float, int, int]:
    """(score, first token, last token) of the best valid span of one window (score -inf where there is none):
    start <= end, at most ``max_answer_tokens`` tokens, both inside the passage (``inside`` per token)."""
    n = len(inside)
    start, end = start[:n], end[:n]
    passage = torch.tensor(list(inside), dtype=torch.bool)
    i = torch.arange(n)
    length = i[None, :] - i[:, None]  # (T, T): last - first
    valid = passage[:, None] & passage[None, :] & (length >= 0) & (length < max_answer_tokens)
    scores = (start[:, None] + end[None, :]).masked_fill(~valid, NO_SPAN)  # (T, T)
    best = int(scores.argmax())
    score = float(scores.view(-1)[best])
    if score == NO_SPAN:
        return NO_SPAN, 0, 0
    return score, best // n, best % n


def choose_answers(windows: dict[int, tuple[float, int, int, float]], data: SpanEncoded) -> list[str]:
    """The answer text of every example of ``data`` from its windows' (span score, first, last, null score); ""
    for no answer."""
    best: dict[int, tuple[float, int, int]] = {}
    null: dict[int, float] = {}
    for f, (score, first, last, null_score) in windows.items():
        e = data.example[f]
        null[e] = min(null.get(e, float("inf")), null_score)
        if score > best.get(e, (NO_SPAN,))[0]:
            best[e] = (score, f, first, last)
    answers = []
    for e, example in enumerate(data.examples):
        if e not in best or best[e][0] == NO_SPAN or null[e] > best[e][0]:
            answers.append("")
            continue
        _, f, first, last = best[e]
        answers.append(example.context[data.offsets[f][first][0] : data.offsets[f][last][1]])
    return answers


class SpanTask:
    metric = "f1"

    def __init__(self, max_answer_tokens: int = 30):
        self.max_answer_tokens = max_answer_tokens

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        start, end = span_logits(model, batch)  # (B, T) each
        return (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2

    @torch.no_grad()
    def evaluate(self, model, data: SpanEncoded, batch_size: int, device, autocast, dist: Distributed = SINGLE) -> dict:
        was_training = model.training
        model.eval()
        order = sorted(dist.shard(list(range(len(data)))), key=lambda i: len(data.input_ids[i]))
        windows: dict[int, tuple[float, int, int, float]] = {}
        total_loss = 0.0
        with progress.track(len(order), unit="windows") as advance:
            for at in range(0, len(order), batch_size):
                idx = order[at : at + batch_size]
                batch = data.batch(idx, device)
                with autocast():
                    start, end = span_logits(model, batch)
                total_loss += (
                    float(
                        F.cross_entropy(start, batch["start_positions"], reduction="sum")
                        + F.cross_entropy(end, batch["end_positions"], reduction="sum")
                    )
                    / 2
                )
                start, end = start.cpu(), end.cpu()
                for row, f in enumerate(idx):
                    inside = [o is not None for o in data.offsets[f]]
                    score, first, last = best_span(start[row], end[row], inside, self.max_answer_tokens)
                    windows[f] = (score, first, last, float(start[row, 0] + end[row, 0]))
                advance(len(idx))
        model.train(was_training)
        parts = dist.gather((windows, total_loss))  # every process's share, on every process
        windows = {f: w for part, _ in parts for f, w in part.items()}
        total_loss = sum(loss for _, loss in parts)
        answers = choose_answers(windows, data)
        golds = [[text for text, _ in e.answers] for e in data.examples]
        return span_metrics(answers, golds) | {"loss": total_loss / max(len(data), 1), "windows": len(data)}
