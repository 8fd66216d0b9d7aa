"""Throughput of mixed-batch multi-adapter inference: peftlab's ``MultiLoraModel`` against Hugging Face PEFT's
``adapter_names`` path (a ``PeftModel`` with the same N adapters loaded, ``model(..., adapter_names=[...])``).

Both serve the same N LoRA adapters (random factors, each with its own 2-class head, written once in peftlab's
format and once converted to PEFT's), on the same batches where every row draws an adapter or none at random.
Timed in one process with alternating repeats; the medians give rows per second and the ratio. The outputs are
compared too (max abs difference), so the speed is measured on computations that agree.

``peft`` is imported only here, for the comparison (it is a test dependency, never used by the library).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..core.attach import attach
from ..core.hf_peft import export_hf
from .multi import MultiLoraModel


def random_adapters(make_model, root: Path, count: int, r: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """``count`` LoRA adapters with random non-zero factors and heads: peftlab folders and their PEFT versions."""
    ours, theirs = [], []
    for i in range(count):
        attachment = attach(make_model(), "lora", r=r, alpha=2.0 * r)
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in attachment.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        ours.append(attachment.save(root / f"adapter{i}"))
        theirs.append(export_hf(attachment, root / f"hf{i}", task_type="SEQ_CLS"))
    return ours, theirs


@torch.no_grad()
def benchmark(
    make_model, count: int = 8, r: int = 8, batch: int = 32, length: int = 64, repeats: int = 10, seed: int = 0
) -> dict:
    """Rows per second of peftlab's mixed batch and PEFT's ``adapter_names`` path over ``count`` adapters, with the
    plain base model (no adapters) as the floor; ``make_model()`` builds a fresh base classifier."""
    from peft import PeftModel

    def fresh():  # the same base (and the same fresh head, which rows without an adapter use) every time
        torch.manual_seed(seed)
        return make_model().eval()

    with tempfile.TemporaryDirectory() as tmp:
        ours_paths, hf_paths = random_adapters(fresh, Path(tmp), count, r, seed)
        ours = MultiLoraModel.from_folders(fresh(), ours_paths).eval()
        theirs = PeftModel.from_pretrained(fresh(), str(hf_paths[0]), adapter_name="a0")
        for i, path in enumerate(hf_paths[1:], start=1):
            theirs.load_adapter(str(path), adapter_name=f"a{i}")
        theirs.eval()
    plain = fresh()
    generator = torch.Generator().manual_seed(seed)
    vocab = plain.config.vocab_size
    input_ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(input_ids)
    adapter_ids = torch.randint(-1, count, (batch,), generator=generator)
    names = [f"a{i}" if i >= 0 else "__base__" for i in adapter_ids.tolist()]

    runs = {
        "peftlab": lambda: ours(input_ids=input_ids, attention_mask=mask, adapter_ids=adapter_ids).logits,
        "peft": lambda: theirs(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits,
        "base": lambda: plain(input_ids=input_ids, attention_mask=mask).logits,
    }
    difference = (runs["peftlab"]() - runs["peft"]()).abs().max().item()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # alternating, so load from other processes hits every contender alike
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "adapters": count,
        "rank": r,
        "batch": batch,
        "length": length,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "median_s": median,
        "rows_per_s": {k: batch / v for k, v in median.items()},
        "speedup_vs_peft": median["peft"] / median["peftlab"],
        "overhead_vs_base": median["peftlab"] / median["base"],
        "max_abs_difference_vs_peft": difference,
    }
