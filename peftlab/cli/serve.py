"""``peftlab serve``: an OpenAI-compatible HTTP server over one base decoder and any number of LoRA adapters."""

from __future__ import annotations

from ..errors import InputError
from .options import Parser, model_code_arguments


def adapter_pair(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise InputError(f"peftlab serve: --adapter expects NAME=FOLDER, got {text!r}")
    return name, folder


def cmd_serve(argv: list[str], show_progress: bool) -> int:
    from ..compose.server import DEFAULT_TOKENS_LIMIT

    parser = Parser(
        prog="peftlab serve",
        description="Serve a decoder and its LoRA adapters over an OpenAI-compatible HTTP API (the request's "
        "'model' picks an adapter by name, or the base by --model's name); concurrent requests decode together.",
    )
    parser.add_argument("--model", required=True, help="packaged model name, Hugging Face folder or hub ID")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="a LoRA adapter folder (or run folder) served as NAME; repeat for more",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="most requests decoded together")
    parser.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=DEFAULT_TOKENS_LIMIT,
        help="largest max_tokens a request may ask for",
    )
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    model_code_arguments(parser)
    args = parser.parse_args(argv)
    pairs = [adapter_pair(a) for a in args.adapter]
    adapters = dict(pairs)
    if len(adapters) != len(pairs):
        raise InputError("peftlab serve: two --adapter flags give the same NAME")
    if args.max_batch < 1 or args.max_new_tokens_limit < 1 or not 0 <= args.port < 65536:
        raise InputError("peftlab serve: --max-batch and --max-new-tokens-limit must be positive, --port in 0..65535")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise InputError(f"peftlab serve needs {e.name}: pip install 'peftlab[serve]'") from None
    from ..compose.server import create_app
    from ..compose.serving import load_engine

    engine = load_engine(
        args.model, adapters, args.max_batch, args.device, args.trust_remote_code, args.allow_pickle, not show_progress
    )
    app = create_app(engine, args.api_key, args.max_new_tokens_limit)
    print(
        f"peftlab serve: {args.model} with adapters {', '.join(adapters) or '(none)'} "
        f"on http://{args.host}:{args.port}/v1",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
