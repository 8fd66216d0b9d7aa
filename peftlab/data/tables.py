"""Records from the formats the Hugging Face ecosystem stores data in: Parquet and Arrow files, folders written by
``datasets`` (``save_to_disk``), and datasets on the Hugging Face Hub.

Each record comes back as ``(location, row)`` like the text readers' (``data.parquet row 12``,
``org/name[train] row 3``), so the task's checks name the row that is wrong. A column of class labels
(``ClassLabel``, also inside a sequence as NER tags are stored) comes back as the class names.

Hub datasets go through ``datasets.load_dataset``, which downloads when the hub is reachable and otherwise uses
what it prepared before. When it cannot reach the hub and has prepared nothing, the dataset's files are read from
the Hugging Face hub cache (``huggingface_hub``'s snapshot, as ``hf download`` or an earlier download left it).
``datasets`` and ``pyarrow`` are imported only when one of these sources is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.hub import first_line, hub_cache, offline_reason
from ..errors import InputError
from .splits import SPLIT_STEMS

Record = tuple[str, dict]
TABLE_FORMATS = (".parquet", ".arrow")


class Rows(list):
    """A table's records, plus where they come from and the class names its ClassLabel columns declare, in their
    order (column -> names), so a classifier's label ids can follow the dataset's own."""

    def __init__(self, records: list[Record], source: str, classes: dict[str, list[str]]):
        super().__init__(records)
        self.source = source
        self.classes = classes


class HubDatasetMissing(InputError):
    """The Hub has no such dataset, or it cannot be reached and the cache does not hold it."""


@dataclass(frozen=True)
class HubData:
    """Which part of a Hub dataset (or of a saved DatasetDict) to read."""

    config: str | None = None  # the dataset's configuration (subset)
    revision: str | None = None  # branch, tag or commit of a Hub dataset
    splits: dict[str, str] = field(default_factory=dict)  # our split (train/validation/test) -> the source's split


# --- values ----------------------------------------------------------------------------------------------------


def _class_namer(feature) -> Callable[[Any], Any] | None:
    """A function turning a ClassLabel column's integers (or a sequence of them) into class names."""
    from datasets import ClassLabel

    def name(label: ClassLabel, value):
        return label.int2str(value) if isinstance(value, int) and 0 <= value < label.num_classes else value

    if isinstance(feature, ClassLabel):
        return lambda v: name(feature, v)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return lambda v: [name(inner, x) for x in v] if isinstance(v, list) else v
    return None


def table_records(table, features, where: str) -> Rows:
    """``(location, row)`` per row of a pyarrow table; ``features`` (datasets.Features or None) name the classes."""
    from datasets import ClassLabel

    namers, classes = {}, {}
    for column, feature in (features or {}).items():
        namer = _class_namer(feature)
        if namer:
            namers[column] = namer
        if isinstance(feature, ClassLabel):
            classes[column] = list(feature.names)
    records = []
    for i, row in enumerate(table.to_pylist()):
        for column, namer in namers.items():
            if column in row:
                row[column] = namer(row[column])
        records.append((f"{where} row {i}", row))
    return Rows(records, where, classes)


def dataset_records(dataset, where: str) -> Rows:
    """``(location, row)`` per row of a ``datasets.Dataset``."""
    return table_records(dataset.data.table, dataset.features, where)


def _features_of(schema):
    from datasets import Features

    try:
        return Features.from_arrow_schema(schema)
    except (TypeError, ValueError, KeyError):  # a schema datasets cannot describe: plain values, no class names
        return None


# --- files -----------------------------------------------------------------------------------------------------


def read_table_file(path: Path) -> Rows:
    """The rows of a Parquet or Arrow (IPC stream or file) table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .readers import require_data_file

    require_data_file(path)
    kind = "Parquet" if path.suffix.lower() == ".parquet" else "Arrow"
    try:
        table = pq.read_table(path) if kind == "Parquet" else _read_arrow(path, pa)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the {kind} file ({first_line(e)})") from None
    records = table_records(table, _features_of(table.schema), str(path))
    if not records:
        raise InputError(f"{path}: data file has no rows")
    return records


def _read_arrow(path: Path, pa):
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


# --- folders written by datasets -------------------------------------------------------------------------------


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def read_saved_dataset(folder: Path, hub: HubData) -> dict[str, list[Record]]:
    """``{"all": records}`` for a saved Dataset, the chosen splits' records for a saved DatasetDict."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{folder}: cannot read the saved dataset ({first_line(e)})") from None
    if isinstance(saved, Dataset):
        if hub.splits:
            raise InputError(f"{folder}: holds one dataset without splits; drop --train-split and its kin")
        return {"all": dataset_records(saved, str(folder))}
    assert isinstance(saved, DatasetDict)
    chosen = choose_splits(list(saved), hub, str(folder))
    return {ours: dataset_records(saved[theirs], f"{folder}[{theirs}]") for ours, theirs in chosen.items()}


def choose_splits(available: list[str], hub: HubData, source: str) -> dict[str, str]:
    """Our split -> the source's split: the one asked for, else the usual names (train; validation, valid, dev,
    val; test). Validation and test may be missing (they are then carved out of train)."""
    chosen = {}
    for ours, usual in SPLIT_STEMS.items():
        asked = hub.splits.get(ours)
        if asked is not None:
            if asked not in available and "[" not in asked:
                raise InputError(f"{source}: no split {asked!r} (--{ours}-split); splits: {', '.join(available)}")
            chosen[ours] = asked
            continue
        found = next((name for name in usual if name in available), None)
        if found is not None:
            chosen[ours] = found
    if "train" not in chosen:
        raise InputError(f"{source}: no train split (splits: {', '.join(available)}); choose one with --train-split")
    return chosen


# --- the Hugging Face Hub --------------------------------------------------------------------------------------


def read_hub_dataset(repo_id: str, hub: HubData) -> dict[str, list[Record]]:
    """The chosen splits of a Hub dataset, through ``datasets`` (or the hub cache when the hub is unreachable)."""
    import datasets

    source = repo_id + (f" ({hub.config})" if hub.config else "")
    loaded = _load_hub(repo_id, hub, source)
    chosen = choose_splits(list(loaded), hub, source)
    out = {}
    for ours, theirs in chosen.items():
        # a name not among the loaded splits is a slice such as "train[:2000]" or "train[90%:]"
        part = loaded[theirs] if theirs in loaded else _load_hub(repo_id, hub, source, split=theirs)
        assert isinstance(part, datasets.Dataset)
        out[ours] = dataset_records(part, f"{repo_id}[{theirs}]")
    return out


def _load_hub(repo_id: str, hub: HubData, source: str, split: str | None = None):
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    try:
        try:
            return load_dataset(repo_id, hub.config, revision=hub.revision, split=split)
        except ConnectionError:
            folder = _cached_snapshot(repo_id, hub.revision)
            return load_dataset(str(folder), hub.config, split=split)
    except DatasetNotFoundError as e:
        raise HubDatasetMissing(first_line(e)) from None
    except InputError:
        raise
    except (ValueError, FileNotFoundError, KeyError) as e:
        hint = "; choose one with --data-config" if "config" in str(e).lower() else ""
        raise InputError(f"data: {source}: {first_line(e)}{hint}") from None
    except (ConnectionError, OSError) as e:
        raise InputError(f"data: cannot fetch {source} from the Hugging Face Hub ({first_line(e)})") from None


def _cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The dataset's files in the Hugging Face hub cache, for when the hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        raise HubDatasetMissing(
            f"dataset {repo_id!r}{at} is not in the Hugging Face cache ({hub_cache()}) and the hub "
            f"cannot be reached ({offline_reason()}); download it once where the hub is reachable "
            f"(hf download --repo-type dataset {repo_id})"
        ) from None
