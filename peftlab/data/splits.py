"""Deterministic train / validation / test splits, shared by every kind of data.

A single source is shuffled with ``random.Random(split_seed)`` and cut 80/10/10. A folder's files give the splits
they name (``train.*``, ``validation.*`` / ``valid.*`` / ``dev.*`` / ``val.*``, ``test.*``); a missing test split is
replaced by the validation file, and a missing validation split is carved out of train (10%), so every source
yields all three. The notes say which of these happened.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from .readers import FORMATS

SPLITS = ("train", "validation", "test")
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "dev", "val"), "test": ("test",)}


def shuffled(items: Sequence, seed: int) -> list:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def cut(items: Sequence, fractions: Sequence[float]) -> list[list]:
    """Consecutive slices of ``items`` with the given shares (the last takes the rest)."""
    n = len(items)
    bounds = [0]
    for f in fractions[:-1]:
        bounds.append(bounds[-1] + round(n * f))
    bounds.append(n)
    return [list(items[a:b]) for a, b in itertools.pairwise(bounds)]


def split_files(folder: Path, formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    found = {}
    for split, stems in SPLIT_STEMS.items():
        for stem in stems:
            hits = [
                p
                for p in sorted(folder.iterdir())
                if p.is_file() and p.name.split(".")[0] == stem and any(s in formats for s in p.suffixes)
            ]
            if hits:
                found[split] = hits[0]
                break
    if "train" not in found:
        raise InputError(f"{folder}: no train file (expected train with one of {', '.join(formats)})")
    return found


def assign_splits(items_by_source: dict[str, list], split_seed: int, notes: list[str]) -> dict[str, list]:
    """Turn what was read (``{"all": items}`` for one source, or items per named split) into the three splits."""
    if "all" in items_by_source:
        parts = cut(shuffled(items_by_source["all"], split_seed), (0.8, 0.1, 0.1))
        notes.append(f"one source, seeded 80/10/10 split (split_seed={split_seed})")
        return dict(zip(SPLITS, parts, strict=True))
    splits = dict(items_by_source)
    if "test" not in splits:
        splits["test"] = splits.pop("validation", [])
        notes.append("no test file: the validation file serves as test")
    if "validation" not in splits:
        splits["validation"], splits["train"] = cut(shuffled(splits["train"], split_seed), (0.1, 0.9))
        notes.append(f"validation carved from train (10%, split_seed={split_seed})")
    else:
        splits["train"] = shuffled(splits["train"], split_seed)
    if not splits["test"]:
        splits["test"], splits["train"] = cut(splits["train"], (0.1, 0.9))
        notes.append(f"test carved from train (10%, split_seed={split_seed})")
    return splits


def require_splits(splits: dict[str, list], source: str) -> None:
    """Every split must hold something to train, select and test on; say which does not and why."""
    sizes = {name: len(items) for name, items in splits.items()}
    empty = [name for name in SPLITS if not sizes.get(name)]
    if empty:
        counts = ", ".join(f"{sizes.get(name, 0)} {name}" for name in SPLITS)
        raise InputError(
            f"{source}: too few examples to split ({counts}): the {empty[0]} split is empty; give at least 10 "
            "examples, or train / validation / test files"
        )
