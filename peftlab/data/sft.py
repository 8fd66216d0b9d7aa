"""Supervised fine-tuning data for decoders: conversations split into train / validation / test.

``load_sft(source)`` accepts a data file of instruction, chat or raw-text records (JSON, JSONL, Parquet, Arrow or
.txt; see ``peftlab.data.conversations``), a folder of ``train`` / ``validation`` / ``test`` files, a folder written
by ``datasets``, a Hugging Face Hub dataset ID (``tatsu-lab/alpaca``; see ``peftlab.data.sources``), or the name of
a packaged SFT dataset registered in ``PACKAGED_SFT`` (a function returning the conversations, already split when the
dataset defines held-out tasks):

- ``instruct_mix``: the instruction mixture of ``peftlab.data.templates`` (several templated tasks, two held out);
- ``chitchat``: multi-turn dialogues; the first speaker is the user, the other the assistant, consecutive messages
  of one speaker form one turn; each dialogue is cut into windows of ``CHITCHAT_TURNS`` turns (history in context,
  the loss on every assistant turn of the window), split by dialogue so no dialogue spans two splits;
- ``chatterbot_qa``: question -> answer (task ``open_qa``; every alternative answer is acceptable) and the corpus's
  few scripted dialogues, multi-turn;
- ``shakespeare`` (one document per scene) and ``news_articles`` (title and text): raw text, every token a target,
  for continued pre-training, replay and forgetting measurements (``text_documents``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import locate
from ..errors import InputError
from .conversations import Conversation, conversation_from_record, read_conversations
from .sources import read_source
from .splits import assign_splits, require_splits
from .tables import HubData

SFT_FORMATS = (".json", ".jsonl", ".txt", ".parquet", ".arrow")


@dataclass
class SFTData:
    name: str
    splits: dict[str, list[Conversation]]
    notes: list[str] = field(default_factory=list)
    # Extra evaluation sets (e.g. tasks held out of training entirely), name -> conversations.
    extra_eval: dict[str, list[Conversation]] = field(default_factory=dict)
    # In-context demonstrations per task for the few-shot baseline (drawn from training data only).
    demonstrations: dict[str, list] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()} | {k: len(v) for k, v in self.extra_eval.items()}


# name -> function(split_seed) -> SFTData (packaged datasets register themselves here)
PACKAGED_SFT: dict[str, Callable[[int], SFTData]] = {}


def load_sft(
    source: str,
    split_seed: int = 0,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    hub: HubData | None = None,
) -> SFTData:
    notes: list[str] = []
    if source in PACKAGED_SFT:
        data = PACKAGED_SFT[source](split_seed)
    else:
        name, read = read_source(
            source,
            hub or HubData(),
            read_conversations,
            lambda records: [conversation_from_record(row, where) for where, row in records],
            SFT_FORMATS,
            list(PACKAGED_SFT),
        )
        data = SFTData(name, assign_splits(read, split_seed, notes), notes)
        require_splits(data.splits, source)
    if train_limit is not None:
        data.splits["train"] = data.splits["train"][:train_limit]
        data.notes.append(f"training set limited to the first {train_limit} conversations of the shuffled split")
    if eval_limit is not None:
        for split in ("validation", "test"):
            data.splits[split] = data.splits[split][:eval_limit]
        data.extra_eval = {k: v[:eval_limit] for k, v in data.extra_eval.items()}
        data.notes.append(f"validation, test and extra evaluation sets limited to their first {eval_limit} items")
    if not data.splits["train"]:
        raise InputError(f"{source}: the training split is empty")
    return data


# --- packaged datasets -------------------------------------------------------------------------------------------

CHITCHAT_TURNS = 8  # turns (user + assistant messages) per chitchat training window


def _windows(turns: list[str], size: int) -> list[Conversation]:
    """Consecutive windows of ``size`` alternating turns, the first speaker as user; a window ends on a reply."""
    out = []
    for start in range(0, len(turns), size):
        window = turns[start : start + size]
        if len(window) % 2:
            window = window[:-1]
        if window:
            roles = ["user", "assistant"] * (len(window) // 2)
            out.append(Conversation([{"role": r, "content": t} for r, t in zip(roles, window, strict=True)]))
    return out


def _chitchat(split_seed: int) -> SFTData:
    from .corpora import chitchat_dialogues

    notes: list[str] = []
    dialogues = chitchat_dialogues(locate("chitchat"))
    by_split = assign_splits({"all": dialogues}, split_seed, notes)
    splits = {name: [c for d in ds for c in _windows(d, CHITCHAT_TURNS)] for name, ds in by_split.items()}
    for convs in splits.values():
        for c in convs:
            c.task = "chitchat"
    notes.append(f"{len(dialogues)} dialogues split by dialogue, cut into windows of {CHITCHAT_TURNS} turns")
    return SFTData("chitchat", splits, notes)


def _chatterbot(split_seed: int) -> SFTData:
    from .corpora import chatterbot

    items, dialogues = chatterbot(locate("chatterbot_qa"))
    convs = [
        Conversation(
            [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.answers[0]}],
            task="open_qa",
            answers=list(q.answers),
        )
        for q in items
    ]
    convs += [c for _, turns in dialogues for c in _windows(turns, len(turns))]
    notes: list[str] = []
    return SFTData("chatterbot_qa", assign_splits({"all": convs}, split_seed, notes), notes)


def _general_text(name: str) -> Callable[[int], SFTData]:
    def load(split_seed: int) -> SFTData:
        notes: list[str] = []
        docs = [Conversation(text=t, task=name) for t in _documents(name)]
        return SFTData(name, assign_splits({"all": docs}, split_seed, notes), notes)

    return load


def _documents(name: str) -> list[str]:
    from .corpora import news_articles, shakespeare_scenes

    if name == "shakespeare":
        return [text for _, text in shakespeare_scenes(locate(name))]
    return [f"{title}\n\n{text}" for title, text in news_articles(locate(name))]


def _instruct_mix(split_seed: int) -> SFTData:
    from .templates import build_mixture

    mix = build_mixture(split_seed)
    extra = {f"heldout:{task}": convs for task, convs in mix.held_out.items()}
    return SFTData("instruct_mix", dict(mix.splits), mix.notes, extra, mix.demonstrations)


PACKAGED_SFT.update(
    {
        "instruct_mix": _instruct_mix,
        "chitchat": _chitchat,
        "chatterbot_qa": _chatterbot,
        "shakespeare": _general_text("shakespeare"),
        "news_articles": _general_text("news_articles"),
    }
)
TEXT_DATASETS = ("shakespeare", "news_articles")


def text_documents(source: str, split: str = "test", split_seed: int = 0) -> list[str]:
    """General text for forgetting and replay: one split (by ``split_seed``, 0 by default so every run measures
    the same sample) of a packaged text dataset, or every text of a file (.txt, or JSON/JSONL ``text`` records)."""
    if source in TEXT_DATASETS:
        return [c.text for c in PACKAGED_SFT[source](split_seed).splits[split]]
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{source!r} is neither a packaged text dataset ({', '.join(TEXT_DATASETS)}) nor a text file")
    texts = [c.text for c in read_conversations(path) if c.is_text]
    if not texts:
        raise InputError(f"{path}: no raw text found (expected a .txt file or records with only 'text')")
    return texts
