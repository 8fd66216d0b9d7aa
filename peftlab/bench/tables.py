"""Tables of a bench plan for the terminal (rich)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from .runner import FAILED, Cell, Plan, finished
from .suite import Suite


def cell_state(cell: Cell, suite: Suite) -> str:
    return "done" if finished(cell, suite) else "failed" if (cell.folder / FAILED).exists() else "to run"


def summary_table(rows: list[dict], title: str) -> Table:
    """The cells run (or reused) by this ``peftlab bench``: quality, trainable parameters, train time and state."""
    table = Table("cell", "quality", "trainable", "train", "state", title=title)
    for column in table.columns[1:4]:
        column.justify = "right"
    for row in rows:
        table.add_row(Text(row["cell"]), row["quality"], row["trainable"], row["train_seconds"], row["state"])
    return table


def cells_table(plan: Plan, suite: Suite, out: Path) -> Table:
    """The plan's cells and whether each is done, failed or still to run (``peftlab bench --list``)."""
    table = Table("cell", "state", title=f"suite {suite.name}: {len(plan.cells)} cells in {out}")
    for cell in plan.cells:
        table.add_row(cell.name, cell_state(cell, suite))
    return table
