"""Load test of ``peftlab serve``: requests/s and tokens/s with batching against one request at a time.

The server runs in this process (uvicorn in a thread, loopback) over ``--model`` and its ``--adapter`` folders;
``--clients`` threads send greedy chat requests (``--max-tokens`` each) in a loop for ``--seconds``, cycling over
the adapters and the base (``peftlab.compose.load``). The same load runs twice: with ``--max-batch`` (requests
gathered and decoded together) and with a batch of 1 (one request at a time). ``--url`` measures a server that is
already running instead (its own batching, one row of results).

Run from the repository root::

    python benchmarks/serve_load.py --quick                                   # tiny built Llama, seconds
    python benchmarks/serve_load.py --model smollm2-135m --adapter a=runs/a --adapter b=runs/b --seconds 30
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --models base a b --api-key KEY
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftlab.compose.load import load_test  # noqa: E402


def quick_model(folder: Path) -> str:
    """A tiny Llama built on the spot (random weights): the script's smoke run."""
    from peftlab.bench.assets import build_tiny_llama

    words = "hello hi how are you fine thanks what is the answer yes no positive negative review classify".split()
    build_tiny_llama(folder, words)
    return str(folder)


def row(label: str, result: dict) -> str:
    return (
        f"{label:<16} {result['clients']:>7} {result['requests']:>8} {result['failures']:>8} "
        f"{result['requests_per_s']:>10.1f} {result['tokens_per_s']:>10.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="packaged model name or folder (the server runs here)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--url", help="measure a running server at this API root instead")
    parser.add_argument("--models", nargs="+", help="with --url: the model names to cycle over")
    parser.add_argument("--api-key")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a tiny built model, 2 seconds per setting")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    header = f"{'serving':<16} {'clients':>7} {'requests':>8} {'failures':>8} {'requests/s':>10} {'tokens/s':>10}"
    common = dict(clients=args.clients, max_tokens=args.max_tokens, api_key=args.api_key)
    if args.url:
        if not args.models:
            parser.error("--url needs --models")
        result = load_test(args.url, args.models, seconds=args.seconds, **common)
        print(json.dumps(result, indent=2) if args.json else f"{header}\n{row('server', result)}")
        return 0

    from peftlab.compose.server import BackgroundServer, create_app
    from peftlab.compose.serving import load_engine

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        seconds = args.seconds
        if args.quick:
            model, seconds = model or quick_model(Path(scratch) / "tiny-llama"), 2.0
        if not model:
            parser.error("give --model (or --quick)")
        adapters = dict(a.split("=", 1) for a in args.adapter)
        engine = load_engine(model, adapters, args.max_batch, args.device)
        names = [*adapters, model]
        results = {}
        with BackgroundServer(create_app(engine, args.api_key)) as server:
            for label, max_batch in ((f"batched (<= {args.max_batch})", args.max_batch), ("one at a time", 1)):
                engine.max_batch = max_batch
                results[label] = load_test(server.url + "/v1", names, seconds=seconds, **common)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{model}, adapters: {', '.join(adapters) or '(none)'}, {args.max_tokens} tokens per request at most")
    print(header)
    for label, result in results.items():
        print(row(label, result))
    first, second = results.values()
    if second["tokens_per_s"] > 0:
        print(f"batching gives {first['tokens_per_s'] / second['tokens_per_s']:.2f}x the tokens/s")
    return 0 if all(r["failures"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
