"""``peftlab compose``: merge LoRA adapters, LoRAHub weights for a target task, the mixed-batch serving benchmark."""

from __future__ import annotations

import json

from ..fileio import check_output, check_output_file, write_text
from ..report import make_console, merge_errors_table
from .options import Parser, overwrite_argument


def cmd_compose(argv: list[str], show_progress: bool) -> int:
    """Adapter composition: weighted merge with SVD re-compression, LoRAHub, mixed-batch serving benchmark."""
    parser = Parser(prog="peftlab compose", description="Compose LoRA adapters of one base model.")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=Parser)
    m = sub.add_parser("merge", help="weighted sum of LoRA adapters, re-compressed to --rank by truncated SVD")
    m.add_argument("adapters", nargs="+", help="LoRA adapter folders or run folders (same base body)")
    m.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: all 1)")
    m.add_argument("--rank", type=int, required=True, help="rank of the merged adapter")
    m.add_argument("--out", required=True, help="folder for the merged adapter (new or empty)")
    overwrite_argument(m)
    m.add_argument(
        "--head",
        default=None,
        help="whose task head the merged adapter takes: an adapter's name or "
        "index (default: the first), or 'none' for the body only",
    )
    m.add_argument("--model", help="base model (default: the one the first adapter records)")
    m.add_argument("--json", action="store_true", help="print the re-compression errors as JSON")
    h = sub.add_parser("lorahub", help="LoRAHub weights from k examples of a target task, against the baselines")
    h.add_argument("adapters", nargs="+", help="LoRA adapter folders or run folders (same base body)")
    h.add_argument("--data", required=True, help="target task (packaged name or file)")
    h.add_argument("--model", default="minilm")
    h.add_argument("--k", type=int, default=32, help="few-shot examples of the target task (default: 32)")
    h.add_argument("--budget", type=int, default=40, help="objective evaluations of the search (default: 40)")
    h.add_argument("--l1", type=float, default=0.05, help="L1 penalty on the weights (default: 0.05)")
    h.add_argument("--ridge", type=float, default=0.1, help="ridge head strength, relative (default: 0.1)")
    h.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds: one draw of k examples each")
    h.add_argument("--test-limit", type=int, default=1000, help="score on the first N test examples")
    h.add_argument("--max-length", type=int, default=128, help="tokens per example (default: 128)")
    h.add_argument("--out", help="also write the results to this JSON file (a new file)")
    overwrite_argument(h)
    b = sub.add_parser("bench", help="mixed-batch throughput against Hugging Face PEFT's adapter_names path")
    b.add_argument("--model", default="minilm")
    b.add_argument("--adapters", type=int, default=8)
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--length", type=int, default=64)
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    b.add_argument("--out", help="also write the results to this JSON file (a new file)")
    overwrite_argument(b)
    args = parser.parse_args(argv)
    return {"merge": _compose_merge, "lorahub": _compose_lorahub, "bench": _compose_bench}[args.action](
        args, show_progress
    )


def _compose_merge(args, show_progress: bool) -> int:
    from ..compose.merge import merge_to_folder

    check_output(args.out, args.adapters, args.overwrite)
    report, merged = merge_to_folder(
        args.adapters, args.weights, args.rank, args.head, args.model, args.out, args.overwrite, not show_progress
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    title = f"merged {len(report['weights'])} LoRA adapters at rank {args.rank}: relative Frobenius error"
    make_console().print(merge_errors_table(merged.errors, merged.total_error, title))
    print(f"wrote a rank-{args.rank} LoRA adapter to {args.out} (head: {report['head'] or 'none'})")
    return 0


def _compose_lorahub(args, show_progress: bool) -> int:
    from ..compose.lorahub import compare

    if args.out:
        check_output_file(args.out, args.overwrite)
    results = compare(
        args.adapters,
        args.data,
        args.model,
        args.k,
        args.budget,
        args.l1,
        args.ridge,
        args.seeds,
        args.test_limit,
        args.max_length,
        quiet=not show_progress,
    )
    text = json.dumps(results, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    print(text)
    return 0


def _compose_bench(args, show_progress: bool) -> int:
    import torch

    if args.out:
        check_output_file(args.out, args.overwrite)
    from ..compose.bench import benchmark
    from ..models import load_classifier, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model, quiet=not show_progress)
    results = benchmark(
        lambda: load_classifier(path, ["a", "b"]),
        args.adapters,
        args.rank,
        args.batch_size,
        args.length,
        args.repeats,
    )
    results["model"] = args.model
    text = json.dumps(results, indent=2)
    if args.out:
        write_text(args.out, text + "\n")
    print(text)
    return 0
