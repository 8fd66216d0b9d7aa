"""Readers for the packaged dialogue, question-answer and general-text corpora (raw records, no splitting).

- ``chitchat``: 7,168 two-person dialogues (chitchat-dataset). The file stores each dialogue as a list of *groups*,
  each group the consecutive messages of one sender; a group becomes one turn, its messages joined by newlines.
- ``chatterbot_qa``: the chatterbot English corpus, one YAML file per topic, read with ``yaml.safe_load``. Each
  entry is a list of statements. In the dialogue topics (``DIALOGUE_TOPICS``: ``conversations``, ``health``) a list
  is a conversation, each statement answering the one before; everywhere else a list is a question followed by
  alternative answers (e.g. ``[What is a computer?, A computer is ..., The thing you're using ...]``). Questions
  asked more than once in a topic are merged, their answers pooled. Entries that are not lists of text are skipped.
- ``shakespeare``: the 38 plays (Markdown), one document per scene, turned into plain text: speaker names in
  capitals followed by a colon, stage directions in square brackets, headings and emphasis marks removed.
- ``news_articles``: 3,824 English news articles (a CSV inside a zip): title, blank line, text. The source has
  mangled quotation marks (``""?``); the text is kept as it is.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

DIALOGUE_TOPICS = ("conversations", "health")


@dataclass
class QAItem:
    topic: str
    question: str
    answers: list[str] = field(default_factory=list)  # the first is the reference reply


def chitchat_dialogues(folder: Path) -> list[list[str]]:
    """Every dialogue as its alternating turns (the first sender's turns at even positions)."""
    raw = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    dialogues = []
    for key in sorted(raw):  # a fixed order, whatever the file's
        turns, last_sender = [], None
        for group in raw[key].get("messages", []):
            texts = [m["text"].strip() for m in group if isinstance(m.get("text"), str) and m["text"].strip()]
            if not texts:
                continue
            sender = group[0].get("sender")
            if sender == last_sender:  # never happens in the packaged file, but keep turns alternating
                turns[-1] += "\n" + "\n".join(texts)
            else:
                turns.append("\n".join(texts))
            last_sender = sender
        if len(turns) >= 2:
            dialogues.append(turns)
    return dialogues


def chatterbot(folder: Path) -> tuple[list[QAItem], list[tuple[str, list[str]]]]:
    """(question-answer items, (topic, dialogue turns) pairs) from the topic files."""
    import yaml

    items: dict[tuple[str, str], QAItem] = {}
    dialogues = []
    files = sorted((folder / "english").glob("*.yml"))
    if not files:
        raise InputError(f"{folder}: no chatterbot topic files (*.yml) found")
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        topic = path.stem
        for entry in data.get("conversations") or []:
            if not isinstance(entry, list) or len(entry) < 2:
                continue
            statements = [str(s).strip() for s in entry if isinstance(s, (str, int, float)) and str(s).strip()]
            if len(statements) < 2:
                continue
            if topic in DIALOGUE_TOPICS:
                dialogues.append((topic, statements))
                continue
            key = (topic, statements[0].lower())
            item = items.setdefault(key, QAItem(topic, statements[0]))
            item.answers.extend(a for a in statements[1:] if a not in item.answers)
    return list(items.values()), dialogues


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+)_\s*$")


def _scene_text(lines: list[str]) -> str:
    out: list[str] = []
    speaker = None
    for line in lines:
        line = line.rstrip()
        if not line.strip():
            speaker = None if out and out[-1] == "" else speaker
            if out and out[-1] != "":
                out.append("")
            continue
        if m := _SPEAKER.match(line):
            speaker = m.group(1).strip()
            continue
        if m := _DIRECTION.match(line.strip()):
            out.append(f"[{m.group(1).strip()}]")
            continue
        text = line.strip().replace("**", "").replace("_", "")
        if speaker is not None:
            text = f"{speaker}: {text}"
            speaker = None
        out.append(text)
    return "\n".join(out).strip()


def shakespeare_scenes(folder: Path) -> list[tuple[str, str]]:
    """(play/act/scene name, plain text) for every scene of every play, in a fixed order."""
    scenes = []
    for path in sorted((folder / "plays").glob("*/*.md")):
        act, scene, body = "", None, []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("## "):
                act = line[3:].strip()
                continue
            if line.startswith("### ") or line.startswith("# "):
                if scene is not None and _scene_text(body):
                    scenes.append((scene, _scene_text(body)))
                scene, body = f"{path.stem} {act} {line.lstrip('#').strip()}".strip(), []
                continue
            body.append(line)
        if scene is not None and _scene_text(body):
            scenes.append((scene, _scene_text(body)))
    return scenes


def news_articles(folder: Path) -> list[tuple[str, str]]:
    """(title, text) of every article with a title and a text."""
    with zipfile.ZipFile(folder / "NewsArticles.zip") as z:
        raw = z.read("NewsArticles.csv").decode("utf-8", errors="replace")
    out = []
    for row in csv.DictReader(io.StringIO(raw)):
        title, text = (row.get("title") or "").strip(), (row.get("text") or "").strip()
        if title and text:
            out.append((title, text))
    return out
