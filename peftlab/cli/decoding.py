"""``peftlab generate``, ``chat`` and ``baseline``: decoding with a run's model, or a model with an adapter, and
training-free baselines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fileio import check_output_file
from ..report import generation_table, make_console, pet_table
from .options import Parser, model_code_arguments, overwrite_argument, proxy_arguments, rebuild_run


def _decoder(args, show_progress: bool):
    """(model, tokenizer, label) for generate/chat: a run folder's best adapter, or --model with an optional
    --adapter."""
    from ..core.attach import load_adapter
    from ..models import load_causal_lm, load_tokenizer, resolve_model

    if args.run:
        run, options, _, prepared, attachment = rebuild_run(args, show_progress)
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
    model_code_arguments(parser)
    proxy_arguments(parser)


def proxy_reply(args, expert, tokenizer, expert_base: str, show_progress: bool):
    """(reply(prompts, max_new_tokens, seed) -> replies, label) decoding ``--proxy-base`` steered by the expert
    (the run's or --model's model with its adapter) minus the anti-expert. The vocabularies are checked first,
    from the tokenizers alone, before any model is loaded."""
    trust = getattr(args, "trust_remote_code", False)
    temperature, top_p = getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0)
    from ..core.attach import load_adapter
    from ..evaluate.proxy import check_shared_vocabulary, proxy_generate
    from ..models import load_causal_lm, load_tokenizer, resolve_model

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
        from ..fileio import read_json

        return str(read_json(Path(args.run) / "config.json", "run config").get("model"))
    return args.model


def _read_prompts(source: str) -> list[list[dict[str, str]]]:
    """Prompts from a file or stdin ("-"): JSONL records with "prompt" or "messages", else one prompt per line."""
    from ..data.conversations import ROLES

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
    from ..evaluate.generation import generate

    parser = Parser(prog="peftlab generate", description="Answer prompts from a file or stdin.")
    _decoder_arguments(parser)
    parser.add_argument("--prompts", default="-", help="file of prompts (JSONL or one per line); - for stdin")
    parser.add_argument("--json", action="store_true", help="print JSON lines {prompt, reply}")
    args = parser.parse_args(argv)
    model, tokenizer, _ = _decoder(args, show_progress)
    prompts = _read_prompts(args.prompts)
    if args.system:
        prompts = [[{"role": "system", "content": args.system}, *p] for p in prompts]
    if args.proxy_base:
        reply, _ = proxy_reply(args, model, tokenizer, _expert_base(args), show_progress)
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
    from ..evaluate.generation import generate

    parser = Parser(prog="peftlab chat", description="Chat with a model (and adapter) in the terminal.")
    _decoder_arguments(parser)
    args = parser.parse_args(argv)
    model, tokenizer, label = _decoder(args, show_progress)
    steered = None
    if args.proxy_base:
        steered, label = proxy_reply(args, model, tokenizer, _expert_base(args), show_progress)
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
    from ..core.attach import load_adapter
    from ..data.sft import load_sft
    from ..evaluate.baselines import demonstration_pool, generation_baseline, pet_baseline
    from ..fileio import write_json
    from ..models import load_causal_lm, load_tokenizer, resolve_model

    parser = Parser(
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
    overwrite_argument(parser)
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
        console.print(pet_table(results["pet"], f"{args.model}: PET-style classification (pattern + verbalizer)"))
    return 0
