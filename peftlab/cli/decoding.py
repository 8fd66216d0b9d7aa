"""``peftlab generate``, ``chat`` and ``baseline``: decoding with a run's model, or a model with an adapter, and
training-free baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from ..fileio import check_output_file
from ..report import generation_table, make_console, pet_table
from .options import Parser, model_code_arguments, overwrite_argument, proxy_arguments


def _decoder(args, show_progress: bool):
    """(model, tokenizer, label) for generate/chat: a run folder's best adapter, or --model with an optional
    --adapter."""
    from ..decode import load_decoder

    return load_decoder(
        args.run, args.model, args.adapter, not show_progress, args.trust_remote_code, args.allow_pickle
    )


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
    (the run's or --model's model with its adapter) minus the anti-expert."""
    from ..decode import proxy_decoder

    return proxy_decoder(
        expert,
        tokenizer,
        expert_base,
        args.proxy_base,
        args.proxy_base_adapter,
        args.anti_expert,
        args.proxy_alpha,
        temperature=getattr(args, "temperature", 0.0),
        top_p=getattr(args, "top_p", 1.0),
        trust_remote_code=getattr(args, "trust_remote_code", False),
        quiet=not show_progress,
    )


def cmd_generate(argv: list[str], show_progress: bool) -> int:
    from ..decode import expert_base, read_prompts
    from ..evaluate.generation import generate

    parser = Parser(prog="peftlab generate", description="Answer prompts from a file or stdin.")
    _decoder_arguments(parser)
    parser.add_argument("--prompts", default="-", help="file of prompts (JSONL or one per line); - for stdin")
    parser.add_argument("--json", action="store_true", help="print JSON lines {prompt, reply}")
    args = parser.parse_args(argv)
    model, tokenizer, _ = _decoder(args, show_progress)
    prompts = read_prompts(args.prompts)
    if args.system:
        prompts = [[{"role": "system", "content": args.system}, *p] for p in prompts]
    if args.proxy_base:
        reply, _ = proxy_reply(args, model, tokenizer, expert_base(args.run, args.model), show_progress)
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
    from ..decode import expert_base
    from ..evaluate.generation import generate

    parser = Parser(prog="peftlab chat", description="Chat with a model (and adapter) in the terminal.")
    _decoder_arguments(parser)
    args = parser.parse_args(argv)
    model, tokenizer, label = _decoder(args, show_progress)
    steered = None
    if args.proxy_base:
        steered, label = proxy_reply(args, model, tokenizer, expert_base(args.run, args.model), show_progress)
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
    from ..decode import baselines
    from ..fileio import write_json

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
    results = baselines(
        args.model,
        args.adapter,
        args.data,
        args.shots,
        args.pet,
        args.limit,
        args.max_new_tokens,
        args.batch_size,
        args.split_seed,
        args.seed,
        args.trust_remote_code,
        quiet=not show_progress,
    )
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
