"""Training-free baselines for decoders, scored on the same examples as a tuned model.

- **Zero-shot**: the untuned model answers each prompt as it is (``shots = 0``).
- **In-context few-shot prompting** (Brown et al., 2020, arXiv:2005.14165): ``k`` demonstrations of the same task,
  drawn from training data only (a seeded choice per example), go before the question as earlier user / assistant
  turns. A templated example's demonstrations are rendered with its own template, so they show the exact phrasing
  and answer words expected. Replies are generated and scored like a tuned model's (exact match, answer accuracy,
  token F1).
- **PET-style prompt-based classification** (Schick & Schuetze, 2021, arXiv:2001.07676), without PET's training:
  a *pattern* turns the input into a cloze text ending where the label word goes, and a *verbalizer* maps each
  class to a word. The LM head scores every label word after the pattern::

      score(y) = sum_j log p(v(y)_j | pattern(x), v(y)_<j)          predicted class = argmax_y score(y)

  (a label word of several tokens sums its tokens' log-probabilities). Only tasks with a pattern (classification
  tasks of the template library) are scored; the raw text of each example is read from its templated record.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data.conversations import Conversation
from ..data.templates import TASKS, Example, TemplatedConversation
from .generation import generate, score


def demonstration_pool(data) -> dict[str, list]:
    """Demonstrations per task: the dataset's own pool (``SFTData.demonstrations``), else its training
    conversations of one user turn and one reply, grouped by task."""
    if data.demonstrations:
        return data.demonstrations
    pool: dict[str, list] = {}
    for c in data.splits["train"]:
        if not c.is_text and len(c.messages) == 2 and c.messages[0]["role"] == "user":
            pool.setdefault(c.task, []).append(c)
    return pool


def _demo_messages(demo, like: Conversation) -> list[dict[str, str]]:
    if isinstance(demo, Example):  # rendered in the question's template (or the task's first one)
        templates = TASKS[demo.task].templates
        template = next((t for t in templates if t.name == getattr(like, "template", "")), templates[0])
        demo = template.render(demo)
    return [dict(m) for m in demo.messages]


def few_shot_prompt(conversation: Conversation, pool: Sequence, shots: int, rng: random.Random) -> list[dict[str, str]]:
    """The conversation's prompt with ``shots`` demonstrations of its task as earlier turns (after any system
    message). Demonstrations equal to the question itself are never chosen."""
    prompt = conversation.prompt()
    question = prompt[-1]["content"]
    candidates = [d for d in pool if _demo_messages(d, conversation)[0]["content"] != question]
    demos = rng.sample(candidates, min(shots, len(candidates)))
    turns = [m for d in demos for m in _demo_messages(d, conversation)]
    system = [m for m in prompt[:1] if m["role"] == "system"]
    return system + turns + prompt[len(system) :]


def generation_baseline(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    pool: dict[str, list],
    shots: int = 0,
    max_new_tokens: int = 24,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Zero-shot (``shots = 0``) or few-shot generation on ``conversations``, scored like a tuned model."""
    prompts = []
    for i, c in enumerate(conversations):
        rng = random.Random(seed * 1_000_003 + i)
        prompts.append(few_shot_prompt(c, pool.get(c.task, []), shots, rng) if shots else c.prompt())
    replies = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    return score(conversations, replies) | {
        "shots": shots,
        "samples": [
            {"prompt": c.prompt()[-1]["content"][:200], "reply": r, "reference": c.reference()}
            for c, r in list(zip(conversations, replies, strict=True))[:3]
        ],
    }


@torch.no_grad()
def word_log_probs(model, tokenizer, prefixes: Sequence[str], words: Sequence[str], batch_size: int = 16):
    """(len(prefixes), len(words)) tensor: log p(word | prefix) summed over the word's tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    rows, spans = [], []
    for prefix in prefixes:
        ids = tokenizer(prefix)["input_ids"]
        for w in word_ids:
            rows.append(ids + w)
            spans.append((len(ids), len(ids) + len(w)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), right padding
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        logp = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for j, (a, b) in enumerate(spans[start : start + batch_size]):
            targets = ids[j, a:b].to(device)  # the word's tokens, each predicted from the position before it
            scores.append(float(logp[j, a - 1 : b - 1].gather(-1, targets[:, None]).sum()))
    model.train(was_training)
    return torch.tensor(scores).view(len(prefixes), len(words))


def pet_baseline(model, tokenizer, conversations: Sequence[Conversation], batch_size: int = 16) -> dict | None:
    """PET-style classification of the templated records whose task has a pattern; None when none has."""
    by_task: dict[str, list[Example]] = {}
    for c in conversations:
        example = c.example if isinstance(c, TemplatedConversation) else None
        if example is not None and TASKS[example.task].pet is not None:
            by_task.setdefault(example.task, []).append(example)
    if not by_task:
        return None
    tasks, right, total = {}, 0, 0
    for name, examples in by_task.items():
        pet = TASKS[name].pet
        labels = list(pet.verbalizer)
        texts = [pet.text(e) for e in examples]
        logp = word_log_probs(model, tokenizer, texts, list(pet.verbalizer.values()), batch_size)  # (N, labels)
        predicted = [labels[i] for i in logp.argmax(-1).tolist()]
        correct = sum(p == e.label for p, e in zip(predicted, examples, strict=True))
        tasks[name] = {"accuracy": correct / len(examples), "examples": len(examples)}
        right, total = right + correct, total + len(examples)
    return {"accuracy": right / total, "examples": total, "tasks": tasks}
