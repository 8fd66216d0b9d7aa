"""Instruction, chat and raw-text data for decoders, read into one shape: a conversation.

A ``Conversation`` is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``; the loss
falls on the assistant messages only. Accepted records (JSON or JSONL; a ``.txt`` file is raw text):

- instruction data: ``instruction`` (+ optional ``input``) and ``output`` -> user: instruction [+ blank line +
  input], assistant: output (the Alpaca / FLAN shape; Dolly's ``context`` and ``response`` are read the same way);
- prompt-completion data: ``prompt`` and ``completion``, as text or as lists of ``{role, content}`` messages (the
  shape TRL trains on);
- chat data: ``messages`` (a list of ``{role, content}``) or ShareGPT-style ``conversations`` (a list of
  ``{from: human|gpt|system, value}``);
- raw text for continued pre-training: a record with only ``text`` (or a ``.txt`` file, one document per blank-line
  separated paragraph block), which becomes ``Conversation(text=...)``: every token is predicted.

Records may carry ``task`` (a name used for per-task evaluation and held-out tasks) and ``answers`` (the correct
outputs for exact-match scoring, e.g. class names for verbalizer accuracy). Errors name the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .readers import read_records, read_text

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


@dataclass
class Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None  # raw text: no roles, every token is a target
    task: str = ""
    answers: list[str] = field(default_factory=list)  # acceptable final answers (exact match / verbalizer)

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def prompt(self) -> list[dict[str, str]]:
        """The messages before the last assistant reply (what a model is asked at evaluation)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    def reference(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")


def _string(value: object, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be text, found {type(value).__name__}")
    return value


def _messages(raw: object, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: {key!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InputError(f"{where}: {key}[{i}] must be an object, found {type(m).__name__}")
        if key == "conversations":
            speaker = str(m.get("from", ""))
            if speaker.lower() not in SHAREGPT_ROLES:
                raise InputError(f"{where}: {key}[{i}] has from={speaker!r}; expected human, gpt or system")
            role, content = SHAREGPT_ROLES[speaker.lower()], m.get("value")
        else:
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise InputError(f"{where}: {key}[{i}] has role={role!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _string(content, where, f"{key}[{i}] content")})
    if not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{where}: {key!r} has no assistant message to learn from")
    return out


def _prompt_completion(prompt: object, completion: object, where: str, task: str, answers: list) -> Conversation:
    if isinstance(prompt, str) and isinstance(completion, str):
        if not prompt.strip() or not completion.strip():
            raise InputError(f"{where}: 'prompt' and 'completion' must not be empty")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return Conversation(messages, task=task, answers=answers)
    if isinstance(prompt, list) and isinstance(completion, list):
        return Conversation(_messages(prompt + completion, where, "prompt"), task=task, answers=answers)
    raise InputError(f"{where}: 'prompt' and 'completion' must both be text or both lists of messages")


def conversation_from_record(row: dict, where: str) -> Conversation:
    task = str(row.get("task", ""))
    answers = row.get("answers") or []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: 'answers' must be a list of strings")
    if "messages" in row:
        return Conversation(_messages(row["messages"], where, "messages"), task=task, answers=answers)
    if "conversations" in row:
        return Conversation(_messages(row["conversations"], where, "conversations"), task=task, answers=answers)
    if "prompt" in row and "completion" in row:
        return _prompt_completion(row["prompt"], row["completion"], where, task, answers)
    if "instruction" in row or "output" in row or "response" in row:
        answer_key = "output" if "output" in row or "response" not in row else "response"
        input_key = "input" if "input" in row or "context" not in row else "context"
        instruction = _string(row.get("instruction"), where, "instruction")
        output = _string(row.get(answer_key), where, answer_key)
        extra = row.get(input_key) or ""
        prompt = instruction if not extra else f"{instruction}\n\n{_string(extra, where, input_key)}"
        if not prompt.strip() or not output.strip():
            raise InputError(f"{where}: 'instruction' and {answer_key!r} must not be empty")
        return Conversation(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], task=task, answers=answers
        )
    if "text" in row:
        text = _string(row["text"], where, "text")
        if not text.strip():
            raise InputError(f"{where}: 'text' is empty")
        return Conversation(text=text, task=task)
    raise InputError(
        f"{where}: expected 'messages', 'conversations', 'instruction'/'output', 'prompt'/'completion' or 'text'; "
        f"found {', '.join(map(str, row)) or 'no fields'}"
    )


def read_conversations(path: str | Path) -> list[Conversation]:
    path = Path(path)
    if path.suffix.lower() == ".txt":
        blocks = [b.strip() for b in read_text(path).split("\n\n")]
        return [Conversation(text=b) for b in blocks if b]
    return [conversation_from_record(row, where) for where, row in read_records(path)]
