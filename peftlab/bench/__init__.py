"""The benchmark laboratory: ``peftlab bench`` runs suites of methods x models x tasks x seeds under one budget and
writes a report (Markdown and static HTML with plots) with honest accounting and a Hugging Face PEFT peer column.

- ``suite``:   suites as TOML files (packaged ones in ``suites/``), checked key by key;
- ``assets``:  tiny models and data built on the fly (the ``quick`` suite), derived datasets;
- ``measure``: one training step's time and memory split (weights, gradients, optimiser state, activations), the
  floor, and the alternating micro-benchmark (reusable by speed work);
- ``peer``:    the same cell trained through Hugging Face PEFT in the same process and loop;
- ``plan``:    the plan of groups and cells, and which cells are finished;
- ``speed``:   the speed micro-benchmark of each group (``speed.json``);
- ``runner``:  running and resuming the cells;
- ``collect``: the results read back and aggregated over seeds;
- ``summary_tables``, ``plots``, ``render``: the report's tables and standings, its plots, Markdown and HTML;
- ``report``:  report.md, report.html and report.json put together from those.
"""

from .plan import Filters, make_plan
from .runner import run_bench
from .suite import find_suite, load_suite, packaged_suites

__all__ = ["Filters", "find_suite", "load_suite", "make_plan", "packaged_suites", "run_bench"]
