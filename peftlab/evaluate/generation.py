"""Generation from chat models and the metrics read off it: exact match and answer accuracy.

``generate`` renders each conversation's prompt with the chat template (``add_generation_prompt=True``), pads
on the left, and decodes greedily (or samples with a temperature and top-p), stopping each row at the model's
end-of-turn token. Answers are compared after normalisation (lower case, surrounding punctuation and spaces
stripped, inner whitespace collapsed): *exact match* is the share of generations equal to the reference reply;
*answer accuracy* is the share whose first line equals one of the record's acceptable ``answers`` (a class name,
for the classification tasks turned into instructions); *token F1* is the SQuAD-style overlap of the reply's
words with the best-matching acceptable answer (or the reference), a graded score for open answers. With records of
several tasks the scores are also given per task (``tasks``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

from .. import progress
from ..core.precision import autocast_of
from ..data.conversations import Conversation
from ..data.lm import render


def normalise(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(string.punctuation + " ")


@torch.no_grad()
def left_padded_prompts(
    tokenizer, prompts: Sequence[list[dict[str, str]]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T): the prompts rendered with the generation prompt and padded on the
    left, so every row's last token is its prompt's end and new tokens follow it directly."""
    rows = [render(tokenizer, p, generation_prompt=True) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, width - len(r) :] = torch.tensor(r)
        mask[j, width - len(r) :] = 1
    return ids, mask


def generate(
    model,
    tokenizer,
    prompts: Sequence[list[dict[str, str]]],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Replies to each prompt (a list of messages ending with a user turn), greedy when temperature is 0."""
    device = next(model.parameters()).device
    autocast = autocast_of(model)  # a half-precision base under fp32 adapters runs in the base's dtype
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generator = torch.Generator(device="cpu").manual_seed(seed)
    replies: list[str] = []
    with progress.track(len(prompts), default="generating", unit="replies") as advance:
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded_prompts(tokenizer, prompts[start : start + batch_size], pad)
            kwargs = {"do_sample": temperature > 0}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=top_p)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            with autocast():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    **kwargs,
                )
            for row in out[:, ids.shape[1] :].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                replies.append(tokenizer.decode(row, skip_special_tokens=True))
            advance(len(ids))
    model.train(was_training)
    return replies


def token_f1(reply: str, reference: str) -> float:
    """Harmonic mean of word precision and recall between two texts (after ``normalise``, punctuation split off)."""
    a = re.findall(r"\w+", normalise(reply))
    b = re.findall(r"\w+", normalise(reference))
    common = sum((Counter(a) & Counter(b)).values())
    if not a or not b or not common:
        return float(a == b)
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def score(conversations: Sequence[Conversation], replies: Sequence[str], by_task: bool = True) -> dict:
    out = _score(conversations, replies)
    tasks = sorted({c.task for c in conversations if c.task})
    if by_task and len(tasks) > 1:
        out["tasks"] = {
            t: _score(*zip(*[(c, r) for c, r in zip(conversations, replies, strict=True) if c.task == t], strict=True))
            for t in tasks
        }
    return out


def _score(conversations: Sequence[Conversation], replies: Sequence[str]) -> dict:
    exact = [normalise(r) == normalise(c.reference()) for c, r in zip(conversations, replies, strict=True)]
    f1 = [max(token_f1(r, a) for a in [c.reference(), *c.answers]) for c, r in zip(conversations, replies, strict=True)]
    with_answers = [(c, r) for c, r in zip(conversations, replies, strict=True) if c.answers]
    answered = [
        normalise(r.strip().splitlines()[0] if r.strip() else "") in {normalise(a) for a in c.answers}
        for c, r in with_answers
    ]
    out = {
        "exact_match": sum(exact) / max(len(exact), 1),
        "token_f1": sum(f1) / max(len(f1), 1),
        "examples": len(exact),
    }
    if with_answers:
        out["answer_accuracy"] = sum(answered) / len(answered)
        out["answered_examples"] = len(answered)
    return out
