"""Tokenising conversations for causal language models: chat template, loss on assistant tokens only, truncation,
packing.

Every conversation is rendered with the tokenizer's own chat template. The tokens of each assistant reply (its
text and the end-of-turn token that follows it) are the targets; system and user tokens get label -100, so the
loss falls only on what the model should say. The spans are found by rendering the conversation turn by turn:
the tokens added by ``template(messages[:i+1])`` beyond ``template(messages[:i], add_generation_prompt=True)``
are assistant message i.

Truncation policy, when a conversation is longer than ``max_length`` tokens, applied in this order:

1. drop the oldest exchanges (keeping a system message and the last user/assistant exchange);
2. shorten the last user message from its end (the reply, which carries the loss, stays whole);
3. cut the reply from its end (only if the reply alone is longer than the room left).

Each conversation cut in any way is counted in ``truncated``. Raw text (``Conversation.text``) is tokenised,
joined with end-of-sequence tokens and cut into ``max_length`` blocks in which every token is a target.

Packing (optional) fills each row greedily with whole examples up to ``max_length`` tokens, without
cross-contamination: a packed row records its examples' lengths (``segments``), its batches carry ``position_ids``
that restart at 0 for every example (and for the padding after them), and no attention mask, so that transformers
builds a block-diagonal causal mask from the restarting positions: each example attends only to itself, at the
positions it would have alone, and its logits equal those of the example run alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from .conversations import Conversation

IGNORE = -100


@dataclass
class LMEncoded:
    input_ids: list[list[int]]
    labels: list[list[int]]  # IGNORE where no loss falls
    truncated: int
    pad_id: int
    # Packed rows: the lengths of the examples in each row, in order (None: one example per row).
    segments: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def targets(self) -> int:
        return sum(sum(1 for t in labels if t != IGNORE) for labels in self.labels)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T), right padding
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for j, i in enumerate(indices):
            n = len(self.input_ids[i])
            ids[j, :n] = torch.tensor(self.input_ids[i])
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor(self.labels[i])
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.segments is not None:
            out["position_ids"] = torch.stack([restarting_positions(self.segments[i], width) for i in indices])
        return {k: v.to(device) for k, v in out.items()}


def restarting_positions(lengths: Sequence[int], width: int) -> torch.Tensor:
    """Positions 0, 1, ... restarting at every example of a packed row, and once more for the padding: (width,)."""
    parts = [torch.arange(n) for n in lengths]
    used = sum(lengths)
    if used < width:
        parts.append(torch.arange(width - used))
    return torch.cat(parts)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """What a causal LM is called with for ``batch`` to score it: no KV cache (nothing is generated), and for packed
    batches their restarting positions and no attention mask (transformers then isolates the examples; a mask or a
    cache would turn that detection off)."""
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template; instruction and chat data need one")
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if hasattr(out, "keys"):  # newer transformers return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _with_targets(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    ids = render(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return ids, labels


def _shorten(text: str, share: float) -> str:
    keep = max(0, int(len(text) * share))
    return text[:keep]


def encode_conversation(tokenizer, conversation: Conversation, max_length: int) -> tuple[list[int], list[int], bool]:
    messages = [dict(m) for m in conversation.messages]
    ids, labels = _with_targets(tokenizer, messages)
    if len(ids) <= max_length:
        return ids, labels, False
    # 1. drop the oldest exchanges, keeping a leading system message and the last exchange
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system) :]
    while len(ids) > max_length and sum(m["role"] == "assistant" for m in body) > 1:
        first_reply = next(i for i, m in enumerate(body) if m["role"] == "assistant")
        body = body[first_reply + 1 :]
        messages = system + body
        ids, labels = _with_targets(tokenizer, messages)
    # 2. shorten the last user message from its end
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    for _ in range(8):
        if len(ids) <= max_length or not users or not messages[users[-1]]["content"]:
            break
        excess = len(ids) - max_length
        user_tokens = len(
            tokenizer(messages[users[-1]]["content"], add_special_tokens=False, verbose=False)["input_ids"]
        )
        share = max(0.0, 1 - (excess + 2) / max(user_tokens, 1))
        messages[users[-1]]["content"] = _shorten(messages[users[-1]]["content"], share)
        ids, labels = _with_targets(tokenizer, messages)
    # 3. cut what is still too long (the reply) from its end
    return ids[:max_length], labels[:max_length], True


# The tokenizer calls here read whole texts and cut them into blocks (or only count them): ``verbose=False`` keeps the
# tokenizer's "longer than the model's maximum" warning, true of the text but not of what the model sees, quiet.


def _text_blocks(tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    return [b for b in blocks if len(b) > 1], 0


def encode_conversations(
    tokenizer, conversations: Sequence[Conversation], max_length: int, packing: bool = False
) -> LMEncoded:
    ids_rows, label_rows, truncated = [], [], 0
    texts = [c.text for c in conversations if c.is_text]
    for c in conversations:
        if c.is_text:
            continue
        ids, labels, cut = encode_conversation(tokenizer, c, max_length)
        if all(t == IGNORE for t in labels):
            truncated += 1
            continue  # nothing left to learn from (cannot happen unless max_length is tiny)
        ids_rows.append(ids)
        label_rows.append(labels)
        truncated += cut
    if texts:
        blocks, _ = _text_blocks(tokenizer, texts, max_length)
        ids_rows.extend(blocks)
        label_rows.extend(list(b) for b in blocks)
    segments = None
    if packing:
        ids_rows, label_rows, segments = _pack(ids_rows, label_rows, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LMEncoded(ids_rows, label_rows, truncated, pad if pad is not None else 0, segments)


def text_sample(tokenizer, texts: Sequence[str], block: int, count: int, min_tokens: int = 16) -> LMEncoded:
    """A fixed sample of general text for perplexity: the first ``block`` tokens of each of the first ``count``
    texts that have at least ``min_tokens`` tokens (every token a target). Many short excerpts rather than one long
    text, so the sample spans many documents."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:block]
        if len(ids) >= min_tokens:
            rows.append(ids)
        if len(rows) == count:
            break
    if not rows:
        raise InputError(f"no text of at least {min_tokens} tokens to measure perplexity on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LMEncoded(rows, [list(r) for r in rows], 0, pad if pad is not None else 0)


def replay_rows(tokenizer, texts: Sequence[str], max_length: int, target_tokens: int) -> list[list[int]]:
    """Blocks of ``max_length`` tokens of general text (joined by end-of-sequence tokens, in order) until they hold
    at least ``target_tokens`` tokens; fewer if the texts run out."""
    if target_tokens <= 0:
        return []
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= target_tokens + max_length:
            break
    blocks, total = [], 0
    for i in range(0, len(stream), max_length):
        if total >= target_tokens:
            break
        block = stream[i : i + max_length]
        if len(block) > 1:
            blocks.append(block)
            total += len(block)
    return blocks


def with_rows(data: LMEncoded, rows: list[list[int]], packing: bool, max_length: int) -> LMEncoded:
    """``data`` plus extra rows in which every token is a target (e.g. replayed general text), packed if asked."""
    if data.segments is not None:  # already packed: unpack into its examples first
        ids, labels = _unpack(data.input_ids, data.segments), _unpack(data.labels, data.segments)
    else:
        ids, labels = list(data.input_ids), list(data.labels)
    ids, labels = ids + rows, labels + [list(r) for r in rows]
    segments = None
    if packing:
        ids, labels, segments = _pack(ids, labels, max_length)
    return LMEncoded(ids, labels, data.truncated, data.pad_id, segments)


def _unpack(rows: list[list[int]], segments: list[list[int]]) -> list[list[int]]:
    out = []
    for row, lengths in zip(rows, segments, strict=True):
        start = 0
        for n in lengths:
            out.append(row[start : start + n])
            start += n
    return out


def _pack(ids_rows, label_rows, max_length):
    """Rows filled greedily with whole examples up to ``max_length`` tokens: (ids, labels, example lengths)."""
    packed_ids, packed_labels, segments = [], [], []
    row_ids: list[int] = []
    row_labels: list[int] = []
    row_lengths: list[int] = []
    for ids, labels in zip(ids_rows, label_rows, strict=True):
        if row_ids and len(row_ids) + len(ids) > max_length:
            packed_ids.append(row_ids)
            packed_labels.append(row_labels)
            segments.append(row_lengths)
            row_ids, row_labels, row_lengths = [], [], []
        row_ids = row_ids + ids
        row_labels = row_labels + labels
        row_lengths = row_lengths + [len(ids)]
    if row_ids:
        packed_ids.append(row_ids)
        packed_labels.append(row_labels)
        segments.append(row_lengths)
    return packed_ids, packed_labels, segments
