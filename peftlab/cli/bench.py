"""``peftlab bench``: run a benchmark suite (resuming) and write its report, or rebuild the report."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..report import make_console
from .options import Parser, key_value


def cmd_bench(argv: list[str], show_progress: bool) -> int:
    """Run a benchmark suite (resuming: finished cells are skipped) and write its report."""
    from ..bench import Filters, load_suite, make_plan, packaged_suites, run_bench
    from ..bench.report import write_report
    from ..bench.suite import parse_lr_grid
    from ..fileio import read_text, write_json

    parser = Parser(
        prog="peftlab bench",
        description="Benchmark suites: methods x models x tasks x seeds under one budget, with a Hugging Face PEFT "
        "peer column, the floor, and a report (Markdown + HTML with plots). Finished cells are skipped.",
    )
    parser.add_argument(
        "--suite", default="methods", help=f"packaged suite ({', '.join(sorted(packaged_suites()))}) or a TOML file"
    )
    parser.add_argument("--quick", action="store_true", help="run the quick suite (tiny models built on the fly)")
    parser.add_argument(
        "--out",
        action="append",
        help="bench folder (default: runs/bench/<suite>); with --report, repeat it to report several folders together",
    )
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the existing results")
    parser.add_argument(
        "--report-to", metavar="STEM", help="write STEM.md, STEM.html and STEM/*.png (default: <out>/report)"
    )
    parser.add_argument("--title", default=None, help="the report's title")
    parser.add_argument(
        "--preface", metavar="FILE", help="a Markdown file quoted under the report's title (budget, machine, caveats)"
    )
    parser.add_argument("--methods", nargs="+", metavar="LABEL", help="run only these methods of the suite")
    parser.add_argument("--models", nargs="+", metavar="MODEL", help="run only these models of the suite")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="run only these tasks of the suite")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="N", help="run only these seeds of the suite")
    parser.add_argument(
        "--lr-grid",
        metavar="F,F,...",
        help="search the learning rate: train each method at its base rate times each factor (e.g. 0.3,1,3; 1 is "
        "always tried) and report the rate with the best validation metric (overrides the suite's lr_grid)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the Hugging Face PEFT peer cells")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed and memory micro-benchmark")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch CPU threads (default: the suite's, else torch's)"
    )
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="DIR",
        help="another bench folder: its finished cells with exactly this configuration are copied, not run again",
    )
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="NAME=DIR",
        type=key_value,
        help="a local Hugging Face folder standing in for a model of the suite that is not packaged (e.g. mpnet=DIR)",
    )
    parser.add_argument("--speed-only", action="store_true", help="run only the speed and memory micro-benchmark")
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure the micro-benchmark again where it is done (a quieter machine)",
    )
    parser.add_argument("--list", action="store_true", help="list the cells and whether they are done; run nothing")
    args = parser.parse_args(argv)
    suite_name = "quick" if args.quick else args.suite
    preface = read_text(args.preface, "--preface file") if args.preface else None
    if args.report:
        folders = [Path(f) for f in args.out or [str(Path("runs") / "bench" / suite_name)]]
        for folder in folders:
            if not folder.is_dir():
                raise InputError(f"--out: {folder} is not a bench folder (nothing to report)")
        stem = Path(args.report_to) if args.report_to else folders[0] / "report"
        md, page = write_report(folders, stem, args.title or "peftlab benchmark", preface)
        print(f"report: {md} and {page}")
        return 0
    if args.out and len(args.out) > 1:
        raise InputError("--out: give one bench folder to run into (several only with --report)")
    suite = load_suite(suite_name)
    out = Path(args.out[0]) if args.out else Path("runs") / "bench" / suite.name
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads: expected a positive integer, got {args.threads}")
    filters = Filters(
        args.methods,
        args.models,
        args.tasks,
        args.seeds,
        peers=not args.no_peer,
        speed=not args.no_speed,
        threads=args.threads,
        reuse=[Path(r) for r in args.reuse],
        speed_only=args.speed_only,
        model_dirs=dict(args.model_dir),
        remeasure=args.remeasure,
        lr_grid=parse_lr_grid(args.lr_grid) if args.lr_grid is not None else None,
    )
    if args.no_speed and (args.speed_only or args.remeasure):
        raise InputError("--no-speed: cannot be combined with --speed-only or --remeasure")
    plan = make_plan(suite, out, filters)
    console = make_console()
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    if args.list:
        from ..bench.tables import cells_table

        console.print(cells_table(plan, suite, out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "notes.json", plan.notes)
    counts = run_bench(
        plan, filters, show_progress, log=lambda text: console.print(text, highlight=False, markup=False)
    )
    stem = Path(args.report_to) if args.report_to else out / "report"
    md, page = write_report([out], stem, args.title or f"peftlab benchmark: suite {suite.name}", preface)
    if counts["summary"]:
        from ..bench.tables import summary_table

        console.print(summary_table(counts["summary"], f"suite {suite.name}: cells of this run"))
    console.print(
        f"suite {suite.name}: {counts['cells']} cells, {counts['done_before']} already done, "
        f"{counts['reused']} reused, {counts['ran']} run now ({counts['failed']} failed); report: {md} and {page}",
        highlight=False,
    )
    return 1 if counts["failed"] else 0
