"""A LoRA adapter merged into a GGUF base model, written as a GGUF model file llama.cpp runs on its own.

The base GGUF is copied key by key and tensor by tensor; each adapted weight is dequantised (as transformers does
when peftlab builds its fp32 base from the same file), the update ``(alpha / r) b @ a`` added, and the sum written
in f32 or f16. Every other tensor keeps its bytes, quantised as in the base. So the merged file computes the model
peftlab trained -- the fp32 weights read from this GGUF plus the update -- up to llama.cpp's own arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from .gguf_lora import DTYPES, GgufLora, check_base, field_value, read_gguf

# Keys the writer sets itself, or that would describe the base rather than the merged file.
SKIPPED = ("GGUF.", "general.architecture", "general.file_type")


def write_merged_gguf(lora: GgufLora, base: Path, out: Path, dtype: str = "f32", note: str = "") -> int:
    """Write ``base`` with ``lora`` merged into its weights to ``out``; returns the number of merged tensors."""
    import gguf

    check_base(lora, base)
    reader = read_gguf(base)
    writer = gguf.GGUFWriter(str(out), lora.arch)
    for key, field in reader.fields.items():
        if key.startswith(SKIPPED):
            continue
        value = field.contents()
        if key == "general.name":
            value = f"{value} + {note}" if note else value
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub)
    if field_value(reader, "general.name") is None and note:
        writer.add_name(note)
    merged = 0
    for t in reader.tensors:
        if t.name in lora.factors:
            weight = gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
            if not np.isfinite(weight).all():
                raise InputError(f"{base}: tensor {t.name!r} holds non-finite values")
            writer.add_tensor(t.name, (weight.astype(np.float64) + lora.delta(t.name)).astype(DTYPES[dtype]))
            merged += 1
        elif t.data.dtype == np.uint8:  # quantised: raw blocks, shape from the block layout
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        else:
            writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return merged
