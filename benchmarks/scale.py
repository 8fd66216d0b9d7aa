"""The tables of docs/scale.md: ``peftlab estimate`` on the seeds' models and on Llama shapes from 1B to 70B.

    .venv/bin/python benchmarks/scale.py > docs/scale-tables.md

Models are built from their public configurations on the meta device (no weights). The seeds' configurations are
the JSON files in tests/configs/; the Llama and Qwen shapes are written out below.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from peftlab.estimate import EstimateOptions, estimate

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "configs"
GB = 1e9
GIB = 1024**3

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5}
SHAPES = {
    "Llama-3.2-1B": {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "Qwen2.5-1.5B": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
                     "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "Llama-3.2-3B": {**LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "Llama-3.1-8B": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "Llama-2-13B": {**LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "Llama-3.1-70B": {**LLAMA, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip


def gb(n: int) -> str:
    return f"{n / GB:.1f}"


def seeds() -> None:
    print("| model | method | seeds' figure | peftlab estimate (GB) | weights | gradients | optimizer | activations |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [
        ("t0_3b", "full", {}, "47.14 GB"),
        ("t0_3b", "lora", {"r": 8, "alpha": 32.0, "targets": ["q", "v"]}, "14.4 GB"),
        ("mt0-xxl", "full", {}, "out of memory (80 GB)"),
        ("mt0-xxl", "lora", {"r": 8, "alpha": 32.0, "targets": ["q", "v"]}, "56 GB"),
        ("bloomz-7b1", "full", {}, "out of memory (80 GB)"),
        ("bloomz-7b1", "lora", {"r": 8, "alpha": 32.0, "targets": ["query_key_value"]}, "32 GB"),
    ]
    from peftlab.core.registry import get_method

    for name, method, options, figure in cases:
        config = get_method(method).config(**options) if options else None
        m = estimate(EstimateOptions(model=str(CONFIGS / f"{name}.json"), batch_size=8, length=64), method, config)
        m = m["memory"]
        parts = " | ".join(gb(m[k]) for k in ("weights", "gradients", "optimizer", "activations"))
        print(f"| {name} | {method} | {figure} | **{gb(m['total'])}** | {parts} |")
    print()
    print("| model | method | seeds' figure | peftlab estimate (GB) | weights | gradients | optimizer | activations |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ("full", "lora", "qlora"):
        for checkpointing in (False, True):
            options = EstimateOptions(model=str(CONFIGS / "llama-2-7b.json"), batch_size=1, length=512, dtype="bf16",
                                      gradient_checkpointing=checkpointing)  # fmt: skip
            m = estimate(options, method)["memory"]
            parts = " | ".join(gb(m[k]) for k in ("weights", "gradients", "optimizer", "activations"))
            figure = {"full": "about 60 GB", "lora": "about 23 GB"}.get(method, "")
            label = method + (" + checkpointing" if checkpointing else "")
            print(f"| Llama-2-7B | {label} | {figure} | **{gb(m['total'])}** | {parts} |")
    print()


def shapes(length: int) -> None:
    header = ["model", "method", "checkpointing", "weights", "gradients + optimizer", "activations", "total (GiB)"]
    print("| " + " | ".join([*header, "fits (24 / 48 / 80 GiB)"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, config in SHAPES.items():
            path = Path(folder) / f"{name}.json"
            path.write_text(json.dumps(config))
            for method in ("full", "lora", "qlora"):
                for checkpointing in (False, True):
                    options = EstimateOptions(model=str(path), batch_size=1, length=length, dtype="bf16",
                                              gradient_checkpointing=checkpointing)  # fmt: skip
                    m = estimate(options, method)["memory"]
                    fits = ", ".join(f"{g}" for g in (24, 48, 80) if m["total"] <= g * GIB) or "none"
                    state = (m["gradients"] + m["optimizer"]) / GIB
                    done = "yes" if checkpointing else "no"
                    cells = [name, method, done, f"{m['weights'] / GIB:.1f}", f"{state:.1f}",
                             f"{m['activations'] / GIB:.1f}", f"**{m['total'] / GIB:.1f}**", fits]  # fmt: skip
                    print("| " + " | ".join(cells) + " |")
                    sys.stdout.flush()
    print()


if __name__ == "__main__":
    seeds()
    shapes(2048)
