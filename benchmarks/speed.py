"""Speed and memory of a LoRA training step: peftlab against the floor, Hugging Face PEFT and full fine-tuning.

Everything runs in one process on one fixed batch of random tokens (every position real, so the batch is exactly
``batch x length`` tokens). The training variants, each on its own copy of the model:

- ``floor``: the frozen base's forward plus a backward computing only activation gradients (no weight gradient,
  no optimiser step), ``peftlab.bench.measure.FloorStep``: what no fine-tuning method can beat;
- ``lora``: peftlab's LoRA (r, alpha, dropout and targets as given), one full optimiser step
  (``peftlab.bench.measure.TrainStep``: forward, backward, clipping, AdamW, scheduler, zero_grad);
- ``peft``: Hugging Face PEFT's LoRA with the same config and the same starting weights (peftlab's adapter exported
  to the PEFT format and loaded by ``PeftModel.from_pretrained``, ``peftlab.bench.peer``), the same step;
- ``full``: full fine-tuning, the same step over every weight.

They take turns, one step each, for ``--repeats`` rounds (``peftlab.bench.measure.alternate``); the medians of
the per-round ratios are reported, so load that drifts between rounds cancels. Memory is the tensor split of
``TrainStep.memory``: weights, gradients, optimiser state and the activations saved for backward.

Inference (eval mode, no gradients) compares the plain base, peftlab's LoRA unmerged, the same LoRA merged
(``Attachment.merge``; the wrappers stay in place) and PEFT's LoRA unmerged, in the same alternating way.

Run from the repository root::

    python benchmarks/speed.py                      # minilm (32 x 64) and smollm2-135m (8 x 256)
    python benchmarks/speed.py --models minilm --repeats 15 --profile
    python benchmarks/speed.py --quick              # tiny built models, seconds (the test uses this)

On CUDA (``--device cuda``, the default when one is present) the steps run under bf16 autocast and the memory
column adds ``torch.cuda.max_memory_allocated`` per variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from peftlab.bench.measure import FloorStep, TrainStep, alternate  # noqa: E402
from peftlab.bench.peer import build_peer  # noqa: E402
from peftlab.core.attach import attach  # noqa: E402
from peftlab.core.hooks import TrainingHooks  # noqa: E402
from peftlab.methods.lora import LoraConfig  # noqa: E402
from peftlab.train.lm_task import LanguageModelTask  # noqa: E402
from peftlab.train.loop import ClassificationTask, TrainSettings  # noqa: E402

TARGETS = {  # ratio name -> (limit, what it compares)
    "lora/floor": (1.15, "step time, peftlab LoRA / floor"),
    "lora/peft": (0.80, "step time, peftlab LoRA / PEFT LoRA"),
    "lora/full": (0.70, "step time, peftlab LoRA / full fine-tuning"),
    "memory lora/peft": (1.00, "peak tensor memory, peftlab LoRA / PEFT LoRA"),
    "merged/base": (1.03, "inference time, merged LoRA / plain base"),
}


def unfused(attachment, step) -> None:
    """LoRA through plain autograd ops (``base(x) + s * B(A(x))``), as before ``FusedLoraLinear``."""
    for layer in attachment.layers().values():
        layer.fused = False


def compiled(attachment, step) -> None:
    """``torch.compile`` of the whole model (compiled on the warm-up steps)."""
    step.model = torch.compile(attachment.model)


def checkpointing(attachment, step) -> None:
    """Gradient checkpointing of every transformer block (activations recomputed in the backward pass)."""
    attachment.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class OtherThreads:
    """A step run with another number of intra-op threads (restored afterwards)."""

    def __init__(self, step, threads: int):
        self.step, self.threads = step, threads

    def __call__(self, batch):
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self.step(batch)
        finally:
            torch.set_num_threads(before)

    def memory(self, batch):
        return self.step.memory(batch)


def with_threads(threads: int):
    def change(attachment, step):
        return OtherThreads(step, threads)

    change.__doc__ = f"the same LoRA step on {threads} intra-op threads"
    return change


EXTRAS = {
    "unfused": unfused,
    "compile": compiled,
    "checkpointing": checkpointing,
    "threads1": with_threads(1),
    "threads2": with_threads(2),
}


@dataclass
class Case:
    """One model and batch shape: ``kind`` is ``classify`` (a sequence classifier) or ``sft`` (a causal LM)."""

    name: str
    kind: str
    batch: int
    length: int
    build: object = field(repr=False)  # () -> a fresh model, the same weights every call


def packaged(name: str, kind: str):
    from peftlab.models import load_causal_lm, load_classifier, resolve_model

    path = resolve_model(name, quiet=True)

    def build():
        torch.manual_seed(0)  # the same new head every call
        if kind == "sft":
            return load_causal_lm(path)
        return load_classifier(path, ["neg", "pos"], pad_token_id=0)

    return build


def tiny(kind: str):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        if kind == "sft":
            config = LlamaConfig(
                vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64,
            )  # fmt: skip
            return LlamaForCausalLM(config)
        config = BertConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return BertForSequenceClassification(config)

    return build


def cases(quick: bool, names: list[str]) -> list[Case]:
    if quick:
        return [Case("tiny-bert", "classify", 4, 16, tiny("classify")), Case("tiny-llama", "sft", 2, 16, tiny("sft"))]
    shapes = {"minilm": ("classify", 32, 64), "smollm2-135m": ("sft", 8, 256)}
    return [Case(n, *shapes[n], packaged(n, shapes[n][0])) for n in names]


def fixed_batch(case: Case, vocab: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (case.batch, case.length), generator=g)  # (B, T), every position a real token
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if case.kind == "sft":
        batch["labels"] = ids.clone()  # (B, T): every token is a target
    else:
        batch["labels"] = torch.randint(0, 2, (case.batch,), generator=g)  # (B,)
    return {k: v.to(device) for k, v in batch.items()}


def median_ratio(times: dict, a: str, b: str) -> float:
    """The median over rounds of ``a``'s time / ``b``'s time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a]["times"], times[b]["times"], strict=True))


def cuda_peak(device, fn) -> int | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def profile_step(step, batch, rows: int = 15) -> str:
    """Top operators of a few steps by self CPU (or CUDA) time, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step(batch)
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(batch)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run_case(case: Case, args, device, log=print) -> dict:
    precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    settings = TrainSettings(precision=precision, max_grad_norm=1.0)
    total = 1000
    task = LanguageModelTask() if case.kind == "sft" else ClassificationTask(2)
    lora = LoraConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=args.targets)
    lr = 1e-3

    full = attach(case.build().to(device), "full")
    vocab = full.model.get_input_embeddings().num_embeddings
    batch = fixed_batch(case, vocab, device)
    ours = attach(case.build().to(device), "lora", lora)
    with tempfile.TemporaryDirectory() as tmp:
        peer = build_peer(attach(case.build(), "lora", lora), case.build(), case.kind, Path(tmp) / "peer", total)
    peer.model.to(device)

    steps = {
        "floor": FloorStep(full.model, task, settings, device),
        "lora": TrainStep(ours, task, settings, lr, TrainingHooks(), device, total),
        "peft": TrainStep(peer, task, settings, lr, TrainingHooks(), device, total),
        "full": TrainStep(full, task, settings, 2e-5, TrainingHooks(), device, total),
    }
    for extra in args.extra:  # peftlab LoRA variants measured beside the default, each on its own model copy
        variant = attach(case.build().to(device), "lora", lora)
        step = TrainStep(variant, task, settings, lr, TrainingHooks(), device, total)
        steps[f"lora+{extra}"] = EXTRAS[extra](variant, step) or step
    attn = getattr(full.model.config, "_attn_implementation", None)
    record: dict = {
        "model": case.name,
        "kind": case.kind,
        "batch": case.batch,
        "length": case.length,
        "tokens": case.batch * case.length,
        "attention": attn,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets},
        "adapted_layers": len(ours.targets),
        "trainable": {"lora": ours.trainable_count(), "peft": peer.trainable_count(), "full": full.trainable_count()},
        "memory": {},
    }
    for name, step in steps.items():
        record["memory"][name] = step.memory(batch)
        peak = cuda_peak(device, lambda s=step: s(batch))
        if peak is not None:
            record["memory"][name]["cuda_peak"] = peak
    log(f"[speed] {case.name}: training steps, {args.repeats} rounds")
    timings = alternate({n: (lambda s=s: s(batch)) for n, s in steps.items()}, args.repeats, args.warmup, device)
    record["train"] = {
        n: {"median_s": t["median"], "min_s": t["min"], "tokens_per_s": record["tokens"] / t["median"]}
        | {"times": t["times"]}
        for n, t in timings.items()
    }
    ratios = {
        "lora/floor": median_ratio(timings, "lora", "floor"),
        "lora/peft": median_ratio(timings, "lora", "peft"),
        "lora/full": median_ratio(timings, "lora", "full"),
        "peft/floor": median_ratio(timings, "peft", "floor"),
        "peft/full": median_ratio(timings, "peft", "full"),
        "memory lora/peft": record["memory"]["lora"]["total"] / record["memory"]["peft"]["total"],
        "memory lora/full": record["memory"]["lora"]["total"] / record["memory"]["full"]["total"],
    }
    for extra in args.extra:
        ratios[f"lora+{extra}/lora"] = median_ratio(timings, f"lora+{extra}", "lora")
        ratios[f"memory lora+{extra}/lora"] = (
            record["memory"][f"lora+{extra}"]["total"] / record["memory"]["lora"]["total"]
        )
    if args.profile:
        record["profile"] = profile_step(steps["lora"], batch)

    # Inference: plain base, LoRA unmerged, LoRA merged, PEFT unmerged; eval mode, no gradients.
    del steps
    merged = attach(case.build().to(device), "lora", lora)
    with torch.no_grad():
        for layer in merged.layers().values():  # a trained-looking update, so merging changes the weights
            layer.lora_B.normal_(std=0.01)
    merged.merge()
    models = {"base": full.model, "unmerged": ours.model, "merged": merged.model, "peft": peer.model}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else None
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward(model):
        model.eval()
        with torch.no_grad(), autocast or torch.autocast("cpu", enabled=False):
            model(**inputs)

    log(f"[speed] {case.name}: inference, {args.repeats} rounds")
    inference = alternate({n: (lambda m=m: forward(m)) for n, m in models.items()}, args.repeats, args.warmup, device)
    record["inference"] = {
        n: {"median_s": t["median"], "tokens_per_s": record["tokens"] / t["median"], "times": t["times"]}
        for n, t in inference.items()
    }
    ratios["merged/base"] = median_ratio(inference, "merged", "base")
    ratios["unmerged/base"] = median_ratio(inference, "unmerged", "base")
    ratios["peft unmerged/base"] = median_ratio(inference, "peft", "base")
    record["ratios"] = ratios
    record["targets"] = {
        k: {"ratio": ratios[k], "limit": limit, "met": ratios[k] <= limit} for k, (limit, _) in TARGETS.items()
    }
    return record


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(results: dict) -> str:
    """The report section: one block per model."""
    env = results["environment"]
    lines = [
        f"Measured {env['date']} on {env['device']} ({env['threads']} threads, load average {env['load_before']} "
        f"before / {env['load_after']} after), torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}; {env['repeats']} alternating rounds after {env['warmup']} warm-up steps; ratios are "
        "medians of same-round ratios.",
        "",
    ]
    for r in results["models"]:
        lines += [
            f"### {r['model']} ({r['kind']}, batch {r['batch']} x {r['length']} tokens, attention "
            f"`{r['attention']}`, LoRA r={r['lora']['r']} alpha={r['lora']['alpha']} dropout={r['lora']['dropout']} "
            f"on {r['adapted_layers']} layers)",
            "",
            "| training step | median s | tokens/s | weights MiB | grads MiB | optimizer MiB | activations MiB "
            "| total MiB | trainable |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, t in r["train"].items():
            m = r["memory"][n]
            trainable = r["trainable"].get(n.split("+")[0], 0)
            lines.append(
                f"| {n} | {t['median_s']:.4f} | {t['tokens_per_s']:.0f} | {mib(m['weights'])} | {mib(m['gradients'])} "
                f"| {mib(m['optimizer'])} | {mib(m['activations'])} | {mib(m['total'])} | {trainable:,} |"
            )
        lines += ["", "| inference (eval, no grad) | median s | tokens/s |", "|---|---:|---:|"]
        for n, t in r["inference"].items():
            lines.append(f"| {n} | {t['median_s']:.4f} | {t['tokens_per_s']:.0f} |")
        lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
        for k, v in r["ratios"].items():
            target = r["targets"].get(k)
            if target:
                lines.append(f"| {k} | {v:.3f} | <= {target['limit']:.2f} | {'yes' if target['met'] else 'no'} |")
            else:
                lines.append(f"| {k} | {v:.3f} | | |")
        lines.append("")
    return "\n".join(lines)


def table(record: dict) -> str:
    rows = [f"{record['model']}: " + ", ".join(f"{n} {t['median_s']:.4f}s" for n, t in record["train"].items())]
    for k, v in record["ratios"].items():
        target = record["targets"].get(k)
        mark = "" if target is None else f"  (target <= {target['limit']:.2f}: {'met' if target['met'] else 'NOT met'})"
        rows.append(f"  {k:<20} {v:7.3f}{mark}")
    return "\n".join(rows)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"], choices=["minilm", "smollm2-135m"])
    p.add_argument("--quick", action="store_true", help="tiny built models (seconds; for tests)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 11, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 2, quick 1)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", nargs="+", default=["all-linear"])
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        choices=sorted(EXTRAS),
        help="also time peftlab LoRA variants: unfused (plain autograd ops), compile (torch.compile), checkpointing, "
        "threads1 / threads2 (the step on 1 or 2 intra-op threads)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the LoRA step")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--markdown", type=Path, default=None, help="write the report section here")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 11)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.processor()}".strip(),
        "threads": torch.get_num_threads(),
        "load_before": load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    results = {"environment": env, "models": []}
    for case in cases(args.quick, args.models):
        record = run_case(case, args, device)
        results["models"].append(record)
        print(table(record), flush=True)
        if "profile" in record:
            print(record["profile"], flush=True)
    env["load_after"] = load_average()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(markdown(results) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
