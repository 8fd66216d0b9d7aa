"""LoRA adapters as GGUF files, the form llama.cpp loads with ``--lora`` (and Ollama with ``ADAPTER``).

A GGUF LoRA adapter holds, for each adapted weight ``W`` of the base (``blk.{i}.attn_q.weight`` ...), two tensors
``<name>.lora_a`` and ``<name>.lora_b``; in numpy order (what the ``gguf`` package writes) they are PEFT's::

    lora_a: (r, in),   lora_b: (out, r),   W' = W + (alpha / r) * lora_b @ lora_a

with one ``adapter.lora.alpha`` for the whole file and r read from each ``lora_a``. The header says
``general.type = adapter``, ``adapter.type = lora`` and the base's ``general.architecture``; llama.cpp refuses an
adapter of another architecture, a tensor its base lacks and a tensor of the wrong shape.

Differences from our own LoRA that the writer absorbs, exactly:
- the scale: one alpha per file, so a module whose scale is not ``alpha / r`` (rsLoRA's ``alpha / sqrt(r)``, an
  ``alpha_pattern`` entry) has the ratio folded into its ``lora_b``;
- the order of rows: llama.cpp's converter permutes the rows of a Llama ``q``/``k`` weight for its rotary layout
  (``permute`` below), and transformers undoes it when it reads a GGUF; ``lora_b`` of those weights is permuted
  the same way so that it lines up with the GGUF base;
- the methods: anything that exports as a plain PEFT LoRA (LoRA, QLoRA, DyLoRA at its serving rank, PiSSA/MiLoRA
  as a rank-2r LoRA) can be written; DoRA, AdaLoRA, IA3, prompts and a trained task head cannot.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .attach import Attachment
from .registry import get_method

# transformers' model_type -> the gguf architecture of the decoders whose weights llama.cpp names like Llama's.
ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2"}
DTYPES = {"f32": np.float32, "f16": np.float16}


@dataclass
class GgufLora:
    """An adapter in GGUF terms: the architecture, the file's alpha, and per base tensor the pair (a, b)."""

    arch: str  # "llama", "qwen2" (general.architecture)
    alpha: float
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # "blk.0.attn_q.weight" -> (a (r, in), b (out, r)), float32

    def delta(self, name: str) -> np.ndarray:
        """The update of one base tensor as llama.cpp computes it: (alpha / r) b @ a, (out, in)."""
        a, b = self.factors[name]
        return (self.alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64))


def gguf_architecture(model: torch.nn.Module) -> str:
    """The GGUF architecture name of a Llama- or Qwen2-style causal LM, else a one-line refusal."""
    import gguf

    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise InputError(
            f"GGUF export: the model is {kind or type(model).__name__!r}; llama.cpp adapters are written for "
            f"Llama- and Qwen2-style decoders ({', '.join(ARCHITECTURES)})"
        )
    if not type(model).__name__.endswith("ForCausalLM"):
        raise InputError(
            f"GGUF export: the run's model is a {type(model).__name__}, not a causal language model; llama.cpp "
            "runs language models only (a classifier's head has no GGUF form)"
        )
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[kind])]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Llama q/k weight from Hugging Face order to GGUF order: within each head, the two rotary halves
    are interleaved (row pairs (j, j + d/2) become neighbours), as llama.cpp's converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plain_lora(attachment: Attachment) -> tuple[dict, dict[str, torch.Tensor]]:
    """The attachment as PEFT LoRA fields and tensors, or a one-line refusal of what GGUF LoRA cannot hold."""
    name = attachment.method.name
    peft = get_method(name).peft
    if peft is None or peft.kind != "LORA":
        raise InputError(
            f"GGUF export: method {name!r} is not a plain LoRA (W + s B A); llama.cpp's adapters hold plain LoRA only "
            "(lora, qlora, dylora, pissa/milora inits); merge the run (peftlab merge) and convert the model instead"
        )
    if attachment.merged:
        raise InputError("GGUF export: unmerge the adapter before exporting it")
    fields, tensors = peft.export(attachment)
    if fields.get("modules_to_save"):
        raise InputError(
            f"GGUF export: the run also trains {', '.join(fields['modules_to_save'])} in full; a GGUF LoRA adapter "
            "holds low-rank updates only"
        )
    return fields, tensors


def gguf_lora(attachment: Attachment) -> GgufLora:
    """The attachment's LoRA factors named and laid out as llama.cpp expects them (see the module notes)."""
    import gguf

    model = attachment.model
    arch = gguf_architecture(model)
    fields, tensors = plain_lora(attachment)
    config = model.config
    rank, alpha, rslora = int(fields["r"]), float(fields["lora_alpha"]), bool(fields["use_rslora"])
    file_alpha = alpha * math.sqrt(rank) if rslora else alpha  # so that alpha_file / r is the default module's scale
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHITECTURES[config.model_type]], config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module in fields["target_modules"]:
        A = tensors[f"{module}.lora_A.weight"].detach().to("cpu", torch.float32).numpy()  # (r, in)
        B = tensors[f"{module}.lora_B.weight"].detach().to("cpu", torch.float32).numpy()  # (out, r)
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or (tied and target == "output.weight"):
            raise InputError(
                f"GGUF export: module {module!r} has no weight of its own in a llama.cpp {arch} model; "
                "adapt the attention and MLP projections only"
            )
        r = A.shape[0]
        module_alpha = float(fields["alpha_pattern"].get(re.escape(module), alpha))
        scale = module_alpha / math.sqrt(r) if rslora else module_alpha / r
        ratio = scale * r / file_alpha
        if abs(ratio - 1.0) > 1e-12:
            B = B * np.float32(ratio)
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            B = permute(B, n_head if target.endswith("attn_q.weight") else n_kv)
        factors[target] = (np.ascontiguousarray(A), np.ascontiguousarray(B))
    return GgufLora(arch, file_alpha, factors)


@dataclass(frozen=True)
class BaseIdentity:
    """What an adapter says about its base: a name, and the SHA-256 of the base GGUF file where known."""

    name: str
    sha256: str | None = None


def check_base(lora: GgufLora, base: Path) -> list[str]:
    """Refuse ``base`` (a GGUF model file) if llama.cpp could not apply the adapter to it: another architecture, a
    missing tensor, a tensor of another shape. Returns the base's tensor names."""
    reader = read_gguf(base)
    arch = field_value(reader, "general.architecture")
    if arch != lora.arch:
        raise InputError(f"--base {base}: a {arch!r} model; the adapter is for a {lora.arch!r} model")
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # GGUF order: (in, out)
    for name, (a, b) in lora.factors.items():
        if name not in shapes:
            raise InputError(f"--base {base}: has no tensor {name!r}; the adapter was trained on another model")
        if shapes[name][:2] != (a.shape[1], b.shape[0]):
            raise InputError(
                f"--base {base}: tensor {name!r} is {shapes[name][1]}x{shapes[name][0]}, the adapter's update is "
                f"{b.shape[0]}x{a.shape[1]}; the adapter was trained on another model"
            )
    return list(shapes)


def read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:120]})") from None


def field_value(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def write_gguf_lora(
    attachment: Attachment, out: Path, base: BaseIdentity, dtype: str = "f32", base_file: Path | None = None
) -> GgufLora:
    """Write the attachment as a llama.cpp LoRA adapter GGUF (tensors in ``dtype``: f32 or f16). With
    ``base_file``, the base GGUF is checked first (``check_base``)."""
    import gguf

    lora = gguf_lora(attachment)
    if base_file is not None:
        check_base(lora, base_file)
    writer = gguf.GGUFWriter(str(out), lora.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
    writer.add_name(f"{base.name} {attachment.method.name} adapter")
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, base.name)
    writer.add_string("peftlab.method", attachment.method.name)
    writer.add_string("peftlab.base.name", base.name)
    if base.sha256:
        writer.add_string("peftlab.base.sha256", base.sha256)
    for name, (a, b) in lora.factors.items():
        writer.add_tensor(name + ".lora_a", a.astype(DTYPES[dtype]))
        writer.add_tensor(name + ".lora_b", b.astype(DTYPES[dtype]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return lora
