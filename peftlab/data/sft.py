"""Supervised fine-tuning data for decoders: conversations split into train / validation / test.

``load_sft(source)`` accepts a data file of instruction, chat or raw-text records (JSON, JSONL or .txt; see
``peftlab.data.conversations``), a folder of ``train`` / ``validation`` / ``test`` files, or the name of a
packaged SFT dataset registered in ``PACKAGED_SFT`` (a function returning the conversations, already split when the
dataset defines held-out tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .conversations import Conversation, read_conversations
from .splits import assign_splits, split_files

SFT_FORMATS = (".json", ".jsonl", ".txt")


@dataclass
class SFTData:
    name: str
    splits: dict[str, list[Conversation]]
    notes: list[str] = field(default_factory=list)
    # Extra evaluation sets (e.g. tasks held out of training entirely), name -> conversations.
    extra_eval: dict[str, list[Conversation]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()} | {k: len(v) for k, v in self.extra_eval.items()}


# name -> function(split_seed) -> SFTData (packaged datasets register themselves here)
PACKAGED_SFT: dict[str, Callable[[int], SFTData]] = {}


def load_sft(source: str, split_seed: int = 0, train_limit: int | None = None) -> SFTData:
    notes: list[str] = []
    if source in PACKAGED_SFT:
        data = PACKAGED_SFT[source](split_seed)
    else:
        path = Path(source)
        if not path.exists():
            known = ", ".join(PACKAGED_SFT) or "none yet"
            raise InputError(
                f"data: {source!r} is neither a packaged SFT dataset ({known}) nor an existing file or folder"
            )
        files = split_files(path, SFT_FORMATS) if path.is_dir() else {"all": path}
        read = {split: read_conversations(file) for split, file in files.items()}
        data = SFTData(path.stem if path.is_file() else path.name, assign_splits(read, split_seed, notes), notes)
    if train_limit is not None:
        data.splits["train"] = data.splits["train"][:train_limit]
        data.notes.append(f"training set limited to the first {train_limit} conversations of the shuffled split")
    if not data.splits["train"]:
        raise InputError(f"{source}: the training split is empty")
    return data
