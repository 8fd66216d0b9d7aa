"""Progress on the console: the rate and time-left texts of the training bar, and one transient bar for the work
between training steps (evaluation batches, generated replies).

Importing this module changes nothing. What is drawn is chosen for a block with ``showing(mode)``:

- ``"bar"``: rich bars (a terminal); a bar opened while the training bar is live becomes a row of it;
- ``"line"``: no bars; work that took ``LINE_AFTER`` seconds or more says so in one line on stderr when it ends
  (piped or logged output: what the time went to, without a line per batch);
- ``"off"``: nothing (``--no-progress``, library use outside a run).

``peftlab.cli.main`` chooses the mode of a command; ``run_training`` narrows it for its run (no bars when called
with ``show_progress=False``). What a bar is called comes from ``stage(label)`` around the work (``validation``,
``test``), else from the default the work gives (``evaluating``, ``generating``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Mode = Literal["bar", "line", "off"]
LINE_AFTER = 10.0  # seconds: shorter work says nothing in "line" mode

_mode: ContextVar[Mode | None] = ContextVar("peftlab_progress_mode", default=None)
_host: ContextVar[Progress | None] = ContextVar("peftlab_progress_host", default=None)
_stage: ContextVar[str | None] = ContextVar("peftlab_progress_stage", default=None)


def significant(x: float, digits: int = 2) -> str:
    """``x`` with at least ``digits`` significant digits and never in exponent form: 1234, 27, 3.7, 0.27, 0.0034."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def rate_text(examples: int, seconds: float, steps: int) -> str:
    """The speed of ``steps`` optimiser steps over ``examples`` examples in ``seconds``: examples per second, and
    the seconds a step takes where a step takes more than one (a slow run never reads ``0 ex/s``)."""
    if steps <= 0 or seconds <= 0:
        return ""
    per_step = seconds / steps
    rate = f"{significant(examples / seconds)} ex/s"
    return f"{significant(per_step)} s/step, {rate}" if per_step > 1 else rate


def duration(seconds: float) -> str:
    """``seconds`` as h:mm:ss (rich's own form for elapsed time)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def time_left(done: float, total: float, seconds: float) -> str:
    """The time the rest of ``total`` units takes at the pace of the ``done`` ones (``seconds`` for them); ``-:--:--``
    before the first is done."""
    if done <= 0 or seconds <= 0:
        return "-:--:--"
    return duration(seconds / done * max(total - done, 0))


def new_bar(enabled: bool, transient: bool = False) -> Progress:
    """A bar with our columns: what, bar, done/total, ``info`` (loss, rate), elapsed, ``eta`` (both task fields)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta {task.fields[eta]}"),
        disable=not enabled,
        transient=transient,
    )


def current() -> Mode:
    return _mode.get() or "off"


@contextmanager
def showing(mode: Mode, host: Progress | None = None) -> Iterator[None]:
    """Draw in ``mode`` within the block; ``host``: a live bar that the block's bars join as rows."""
    tokens = _mode.set(mode), _host.set(host)
    try:
        yield
    finally:
        _host.reset(tokens[1])
        _mode.reset(tokens[0])


def for_run(show_progress: bool, main: bool = True) -> Mode:
    """The mode of one run: bars where it shows progress, else one line per long piece of work where the command
    logs lines; nothing on processes other than the main one."""
    if not main:
        return "off"
    if show_progress:
        return "bar"
    return "line" if current() == "line" else "off"


@contextmanager
def stage(label: str) -> Iterator[None]:
    """Name the bars of the work within the block (``validation``, ``test``, ``generating test``)."""
    token = _stage.set(label)
    try:
        yield
    finally:
        _stage.reset(token)


@contextmanager
def track(total: int, default: str = "evaluating", unit: str = "examples") -> Iterator[Callable[[int], None]]:
    """A bar over ``total`` units of work; the block calls the yielded function with the units each piece did."""
    label, mode, started = _stage.get() or default, current(), time.perf_counter()
    done = 0
    bar, job, own = None, None, None
    if mode == "bar" and total > 0:
        bar = _host.get()
        if bar is None or not bar.live.is_started:
            own = bar = new_bar(True, transient=True)
            try:
                own.start()
            except Exception:  # noqa: BLE001 - another live display owns the terminal: no bar, the work goes on
                bar = own = None
        if bar is not None:
            job = bar.add_task(label, total=total, info=unit, eta=time_left(0, total, 0))

    def advance(units: int) -> None:
        nonlocal done
        done += units
        if bar is not None:
            bar.update(job, completed=done, eta=time_left(done, total, time.perf_counter() - started))

    try:
        yield advance
    finally:
        if bar is not None:
            bar.remove_task(job)
        if own is not None:
            own.stop()
        seconds = time.perf_counter() - started
        if mode == "line" and seconds >= LINE_AFTER:
            print(f"{label}: {done} {unit} in {duration(seconds)}", file=sys.stderr, flush=True)
