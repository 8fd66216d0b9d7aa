"""Errors that peftlab reports to a person as one line.

Every error a user can cause (a bad file, flag, config key or adapter) is an ``InputError``: the CLI prints
``error: <message>`` on stderr and exits with code 2. ``PeftlabError`` covers the rest (a diverging run, a failed
download) and exits with code 1. Messages name the file, line or field at fault and say what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftlabError(Exception):
    """A failure peftlab explains in one line; the CLI exits with ``exit_code``."""

    exit_code = 1


class InputError(PeftlabError):
    """The user's input (a file, flag, config key, adapter or model) is not what peftlab expects."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run that can be continued: ``folder`` is the run folder ``peftlab train --resume`` takes."""

    def __init__(self, folder):
        super().__init__(str(folder))
        self.folder = folder


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """A phrase like " (did you mean 'alpha'?)" naming the closest candidates, or "" when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def require(condition: bool, field: str, expected: str, got: object) -> None:
    """Raise an InputError naming ``field`` unless ``condition`` holds: "r: expected a positive integer, got 0"."""
    if not condition:
        raise InputError(f"{field}: expected {expected}, got {got!r}")
