"""``peftlab export RUN --format gguf``: a run's LoRA adapter as a llama.cpp adapter GGUF, or merged into its GGUF
base as a GGUF model (see ``core.gguf_lora`` and ``core.gguf_merge`` for the formats)."""

from __future__ import annotations

from pathlib import Path

from ..assets.source import gguf_asset_sha256, source_gguf
from ..core.attach import Attachment
from ..core.gguf_lora import BaseIdentity, gguf_lora, write_gguf_lora
from ..core.gguf_merge import write_merged_gguf
from ..errors import InputError
from ..fileio import atomic_file


def export_gguf(
    attachment: Attachment,
    model: str,
    out: Path,
    merged: bool = False,
    base_file: str | Path | None = None,
    dtype: str = "f32",
    quiet: bool = True,
) -> list[str]:
    """Write the run's adapter (or, ``merged``, its merged model) as GGUF to ``out``; returns notes for the user.
    ``model`` is the run's base as the run names it; ``base_file`` the base GGUF to check against (and to merge
    into), else the packaged model's own GGUF where the base is one."""
    lora = gguf_lora(attachment)  # refuses what GGUF LoRA cannot hold before anything is fetched
    known = gguf_asset_sha256(model)
    notes: list[str] = []
    if base_file is not None:
        base_file = Path(base_file).expanduser()
        if not base_file.is_file():
            raise InputError(f"--base {base_file}: no such file")
    elif merged:
        if known is None:
            raise InputError(
                f"--merged: the run's base {model!r} was not built from a GGUF file; name a GGUF of it with --base FILE"
            )
        base_file = source_gguf(model, quiet=quiet)
    if base_file is not None and known is not None:
        from ..assets.store import sha256_file

        if sha256_file(base_file) != known:
            notes.append(
                f"note: {base_file} is not the GGUF the run's base {model} was built from (its shapes fit); "
                "the adapter was trained on that file's weights"
            )
    with atomic_file(out) as tmp:  # written beside ``out`` and renamed: an interrupted export leaves no file
        if merged:
            count = write_merged_gguf(lora, base_file, tmp, dtype, f"{attachment.method.name} adapter (peftlab)")
            notes.insert(
                0,
                f"wrote {model} with the {attachment.method.name} adapter merged into {count} tensors "
                f"({dtype}; the other tensors as in {base_file.name}) to {out}",
            )
        else:
            write_gguf_lora(attachment, tmp, BaseIdentity(model, known), dtype, base_file)
            notes.insert(
                0,
                f"wrote a llama.cpp LoRA adapter ({lora.arch}, {len(lora.factors)} tensors, {dtype}) "
                f"for {model} to {out}",
            )
    return notes
