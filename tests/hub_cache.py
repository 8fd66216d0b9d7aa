"""A Hugging Face hub cache built on disk in the hub's own layout, for testing Hub IDs offline.

The layout is the one ``huggingface_hub`` writes and reads (``<cache>/<kind>s--<org>--<name>/``): file contents in
``blobs/`` named by their hash, ``snapshots/<commit>/<path>`` as relative symlinks to them, and ``refs/main`` holding
the commit. peftlab then reads it through the real ``huggingface_hub`` and ``datasets`` code with
``HF_HUB_OFFLINE=1``, exactly as on a machine that downloaded the repository earlier and lost its connection.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

COMMIT = "5f0c2b9e3d1a4c7b8e6f9a0b1c2d3e4f5a6b7c8d"


def put_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], kind: str = "model", commit: str = COMMIT):
    """Put ``files`` (path in the repository -> local file or bytes) into ``cache`` as ``repo_id`` at ``commit``;
    returns the snapshot folder."""
    root = Path(cache) / f"{kind}s--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def offline_env(hf_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a peftlab command that finds the hub unreachable and ``hf_home`` as its cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", **extra}


def peftlab(*args, env: dict[str, str], cwd: Path | None = None) -> tuple[int, str, str]:
    """Run the peftlab command in its own process (the hub settings are read when huggingface_hub is imported)."""
    done = subprocess.run(
        [sys.executable, "-m", "peftlab", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )
    return done.returncode, done.stdout, done.stderr
