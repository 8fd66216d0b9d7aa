"""``peftlab eval``, ``merge``, ``export`` and ``import``: a run's adapter evaluated, merged into its model, or
converted to and from Hugging Face PEFT."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..fileio import check_output
from ..report import generation_table, make_console
from .decoding import proxy_reply
from .options import Parser, model_code_arguments, overwrite_argument, proxy_arguments, rebuild_run, run_into_new_folder


def cmd_eval(argv: list[str], show_progress: bool) -> int:
    from ..report import metrics_table
    from ..run import evaluate_run, pick_device

    parser = Parser(prog="peftlab eval", description="Evaluate a run's best adapter.")
    parser.add_argument("run", help="run folder")
    parser.add_argument("--data", help="evaluate on this data file instead of the run's own splits")
    parser.add_argument("--split", choices=["test", "validation", "train", "all"], default="test")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help="sft: also answer the first N test and held-out conversations by generation and score the replies",
    )
    parser.add_argument("--max-new-tokens", type=int, help="sft: longest generated reply (default: the run's)")
    model_code_arguments(parser)
    proxy_arguments(parser)
    args = parser.parse_args(argv)
    run, options, settings, prepared, attachment = rebuild_run(args, show_progress)
    device = pick_device(options.device)
    attachment.model.to(device)
    if args.generate is not None or args.proxy_base:
        return _eval_generation(args, run, options, settings, prepared, attachment, show_progress)
    metrics = evaluate_run(options, settings, prepared, attachment, device, args.data, args.split)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        make_console().print(metrics_table(metrics, f"{run}: {attachment.method.name} adapter"))
    return 0


def _eval_generation(args, run, options, settings, prepared, attachment, show_progress: bool) -> int:
    """``peftlab eval RUN --generate N``: generation metrics of the run's adapter, or of a proxy-tuned base steered
    by it (``--proxy-base``)."""
    from ..run import generation_metrics

    if prepared.kind != "sft":
        raise InputError(f"{run}: --generate and --proxy-base need an sft run")
    if args.max_new_tokens is not None:
        options.max_new_tokens = args.max_new_tokens
    limit = args.generate if args.generate is not None else options.eval_generate
    answer, label = None, None
    if args.proxy_base:
        steered, label = proxy_reply(args, attachment.model, prepared.tokenizer, options.model, show_progress)

        def answer(prompts):
            return steered(prompts, options.max_new_tokens, 0)

    metrics = generation_metrics(options, prepared, attachment.model, settings.eval_batch_size, limit, answer)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        title = f"{run}: {label or attachment.method.name + ' adapter'}, generation"
        make_console().print(generation_table(metrics, title))
    return 0


def cmd_merge(argv: list[str], show_progress: bool) -> int:
    from ..run import save_merged

    parser = Parser(prog="peftlab merge", description="Write the model with the adapter merged into its weights.")
    parser.add_argument("--out", required=True, help="folder for the merged Hugging Face model (new or empty)")
    args, (run, _, _, prepared, attachment) = run_into_new_folder(parser, argv, show_progress)
    save_merged(attachment, prepared.tokenizer, args.out)
    print(f"merged {attachment.method.name} adapter of {run} into {args.out} (loads with plain transformers)")
    if prepared.pooling != "model":  # a classifier's (other tasks' is "model")
        print(
            f"note: its classifier reads {prepared.pooling}-pooled token states; peftlab and sentence-transformers "
            "read that from its modules.json, a plain transformers classifier reads its own position"
        )
    return 0


POOLING_NOTE = (
    "the head reads this pooling of the base's last hidden states over the attention mask, not the position "
    "AutoModelForSequenceClassification reads; peftlab import applies it"
)


def cmd_export(argv: list[str], show_progress: bool) -> int:
    from ..core.hf_peft import export_hf
    from ..run import hf_task_type

    parser = Parser(prog="peftlab export", description="Convert a run's adapter to another format.")
    parser.add_argument(
        "--format",
        choices=["hf", "gguf"],
        required=True,
        help="hf: Hugging Face PEFT (a folder); gguf: a llama.cpp / Ollama LoRA adapter (a file)",
    )
    parser.add_argument("--out", help="hf: output folder (new or empty); gguf: output file (default RUN/adapter.gguf)")
    gguf = parser.add_argument_group("gguf")
    gguf.add_argument(
        "--base", metavar="FILE", help="the base model's GGUF: checked against the adapter (and merged into)"
    )
    gguf.add_argument(
        "--merged", action="store_true", help="write the base GGUF with the adapter merged in, a model of its own"
    )
    gguf.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="of the written LoRA / merged tensors")
    if _format_of(argv) == "gguf":
        return _export_gguf(parser, argv, show_progress)
    args, (run, _, _, prepared, attachment) = run_into_new_folder(parser, argv, show_progress)
    if args.out is None:
        raise InputError("--out: the folder for the Hugging Face PEFT adapter is required")
    pooling = prepared.pooling  # "model" for other tasks than classify
    notes = {"pooling": pooling, "note": POOLING_NOTE} if pooling != "model" else None
    reference, task_type = prepared.model.reference, hf_task_type(prepared)
    export_hf(attachment, args.out, base_model_name_or_path=reference, task_type=task_type, notes=notes)
    print(f"wrote a Hugging Face PEFT adapter to {args.out}")
    if notes:
        print(
            f"note: the classifier was trained on {pooling}-pooled token states ({args.out}/peftlab.json); "
            "PEFT's sequence classifier reads its own position unless you pool the same way"
        )
    return 0


def _format_of(argv: list[str]) -> str | None:
    """The value of ``--format`` in ``argv`` (the two formats take different outputs), before the full parse."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--format")
    return pre.parse_known_args(argv)[0].format


def _export_gguf(parser, argv: list[str], show_progress: bool) -> int:
    """``peftlab export RUN --format gguf``: the adapter, or with ``--merged`` the merged model, as one GGUF file."""
    from ..fileio import check_output_file
    from ..run.gguf import export_gguf

    parser.add_argument("run", help="run folder")
    overwrite_argument(parser)
    model_code_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run) / ("merged.gguf" if args.merged else "adapter.gguf")
    check_output_file(out, args.overwrite)
    run, options, _, _, attachment = rebuild_run(args, show_progress)
    for line in export_gguf(attachment, options.model, out, args.merged, args.base, args.dtype, not show_progress):
        print(line)
    return 0


def cmd_import(argv: list[str], show_progress: bool) -> int:
    from ..run import import_hf_adapter

    parser = Parser(
        prog="peftlab import",
        description="Convert a Hugging Face PEFT adapter to peftlab's format (for peftlab.load_adapter, peftlab "
        "train --adapter, eval and merge). Its task_type picks the model: SEQ_CLS (also when absent) a sequence "
        "classifier, TOKEN_CLS a token classifier, QUESTION_ANS a span (start/end) model, CAUSAL_LM a decoder.",
    )
    parser.add_argument("adapter", help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--out", required=True, help="output adapter folder (new or empty)")
    parser.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument(
        "--labels",
        help="comma-separated class names of a classifier's or tagger's head (default: LABEL_0, ...)",
    )
    overwrite_argument(parser)
    args = parser.parse_args(argv)
    check_output(args.out, [args.adapter], args.overwrite)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    attachment = import_hf_adapter(args.adapter, args.out, args.model, labels, args.overwrite, not show_progress)
    src = Path(args.adapter)
    what = attachment.method.name
    print(f"imported {what} on {len(attachment.targets)} modules from {src} into {args.out}")
    return 0
