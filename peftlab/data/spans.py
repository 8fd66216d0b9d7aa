"""Extractive span prediction (reading comprehension): a question, a passage, and the passage's span that answers it.

Sources: the packaged ``wnut16_spans`` (below), or any file, folder or Hub dataset in SQuAD's layout: records with
``question``, ``context`` and ``answers`` = ``{"text": [...], "answer_start": [...]}`` (SQuAD v2: empty lists mean
the passage holds no answer); flat ``answer_text`` / ``answer_start`` columns (one answer, empty text for none) work
too, and so does SQuAD's own nested JSON (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``). Every answer must
sit at its ``answer_start`` in the context, else a one-line error names the row.

``wnut16_spans`` is built from WNUT-16's gold entities, since no package ships an extractive QA set: the passage is
a tweet (its words joined by spaces), and for each entity type present in it the question "Which <type> is
mentioned?" is answered by every span of that type (the first is the training target; any of them counts as right,
as SQuAD scores several references). No-answer questions ask for types the tweet lacks: one per answerable question
of the tweet (as many as there are absent types), and one for every third tweet without entities, chosen by a
generator seeded with the tweet's position in the file, so the set is the same on every machine. The tweets are split
as ``--task tag --data wnut16`` splits them (seeded 80/10/10), so no tweet asks questions in two splits. The set holds
1,212 answerable and 1,726 unanswerable questions (41 % / 59 %), whatever the split seed.

Encoding (``encode_spans``): the question and the passage go in as a pair, the passage cut into windows of at most
``max_length`` tokens that overlap by ``stride`` tokens (``truncation="only_second"``), so a long passage is read
whole. Each window (a *feature*) trains on the first answer's start and end tokens when the answer lies entirely
inside the window's passage part, else on position 0 ([CLS]), as for a question without an answer. The offset
mapping of each window's passage tokens maps predicted tokens back to characters at evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..assets import locate
from ..errors import InputError
from .batches import padded
from .readers import Record, read_records
from .sources import read_source
from .splits import assign_splits, require_splits
from .tables import HubData

SPAN_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow")


@dataclass
class SpanExample:
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character start in context); empty: the passage holds no answer
    id: str = ""


@dataclass
class SpanData:
    name: str
    splits: dict[str, list[SpanExample]]
    notes: list[str] = field(default_factory=list)
    labels: None = None  # no classes: the answer is a span

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


# --- reading ----------------------------------------------------------------------------------------------------


def _text(where: str, row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        found = ", ".join(map(str, row)) or "nothing"
        raise InputError(f"{where}: column {name!r} is missing or empty; expected text (found {found})")
    return value


def _answers(where: str, row: dict) -> list[tuple[str, int]]:
    """(text, start) pairs of a row in SQuAD's ``answers`` layout or flat ``answer_text`` / ``answer_start``."""
    if "answers" in row:
        answers = row["answers"]
        if isinstance(answers, list):  # SQuAD's own JSON: [{"text", "answer_start"}, ...]
            texts = [a.get("text") if isinstance(a, dict) else None for a in answers]
            starts = [a.get("answer_start") if isinstance(a, dict) else None for a in answers]
        elif isinstance(answers, dict) and "text" in answers and "answer_start" in answers:
            texts, starts = answers["text"], answers["answer_start"]
        else:
            raise InputError(
                f"{where}: field 'answers' must hold 'text' and 'answer_start' lists (SQuAD's layout), "
                f"found {str(answers)[:80]!r}"
            )
        texts, starts = list(texts if texts is not None else []), list(starts if starts is not None else [])
    elif "answer_text" in row and "answer_start" in row:
        text, start = row["answer_text"], row["answer_start"]
        empty = text is None or (isinstance(text, str) and not text) or (isinstance(start, float) and start != start)
        texts, starts = ([], []) if empty else ([text], [start])
    else:
        found = ", ".join(map(str, row))
        raise InputError(
            f"{where}: no answers: expected an 'answers' field ({{'text': [...], 'answer_start': [...]}}) or "
            f"'answer_text' and 'answer_start' columns (found {found})"
        )
    if len(texts) != len(starts):
        raise InputError(
            f"{where}: 'answers' has {len(texts)} texts but {len(starts)} answer_start values; expected one each"
        )
    out = []
    for text, start in zip(texts, starts, strict=True):
        if not isinstance(text, str) or not text:
            raise InputError(f"{where}: an answer text is {text!r}; expected non-empty text")
        try:
            position = int(start)
        except (TypeError, ValueError):
            raise InputError(f"{where}: answer_start {start!r} of answer {text!r} is not an integer") from None
        if isinstance(start, float) and start != position:
            raise InputError(f"{where}: answer_start {start!r} of answer {text!r} is not an integer")
        out.append((text, position))
    return out


def _example(where: str, row: dict) -> SpanExample:
    question, context = _text(where, row, "question"), _text(where, row, "context")
    answers = _answers(where, row)
    for text, start in answers:
        found = context[start : start + len(text)] if start >= 0 else ""
        if found != text:
            raise InputError(
                f"{where}: answer {text!r} is not at answer_start {start} of the context "
                f"(the context there reads {found!r})"
            )
    return SpanExample(question, context, answers, str(row.get("id", where)))


def _squad_articles(where: str, row: dict) -> list[tuple[str, dict]]:
    """SQuAD's nested JSON: one record per question of every paragraph of an article."""
    out = []
    for p, paragraph in enumerate(row["paragraphs"]):
        if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
            raise InputError(f"{where} paragraph {p}: expected 'context' and a 'qas' list")
        for q, qa in enumerate(paragraph["qas"]):
            if not isinstance(qa, dict):
                raise InputError(f"{where} paragraph {p} question {q}: expected an object")
            answers = [] if qa.get("is_impossible") else qa.get("answers", [])
            record = {"context": paragraph.get("context"), **qa, "answers": answers}
            out.append((f"{where} paragraph {p} question {q}", record))
    return out


def span_records(records: list[Record]) -> list[SpanExample]:
    out = []
    for where, row in records:
        if isinstance(row.get("paragraphs"), list):
            out += [_example(w, r) for w, r in _squad_articles(where, row)]
        else:
            out.append(_example(where, row))
    return out


def read_spans(path) -> list[SpanExample]:
    return span_records(read_records(path))


# --- the packaged set, from WNUT-16's entities -------------------------------------------------------------------

QUESTIONS = {
    "person": "Which person is mentioned?",
    "geo-loc": "Which location is mentioned?",
    "company": "Which company is mentioned?",
    "product": "Which product is mentioned?",
    "facility": "Which facility is mentioned?",
    "musicartist": "Which music artist is mentioned?",
    "movie": "Which movie is mentioned?",
    "sportsteam": "Which sports team is mentioned?",
    "tvshow": "Which TV show is mentioned?",
    "other": "Which other named entity is mentioned?",
}
EMPTY_TWEETS_ASKED = 3  # one tweet in this many without entities gets a no-answer question


def tweet_questions(position: int, where: str, words: list[str], tags: list[str]) -> list[SpanExample]:
    """The questions of one tweet: its present entity types (all their spans as answers), then the sampled
    no-answer types, drawn by a generator seeded with the tweet's ``position`` in the file."""
    from .tagging import entities

    context = " ".join(words)
    starts = [0]
    for word in words[:-1]:
        starts.append(starts[-1] + len(word) + 1)
    found: dict[str, list[tuple[str, int]]] = {}
    for kind, first, end in sorted(entities(tags), key=lambda e: (e[1], e[2])):
        found.setdefault(kind, []).append((" ".join(words[first:end]), starts[first]))
    unknown = sorted(set(found) - set(QUESTIONS))
    if unknown:
        raise InputError(f"{where}: entity type {unknown[0]!r} has no question")
    rng = random.Random(position)
    absent = [kind for kind in QUESTIONS if kind not in found]
    wanted = len(found) if found else int(rng.randrange(EMPTY_TWEETS_ASKED) == 0)
    unanswerable = rng.sample(absent, min(wanted, len(absent)))
    kinds = [k for k in QUESTIONS if k in found] + unanswerable
    return [SpanExample(QUESTIONS[k], context, found.get(k, []), f"{where}:{k}") for k in kinds]


def wnut16_tweets(folder) -> list[tuple[str, list[str], list[str]]]:
    from .tagging import _wnut16

    return _wnut16(folder)


PACKAGED_SPANS = {"wnut16_spans": "wnut16"}  # name -> the packaged asset it is built from


def _packaged(name: str, split_seed: int, quiet: bool, notes: list[str]) -> dict[str, list[SpanExample]]:
    tweets = wnut16_tweets(locate(PACKAGED_SPANS[name], quiet=quiet))
    numbered = [(i, *t) for i, t in enumerate(tweets)]
    splits = assign_splits({"all": numbered}, split_seed, notes)  # the tweets split as --task tag splits them
    notes.append("questions built from WNUT-16's gold entities: one per present type, plus sampled no-answer ones")
    return {s: [q for i, where, w, t in items for q in tweet_questions(i, where, w, t)] for s, items in splits.items()}


def load_spans(
    source: str,
    split_seed: int = 0,
    train_limit: int | None = None,
    quiet: bool = False,
    hub: HubData | None = None,
) -> SpanData:
    notes: list[str] = []
    if source in PACKAGED_SPANS:
        name, splits = source, _packaged(source, split_seed, quiet, notes)
    else:
        name, read = read_source(source, hub or HubData(), read_spans, span_records, SPAN_FORMATS, list(PACKAGED_SPANS))
        splits = assign_splits(read, split_seed, notes)
    if train_limit is not None:
        splits["train"] = splits["train"][:train_limit]
        notes.append(f"training set limited to the first {train_limit} questions of the shuffled split")
    require_splits(splits, source)
    answered = {s: sum(bool(e.answers) for e in v) for s, v in splits.items()}
    notes.append(
        "questions with an answer / without: "
        + ", ".join(f"{s} {answered[s]} / {len(v) - answered[s]}" for s, v in splits.items())
    )
    return SpanData(name, splits, notes)


# --- encoding ---------------------------------------------------------------------------------------------------


@dataclass
class SpanEncoded:
    """Features (windows) of span examples: what the model reads, and how to map its tokens back."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    starts: list[int]  # training target per feature: the answer's first token, 0 ([CLS]) when outside the window
    ends: list[int]
    example: list[int]  # the example each feature comes from
    offsets: list[list[tuple[int, int] | None]]  # per token: its characters in the context, None outside it
    examples: list[SpanExample]
    truncated: int  # examples whose passage needed more than one window
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = padded(self.input_ids, self.token_type_ids, indices, self.pad_id)
        out["start_positions"] = torch.tensor([self.starts[i] for i in indices])
        out["end_positions"] = torch.tensor([self.ends[i] for i in indices])
        return {k: v.to(device) for k, v in out.items()}


def answer_tokens(offsets: Sequence[tuple[int, int] | None], start: int, end: int) -> tuple[int, int]:
    """The first and last token of characters ``[start, end)`` in one window, or (0, 0) when the window's passage
    part does not hold them all."""
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:
        return 0, 0
    first = max(i for i in inside if offsets[i][0] <= start)
    last = min(i for i in inside if offsets[i][1] >= end)
    return (first, last) if first <= last else (0, 0)


def _cut_question(question: str, tokenizer, most: int) -> str:
    """The question, cut to at most ``most`` tokens (at a token's end), so every window keeps room for passage."""
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= most:
        return question
    return question[: enc["offset_mapping"][most - 1][1]]


def encode_spans(examples: Sequence[SpanExample], tokenizer, max_length: int, stride: int | None = None) -> SpanEncoded:
    """Question/passage pairs in windows of at most ``max_length`` tokens overlapping by ``stride`` (default
    ``max_length // 4``); questions longer than half of ``max_length`` are cut."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("span prediction needs a fast tokenizer (tokenizer.json) to map tokens to characters")
    stride = max_length // 4 if stride is None else stride
    most = max_length // 2
    room = max_length - most - tokenizer.num_special_tokens_to_add(pair=True)
    if not 0 <= stride < room:
        raise InputError(
            f"doc_stride: {stride} tokens of overlap leave no progress: windows of {max_length} tokens hold "
            f"{room} passage tokens after a question of up to {most}; use a stride from 0 to {room - 1}"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = SpanEncoded([], None, [], [], [], [], list(examples), 0, pad)
    if not examples:
        return out
    questions = [_cut_question(e.question, tokenizer, most) for e in examples]
    enc = tokenizer(
        questions,
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    types = enc.get("token_type_ids")
    out.token_type_ids = [] if types is not None else None
    windows = [0] * len(examples)
    for f, e in enumerate(enc["overflow_to_sample_mapping"]):
        sequence = enc.sequence_ids(f)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][f], sequence, strict=True)]
        answers = examples[e].answers
        first, last = (0, 0)
        if answers:
            text, start = answers[0]
            first, last = answer_tokens(offsets, start, start + len(text))
        out.input_ids.append(enc["input_ids"][f])
        if out.token_type_ids is not None:
            out.token_type_ids.append(types[f])
        out.starts.append(first)
        out.ends.append(last)
        out.example.append(e)
        out.offsets.append(offsets)
        windows[e] += 1
    out.truncated = sum(n > 1 for n in windows)
    return out
