"""AdapterDrop's inference speed gain: median forward time of a bottleneck adapter (or a fusion) on a real model with
the adapters of the lowest n layers skipped, n = 0, layers / 2 and all layers, next to the plain model.

    python scripts/adapterdrop_speed.py --method pfeiffer
    python scripts/adapterdrop_speed.py --method adapter_fusion --adapters RUN1 RUN2 RUN3

The adapters' values do not change the time, so fresh ones are timed (a fusion needs its stage-one folders).
"""

from __future__ import annotations

import argparse
import json

import torch

import peftlab
from peftlab.methods.bottleneck import block_adapters, drop_speed
from peftlab.run import RunOptions, build_model, prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="pfeiffer")
    parser.add_argument("--adapters", nargs="+", default=[], help="stage-one folders (adapter_fusion)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="rotten_tomatoes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = RunOptions(model=args.model, data=args.data)
    prepared = prepare_data(options, quiet=True)
    plain = build_model(options, prepared, 0).eval()
    model = build_model(options, prepared, 0).eval()
    extra = {"adapters": args.adapters} if args.adapters else {}
    attachment = peftlab.attach(model, args.method, **extra)
    layers = max(layer.blocks for layer in block_adapters(attachment))
    batch = prepared.splits["test"].batch(range(args.batch_size))
    batch.pop("labels")
    drops = sorted({0, layers // 2, layers})
    times = drop_speed(attachment, batch, drops, repeats=args.repeats, plain=plain)
    base = times[0]
    result = {
        "method": args.method,
        "model": args.model,
        "batch": list(batch["input_ids"].shape),
        "threads": args.threads,
        "repeats": args.repeats,
        "median_ms": {str(k): round(v * 1000, 2) for k, v in times.items()},
        "speedup_vs_no_drop": {str(k): round(base / v, 3) for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
