"""The benchmark report: ``report.md`` and a static ``report.html`` with plots, from the results alone.

``write_report(folders, stem)`` reads every ``cell.json`` and ``speed.json`` under the bench folders (one or more
suites), aggregates over seeds (mean and sample standard deviation) and writes ``<stem>.md``, ``<stem>.html``, the
plots as small PNG files in ``<stem>/`` (both pages link them by relative path) and the aggregated numbers as
``<stem>.json``. Per model and task:

- a table per method: quality, trainable / changed parameters, rank of the weight difference, adapter bytes, the
  memory split of one training step, step time relative to the floor and to full fine-tuning, train time and
  throughput, learning rate;
- the peer table: our step time / PEFT's, our memory / PEFT's (the measured split), our quality minus PEFT's;
- three plots: quality against trainable parameters with the Pareto front, the memory split as stacked bars,
  step time relative to the floor (peftlab and PEFT side by side, full fine-tuning marked).

A "standings" section opens the report: for each method, where it stands against full fine-tuning and against
PEFT, in numbers. Where the suite searched the learning rate (``lr_grid``), the tables show each method at the rate
chosen on validation data, and a "Learning-rate search" section gives the validation metric at every rate tried;
``<stem>.json`` records the same per group under ``lr_search``.

The pieces live beside this module: ``collect`` (reading and aggregating), ``summary_tables`` (tables, standings
and number formats), ``plots`` and ``render`` (the document as Markdown and HTML).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..fileio import write_text
from . import size_study
from .collect import Collected, Group, collect, memory_of, step_times
from .plots import memory_rows, plot_memory, plot_quality, plot_size, plot_speed, pyplot
from .render import Doc
from .summary_tables import lr_search_table, method_table, peer_table, standings


def describe_machine(cell: dict) -> str:
    m = cell.get("machine") or {}
    return f"{m.get('processor')}, {m.get('cpus')} CPUs, {m.get('torch_threads')} torch threads" + (
        f", {m['cuda']}" if m.get("cuda") else ""
    )


def group_machines(group: Group) -> list[str]:
    return sorted({describe_machine(c) for r in group.rows.values() for c in r.cells})


def report_machines(collected: Collected) -> list[str]:
    return sorted({m for g in collected.groups for m in group_machines(g)})


def environment(collected: Collected) -> list[str]:
    cells = [c for g in collected.groups for r in g.rows.values() for c in r.cells]
    if not cells:
        return []
    versions, commits = {}, set()
    for c in cells:
        versions.update({k: v for k, v in (c.get("versions") or {}).items() if v})
        if c.get("git_commit"):
            commits.add(c["git_commit"][:10])
    return [
        "machine: " + "; ".join(report_machines(collected)),
        "versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "peftlab commits: " + ", ".join(sorted(commits)),
    ]


READING = (
    "**How to read.** Quality is the test metric of the best validation state, mean ± standard deviation over the "
    "seeds (n). *Trainable* counts what the optimiser updates (the task head included); *% of model* divides it by "
    "the pretrained model's parameters with its head (not what the method adds, so a method can train more than "
    "100 %); *changed* counts entries of the merged weights that differ from the pretrained ones (with their share "
    "of the model); *Δ rank* is the rank of each adapted matrix's weight "
    "difference; *adapter* is the saved folder's size. *Memory* is measured on one training step of the fixed batch: "
    "W weights (parameters and buffers), G gradients, O optimiser state (plus any method state), A activations saved "
    "for the backward pass. *Step ms* is the median of alternating timed steps on that batch; *× floor* is the median "
    "over rounds of its step time divided by the floor's in the same round (the floor: the frozen base's forward plus "
    "an activation-only backward), *× full* the same against full fine-tuning's step. Train time excludes "
    "evaluation. Peer columns divide our number by Hugging Face PEFT's for the same cell (same start weights, data "
    "order, optimiser, schedule and steps); the step ratio is again the median of same-round ratios, and the quality "
    "difference compares the seeds both ran."
)


def write_report(
    folders: list[Path], stem: Path, title: str = "peftlab benchmark", preface: str | None = None
) -> tuple[Path, Path]:
    """Write ``<stem>.md``, ``<stem>.html`` and ``<stem>/*.png`` from the results in ``folders``; ``preface``
    (Markdown text, e.g. what the reader must know about the machine and budget) is quoted under the title, one
    block per paragraph."""
    collected = collect(folders)
    images = stem.parent / stem.name
    plt = pyplot()
    doc = Doc()
    doc.h(1, title)
    for paragraph in re.split(r"\n\s*\n", preface or ""):
        if paragraph.strip():
            doc.quote(paragraph.strip())
    for s in collected.suites:
        train = ", ".join(f"{k} {v}" for k, v in s["train"].items())
        doc.p(
            f"**Suite `{s['name']}`**: {s['description']} Budget: {s['budget']} per cell"
            + (f" ({train})" if train else "")
            + f"; seeds {', '.join(map(str, s['seeds']))}."
        )
    doc.items(environment(collected))
    doc.p(READING)
    if plt is None:
        doc.p("(matplotlib is not installed: the plots are missing; `pip install matplotlib` and rebuild the report)")
    if collected.groups:
        doc.h(2, "Standings")
        for group in collected.groups:
            doc.p(f"**{group.title}** ({group.suite}; {group.budget}):")
            doc.items(standings(group))
    several_machines = len(report_machines(collected)) > 1
    for group in collected.groups:
        doc.h(2, f"{group.title} ({group.suite})")
        batch = group.speed.get("batch") if group.speed else None
        facts = [f"budget {group.budget}" if group.budget else "", f"quality: test {group.metric}"]
        if several_machines:  # say which rows came from which machine (speed is only comparable within one)
            facts.append("run on " + " and ".join(group_machines(group)))
        if batch:
            facts.append(
                f"speed and memory on one batch of {batch['examples']} examples × {batch['length']} tokens "
                f"({batch['tokens']} real tokens), {group.speed.get('repeats')} alternating repeats"
            )
        doc.p("; ".join(f for f in facts if f) + ".")
        doc.table(*method_table(group))
        header, rows = peer_table(group)
        if rows:
            doc.p("**Against Hugging Face PEFT** (the same cells run through `peft`):")
            doc.table(header, rows)
        if plt is not None:
            for kind, plot in (("quality", plot_quality), ("memory", plot_memory), ("speed", plot_speed)):
                if kind != "quality" and not memory_rows(group):  # no micro-benchmark results
                    continue
                if kind == "quality" and not any(r.cells for r in group.ours()):  # measured with --speed-only
                    continue
                name = f"{group.slug}-{kind}.png"
                plot(plt, group, images / name)
                doc.image(f"{images.name}/{name}", f"{group.title}: {kind}")
    if any(g.lr_search for g in collected.groups):
        lr_search_section(doc, collected)
    studies = size_study.size_studies(collected.groups)
    if studies:
        size_section(doc, studies, plt, images)
    doc.h(2, "Method settings")
    settings_rows = {}
    for group in collected.groups:
        for r in group.ours():
            if not r.cells:  # measured by the micro-benchmark only: its settings are those of a trained row or none
                continue
            key = (r.label, json.dumps(r.first.get("config"), sort_keys=True), r.first.get("lr"))
            settings_rows.setdefault(key, set()).add(group.suite)
    doc.table(
        ["method", "config", "lr", "suites"],
        [
            [f"**{label}**", f"`{config}`", f"{lr:g}", ", ".join(sorted(s))]
            for (label, config, lr), s in settings_rows.items()
        ],
    )
    if collected.notes:
        doc.h(2, "Notes")
        doc.items(collected.notes)
    md, page = stem.with_suffix(".md"), stem.with_suffix(".html")
    write_text(md, doc.markdown())
    write_text(page, doc.html(title))
    write_text(stem.with_suffix(".json"), json.dumps(summary(collected), indent=1) + "\n")
    if studies:
        sizes = [size_study.summary(s) for s in studies]
        write_text(stem.parent / f"{stem.name}-size.json", json.dumps(sizes, indent=1) + "\n")
    return md, page


SIZE_STUDY = (
    "Where one task ran on models of different sizes, each with full fine-tuning, every method's quality relative to "
    "full fine-tuning on the same model (quality / full's; full's / quality for a loss) against its trainable share "
    "of the model (trainable parameters, the task head included, / all parameters), and per model the smallest "
    "trainable share that reaches {target:.0%} of full fine-tuning, in share and in number; then the same without "
    "the task head (its size is the architecture's choice: one Linear for BERT, two for MPNet or RoBERTa), as a share "
    "of the parameters outside it (`{stem}-size.json` holds the same)."
)


def size_section(doc: Doc, studies: list, plt, images: Path) -> None:
    """The model-size study (``size_study``): a summary table, the detail and a plot per task."""
    doc.h(2, "Model size")
    doc.p(SIZE_STUDY.format(target=size_study.TARGET, stem=images.name))
    for study in studies:
        doc.p(f"**{study.task}** ({study.suite}; test {study.metric}):")
        doc.table(*size_study.summary_table(study))
        doc.table(*size_study.detail_table(study))
        if plt is not None:
            name = f"size-{study.suite}-{study.task}.png"
            plot_size(plt, study, images / name)
            doc.image(f"{images.name}/{name}", f"{study.task}: quality vs trainable share by model size")


LR_SEARCH = (
    "Each method below trained at its base rate (the suite's `lr` for it, else the method's own) times each factor "
    "of the grid, every rate with the same seeds and budget. The tables above show each method at the rate with the "
    "best mean validation {metric} over the seeds that finished (in bold; ties go to the rate nearest the base rate "
    "on a log scale). **The choice used validation data only**: test metrics played no part in it. Cells: mean ± sd "
    "of the validation metric (seeds). PEFT peer cells and the speed micro-benchmark ran at the base rate only, so "
    "where another rate was chosen the peer table compares no quality."
)


def lr_search_section(doc: Doc, collected: Collected) -> None:
    """Per group, the validation metric of each method at every rate of its learning-rate grid."""
    doc.h(2, "Learning-rate search")
    metrics = sorted({g.metric for g in collected.groups if g.lr_search})
    doc.p(LR_SEARCH.format(metric=" / ".join(metrics)))
    for group in collected.groups:
        if group.lr_search:
            direction = "higher" if group.higher_is_better else "lower"
            doc.p(f"**{group.title}** ({group.suite}): validation {group.metric}, {direction} is better:")
            doc.table(*lr_search_table(group))


def lr_search_summary(group: Group) -> list[dict]:
    """The learning-rate searches of a group for ``<stem>.json``: the rates tried, their validation means, the
    chosen rate."""
    return [
        {
            "label": label,
            "metric": s.metric,
            "higher_is_better": s.higher_is_better,
            "base_lr": s.base,
            "rates": [
                {
                    "lr": r.lr,
                    "factor": s.factor(r.lr),
                    "validation_mean": r.mean,
                    "validation_std": r.std,
                    "seeds": r.seeds,
                }
                for r in s.rates
            ],
            "chosen_lr": s.chosen,
        }
        for label, s in group.lr_search.items()
    ]


def summary(collected: Collected) -> list[dict]:
    """The aggregated numbers behind the tables, for programs (``<stem>.json``)."""
    out = []
    for group in collected.groups:
        rows = []
        for (label, implementation), r in group.rows.items():
            side = "peer" if implementation == "peft" else "ours"
            rows.append(
                {
                    "label": label,
                    "method": r.method,
                    "implementation": implementation,
                    "seeds": r.seeds,
                    "quality_mean": r.mean("quality", "value"),
                    "quality_std": r.std("quality", "value"),
                    "trainable": r.mean("params", "trainable"),
                    "changed": r.mean("params", "changed"),
                    "adapter_bytes": r.mean("adapter_bytes"),
                    "train_seconds": r.mean("train_seconds"),
                    "tokens_per_second": r.mean("tokens_per_second"),
                    "memory": memory_of(group, label, side),
                    "step_seconds": step_times(group, label)[side],
                    "lr": r.first.get("lr"),
                }
            )
        speed = {label: step_times(group, label) for label, impl in group.rows if impl == "peftlab"}
        entry = {
            "suite": group.suite,
            "model": group.model,
            "task": group.task,
            "metric": group.metric,
            "higher_is_better": group.higher_is_better,
            "rows": rows,
            "step_seconds": speed,
        }
        if group.lr_search:  # only where a grid ran: without one the summary is as it always was
            entry["lr_search"] = lr_search_summary(group)
        out.append(entry)
    return out
