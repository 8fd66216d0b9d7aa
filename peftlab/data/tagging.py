"""Sequence labelling (named entities and other BIO tagging): words with one tag each.

Sources: the packaged ``wnut16`` (Twitter NER, 10 entity types), a CoNLL-style text file (``.conll``, ``.bio``,
``.txt``: one ``word<TAB or space>tag`` per line, a blank line between sentences), a JSON/JSONL, Parquet or Arrow
file of records with ``tokens`` and ``tags`` (or ``ner_tags``, as Hugging Face datasets name them) lists, a folder
of ``train`` / ``validation`` / ``test`` files of those kinds, a folder written by ``datasets`` or a Hub dataset ID.
Tags stored as class indices (``ClassLabel``) are read as their names.

Encoding: words are tokenised together (``is_split_into_words``); the first sub-word of each word carries the
word's tag and the others get -100 (no loss, not scored), the usual convention. A sentence longer than
``max_length`` sub-words is cut at the end; its cut words are counted as predicted ``O`` at evaluation, so the
score stays honest about them.

Scoring follows conlleval: an entity is a maximal run ``B-X I-X ...`` (an ``I-X`` after ``O`` or after another type
also starts one); precision, recall and F1 are micro-averaged over exact (type, start, end) matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..assets import locate
from ..errors import InputError
from .batches import padded
from .readers import Record, read_records, read_text
from .sources import read_source
from .splits import assign_splits, require_splits
from .tables import HubData

TAG_FORMATS = (".conll", ".bio", ".txt", ".json", ".jsonl", ".parquet", ".arrow")
RECORD_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".gz", ".bz2", ".xz")
TAG_COLUMNS = ("tags", "ner_tags")


@dataclass
class Sentence:
    words: list[str]
    tags: list[int]


@dataclass
class TaggingData:
    name: str
    labels: list[str]  # tag names; index 0 is "O" when present
    splits: dict[str, list[Sentence]]
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


def _read_conll(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(location, words, tags) per sentence of a CoNLL-style file."""
    sentences, words, tags, start = [], [], [], 1
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            if words:
                sentences.append((f"{path}:{start}", words, tags))
            words, tags, start = [], [], number + 1
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        parts = [p for p in parts if p != ""]
        if len(parts) < 2:
            raise InputError(f"{path}:{number}: expected 'word<TAB>tag', found {line.strip()!r}")
        words.append(parts[0])
        tags.append(parts[-1].strip())
    if words:
        sentences.append((f"{path}:{start}", words, tags))
    if not sentences:
        raise InputError(f"{path}: no sentences found")
    return sentences


def _tagged_records(records: list[Record]) -> list[tuple[str, list[str], list[str]]]:
    out = []
    for where, row in records:
        words = row.get("tokens")
        tags = next((row[c] for c in TAG_COLUMNS if c in row), None)
        if not isinstance(words, list) or not isinstance(tags, list):
            raise InputError(
                f"{where}: expected 'tokens' and 'tags' (or 'ner_tags') lists; found {', '.join(map(str, row))}"
            )
        if len(words) != len(tags) or not words:
            raise InputError(
                f"{where}: 'tokens' and 'tags' must be non-empty and of equal length ({len(words)} and {len(tags)})"
            )
        if not all(isinstance(w, str) and w for w in words) or not all(isinstance(t, str) and t for t in tags):
            raise InputError(f"{where}: every token and tag must be non-empty text")
        out.append((where, words, tags))
    return out


def read_tagged(path: Path) -> list[tuple[str, list[str], list[str]]]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in RECORD_SUFFIXES and ".conll" not in suffixes:
        return _tagged_records(read_records(path))
    return _read_conll(path)


def _check_tags(sentences, labels: set[str] | None = None) -> None:
    for where, _, tags in sentences:
        for tag in tags:
            if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
                raise InputError(f"{where}: tag {tag!r} is not BIO (expected O, B-TYPE or I-TYPE)")
            if labels is not None and tag not in labels:
                raise InputError(f"{where}: tag {tag!r} never occurs in the training split")


def _wnut16(folder: Path) -> list[tuple[str, list[str], list[str]]]:
    """The packaged file separates sentences by a line holding only a tab; normalise, then read as CoNLL."""
    text = (folder / "ner.txt").read_text(encoding="utf-8")
    lines = ["" if not line.strip() else line for line in text.splitlines()]
    sentences, words, tags = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line:
            if words:
                sentences.append((f"wnut16:{number}", words, tags))
            words, tags = [], []
            continue
        word, _, tag = line.rpartition("\t")
        words.append(word)
        tags.append(tag.strip())
    if words:
        sentences.append(("wnut16:end", words, tags))
    return sentences


PACKAGED_TAGGING = {"wnut16": _wnut16}


def load_tagging(
    source: str,
    split_seed: int = 0,
    train_limit: int | None = None,
    quiet: bool = False,
    hub: HubData | None = None,
) -> TaggingData:
    notes: list[str] = []
    if source in PACKAGED_TAGGING:
        name, read = source, {"all": PACKAGED_TAGGING[source](locate(source, quiet=quiet))}
    else:
        name, read = read_source(
            source, hub or HubData(), read_tagged, _tagged_records, TAG_FORMATS, list(PACKAGED_TAGGING)
        )
    splits = assign_splits(read, split_seed, notes)
    if train_limit is not None:
        splits["train"] = splits["train"][:train_limit]
        notes.append(f"training set limited to the first {train_limit} sentences of the shuffled split")
    _check_tags(splits["train"])
    names = {t for _, _, tags in splits["train"] for t in tags}
    labels = ["O"] + sorted(names - {"O"}, key=lambda t: (t[2:], t[0]))
    for split in ("validation", "test"):
        _check_tags(splits[split], set(labels))
    require_splits(splits, source)  # after the tags: a wrong tag is the more useful message
    index = {t: i for i, t in enumerate(labels)}
    data = {k: [Sentence(words, [index[t] for t in tags]) for _, words, tags in v] for k, v in splits.items()}
    return TaggingData(name, labels, data, notes)


@dataclass
class TagEncoded:
    input_ids: list[list[int]]
    labels: list[list[int]]  # per sub-word: the word's tag on its first sub-word, else -100
    words: list[list[int]]  # gold tag per word (all words, also those cut by truncation)
    first_subword: list[list[int]]  # position of each kept word's first sub-word
    truncated: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = padded(self.input_ids, None, indices, self.pad_id)
        labels = torch.full(out["input_ids"].shape, -100, dtype=torch.long)  # (B, T): padding is ignored
        for j, i in enumerate(indices):
            labels[j, : len(self.input_ids[i])] = torch.tensor(self.labels[i])
        out["labels"] = labels
        return {k: v.to(device) for k, v in out.items()}


def encode_tagging(sentences: Sequence[Sentence], tokenizer, max_length: int) -> TagEncoded:
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("sequence labelling needs a fast tokenizer (tokenizer.json) to align words and sub-words")
    enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    ids_rows, label_rows, firsts, truncated = [], [], [], 0
    for i, s in enumerate(sentences):
        word_ids = enc.word_ids(i)
        labels, first, seen = [], [], set()
        for position, w in enumerate(word_ids):
            if w is None or w in seen:
                labels.append(-100)
                continue
            seen.add(w)
            labels.append(s.tags[w])
            first.append(position)
        truncated += len(first) < len(s.words)
        ids_rows.append(enc["input_ids"][i])
        label_rows.append(labels)
        firsts.append(first)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TagEncoded(ids_rows, label_rows, [s.tags for s in sentences], firsts, truncated, pad)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of every entity in a BIO tag sequence, read as conlleval reads it."""
    found, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, this = tag.partition("-") if tag != "O" else ("O", "", "")
        continues = prefix == "I" and this == kind
        if start is not None and not continues:
            found.add((kind, start, i))
            start, kind = None, None
        if prefix in ("B", "I") and not continues:
            start, kind = i, this
    return found


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
    tp = n_pred = n_gold = correct_tokens = total_tokens = 0
    for g, p in zip(gold, predicted, strict=True):
        ge, pe = entities(g), entities(p)
        tp += len(ge & pe)
        n_pred += len(pe)
        n_gold += len(ge)
        correct_tokens += sum(a == b for a, b in zip(g, p, strict=True))
        total_tokens += len(g)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "accuracy": correct_tokens / max(total_tokens, 1),
        "entities": n_gold,
        "examples": len(gold),
    }
