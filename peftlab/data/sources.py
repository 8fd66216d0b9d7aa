"""Where a task's data comes from, besides its packaged datasets: a file, a folder, or a Hugging Face Hub dataset.

``read_source`` gives every task (classify, tag, sft) the same reach. Each task passes how to read one of its
files (CSV, JSONL, CoNLL, plain text, Parquet, Arrow, ...) and how to turn table records into its items; the
result is ``(name, {split: items})`` with ``"all"`` for a source that has no splits, ready for ``assign_splits``.

- a file: read as a whole (``"all"``);
- a folder written by ``datasets`` (``save_to_disk`` of a Dataset or a DatasetDict with train / validation / test);
- any other folder: its ``train.*``, ``validation.*`` / ``dev.*`` and ``test.*`` files;
- a Hub ID (``org/name``): ``datasets.load_dataset`` with ``HubData``'s configuration, revision and split names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ..core.hub import looks_like_hub_id
from ..errors import InputError, suggest
from .splits import split_files
from .tables import HubData, HubDatasetMissing, Record, is_saved_dataset, read_hub_dataset, read_saved_dataset

Item = TypeVar("Item")


def looks_like_hub_dataset(source: str) -> bool:
    return Path(source).suffix.lower() not in SUFFIXES and looks_like_hub_id(source)


# A name ending like a data file is a file the user meant, never a Hub ID.
SUFFIXES = (
    ".csv",
    ".tsv",
    ".json",
    ".jsonl",
    ".parquet",
    ".arrow",
    ".txt",
    ".conll",
    ".bio",
    ".gz",
    ".bz2",
    ".xz",
    ".xlsx",
)


def read_source(
    source: str,
    hub: HubData,
    read_file: Callable[[Path], list[Item]],
    from_records: Callable[[list[Record]], list[Item]],
    formats: Sequence[str],
    packaged: Sequence[str],
) -> tuple[str, dict[str, list[Item]]]:
    """``(name, {split or "all": items})`` of a local file or folder or a Hub dataset. ``packaged`` are the
    task's packaged dataset names, for the error when ``source`` is none of these."""
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():  # a file (a pipe or device is refused by the reader, by name)
        if hub.splits:
            raise InputError(f"{path}: one file has no named splits; drop --train-split and its kin")
        return path.stem, {"all": read_file(path)}
    if path.is_dir():
        if is_saved_dataset(path):
            read = read_saved_dataset(path, hub)
            return path.name, {split: from_records(records) for split, records in read.items()}
        files = split_files(path, formats)
        return path.name, {split: read_file(file) for split, file in files.items()}
    not_here = (
        f"data: {source!r} is neither a packaged dataset ({', '.join(packaged) or 'none'}) nor an existing file or "
        "folder"
    )
    near = suggest(source, packaged)
    if not looks_like_hub_dataset(source):
        raise InputError(f"{not_here}, nor a Hugging Face Hub dataset ID{near}")
    try:
        read = read_hub_dataset(source, hub)
    except HubDatasetMissing as e:
        raise InputError(f"{not_here}{near}; as a Hub dataset: {e}") from None
    return source, {split: from_records(records) for split, records in read.items()}
