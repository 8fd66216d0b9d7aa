"""The tables a person reads at the end of a run (rich)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def make_console(stderr: bool = False) -> Console:
    """A console for peftlab's output; piped or captured output gets wide lines instead of rich's 80 columns."""
    import sys

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


METRIC_COLUMNS = (
    "accuracy",
    "precision",
    "recall",
    "exact",
    "f1",
    "has_answer_f1",
    "no_answer_accuracy",
    "loss",
    "perplexity",
    "exact_match",
    "answer_accuracy",
)


def metrics_table(metrics: dict[str, dict | None], title: str = "metrics") -> Table:
    """One row per split; a column for each metric some split has (classification or language modelling)."""
    rows = {split: m for split, m in metrics.items() if m}
    columns = [c for c in METRIC_COLUMNS if any(c in m for m in rows.values())]
    table = Table(title=title)
    table.add_column("split")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("examples", justify="right")
    for split, m in rows.items():
        table.add_row(split, *(f"{m[k]:.4f}" if k in m else "-" for k in columns), str(m.get("examples", "")))
    return table


def results_tables(results: dict) -> list[Table]:
    params = results["params"]
    total = params["total"]
    counts = Table(title=f"{results['method']} on {results['model']} / {results['data']}: parameters")
    counts.add_column("count")
    counts.add_column("value", justify="right")
    counts.add_column("share of the model", justify="right")
    for name in ("total", "base", "adapter", "trainable", "changed"):
        counts.add_row(name, f"{params[name]:,}", f"{100 * params[name] / total:.3f}%")
    if "delta_rank" in params:
        r = params["delta_rank"]
        counts.add_row(
            "rank of the weight difference",
            f"{r['min']}-{r['max']}" if r["min"] != r["max"] else str(r["max"]),
            f"{len(r['per_matrix'])} matrices",
        )
    cost = Table(title="cost")
    cost.add_column("measure")
    cost.add_column("value", justify="right")
    cost.add_row("adapter file size", human_bytes(results["adapter_bytes"]))
    cost.add_row(f"peak memory ({results['peak_memory_source']})", human_bytes(results["peak_memory_bytes"]))
    cost.add_row("train time (excluding evaluation)", f"{results['train_seconds']:.1f} s")
    cost.add_row("wall time", f"{results['wall_seconds']:.1f} s")
    cost.add_row("examples / s", f"{results['examples_per_second']:.1f}")
    cost.add_row("tokens / s", f"{results['tokens_per_second']:.0f}")
    cost.add_row("steps (best at)", f"{results['steps']} ({results['best_step']})")
    cost.add_row("learning rate", f"{results['lr']:g}")
    return [metrics_table(results["metrics"], "metrics (best validation state)"), counts, cost]


def print_results(results: dict, console: Console | None = None) -> None:
    console = console or make_console()
    for table in results_tables(results):
        console.print(table)
    console.print(f"run folder: {results['run_dir']}")


def generation_table(metrics: dict[str, dict], title: str) -> Table:
    """Generation metrics of an sft run or a baseline: one row per set, indented rows for its tasks."""
    table = Table(title=title)
    for column in ("set", "answer accuracy", "token F1", "exact match", "examples"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, m in metrics.items():
        if not m:
            continue
        accuracy = f"{m['answer_accuracy']:.4f}" if "answer_accuracy" in m else "-"
        table.add_row(name, accuracy, f"{m['token_f1']:.4f}", f"{m['exact_match']:.4f}", str(m["examples"]))
        for task, t in m.get("tasks", {}).items():
            accuracy = f"{t['answer_accuracy']:.4f}" if "answer_accuracy" in t else "-"
            table.add_row(f"  {task}", accuracy, f"{t['token_f1']:.4f}", f"{t['exact_match']:.4f}", str(t["examples"]))
    return table


def pet_table(results: dict[str, dict], title: str) -> Table:
    """PET-style classification accuracy: one row per set, indented rows for its tasks."""
    table = Table(title=title)
    for column in ("set", "accuracy", "examples"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['accuracy']:.4f}", str(r["examples"]))
        for task, t in r["tasks"].items():
            table.add_row(f"  {task}", f"{t['accuracy']:.4f}", str(t["examples"]))
    return table


def merge_errors_table(errors: dict[str, float], total: float, title: str) -> Table:
    """The relative error of each re-compressed module of a merged adapter, and the total."""
    table = Table(title=title)
    table.add_column("module")
    table.add_column("error", justify="right")
    for name, error in errors.items():
        table.add_row(name, f"{error:.4f}")
    table.add_row("total", f"{total:.4f}")
    return table


def methods_table(methods) -> Table:
    table = Table("method", "family", "default lr", "merges", "summary", title="methods")
    for m in methods:
        table.add_row(m.name, m.family, f"{m.lr:g}", "yes" if m.mergeable else "no", m.summary)
    return table


def method_options_table(method, flag) -> Table:
    """A method's config fields as the flags they are (``flag(field name)``), with defaults and meanings."""
    import dataclasses

    table = Table("flag", "default", "meaning")
    for f in dataclasses.fields(method.config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        table.add_row(flag(f.name), str(default), f.metadata.get("help", ""))
    return table


def assets_table(assets, cache: Path, is_pulled) -> Table:
    """The asset registry and, by ``is_pulled(asset)``, what is in the cache."""
    table = Table("name", "kind", "download", "pulled", "licence", "what", title=f"assets (cache: {cache})")
    for a in assets:
        table.add_row(
            a.name, a.kind, f"{a.download_mb:.0f} MB", "yes" if is_pulled(a) else "no", a.licence, a.description
        )
    return table


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f}"


def estimate_table(rows: list[dict], options) -> Table:
    """``peftlab estimate``'s table: per method, trainable parameters, the memory split in GiB, FLOPs per token and,
    given ``--gpu-memory``, whether the step fits."""
    title = (
        f"{options.model}: batch {options.batch_size} x {options.length} tokens, base in {options.dtype}"
        + (", gradient checkpointing" if options.gradient_checkpointing else "")
        + (f", FSDP over {options.nproc}" if options.nproc > 1 else "")
        + " (GiB)"
    )
    table = Table(title=title)
    for name in ("method", "trainable", "weights", "gradients", "optimizer", "activations", "total", "GFLOPs/token"):
        table.add_column(name, justify="left" if name == "method" else "right")
    if options.gpu_memory is not None:
        table.add_column(f"fits {options.gpu_memory:g} GiB")
    skipped = [f"{row['method']}: {row['skipped']}" for row in rows if "memory" not in row]
    if skipped:
        table.caption = "not estimated: " + "; ".join(skipped)
    for row in rows:
        if "memory" not in row:
            continue
        m = row["memory"]
        cells = [row["method"], f"{row['trainable']:,}", *(_gib(m[k]) for k in ("weights", "gradients", "optimizer",
                 "activations", "total")), f"{row['flops_per_token'] / 1e9:.2f}"]  # fmt: skip
        if options.gpu_memory is not None:
            cells.append("yes" if m["total"] <= options.gpu_memory * 1024**3 else "no")
        table.add_row(*cells)
    return table
