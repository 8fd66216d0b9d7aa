"""Crash-safe writes: every file is written under a temporary name and renamed into place.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never half of one.
Folders that must change together (an adapter, a checkpoint) are written as a whole into a temporary sibling
folder and swapped in with two renames; ``read_folder`` finds the previous version if a crash fell between them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from safetensors import SafetensorError

from .errors import InputError, PeftlabError


@functools.cache
def _umask() -> int:
    """The process's umask, which can only be read by setting it: done once, at the first write, and put back."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed and renamed to ``path``."""
    path = Path(path)
    _ensure_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except WRITE_ERRORS as e:
        raise _write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``path`` as a whole.

    The swap is two renames: the old folder moves aside to ``<name>.old``, the new one moves in, the old one is
    deleted. ``read_folder`` falls back to ``<name>.old`` if a crash left only that.
    """
    path = Path(path)
    _ensure_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):  # files written by other libraries get ordinary permissions too
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        old = path.with_name(path.name + ".old")
        if path.exists():
            if old.exists():  # a stale copy from an earlier swap; the current folder is the good one
                shutil.rmtree(old)
            os.replace(path, old)
        # (if only <name>.old exists, an earlier swap was interrupted: it stays until the new folder is in place)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except WRITE_ERRORS as e:
        raise _write_error(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), overwrite: bool = False, flag: str = "--out"
) -> Path:
    """The output folder of a command, or a one-line refusal: peftlab writes only into a folder that does not exist
    or is empty, replaces a non-empty one only with ``--overwrite``, and never one that is, holds or lies inside one
    of the command's inputs (its run, adapter or model folders), the current folder or a folder above it."""
    if not str(out).strip():
        raise InputError(f"{flag}: expected a folder name, got an empty string")
    path = Path(out).expanduser()
    where = path.resolve()
    here = Path.cwd().resolve()
    if where == here or where in here.parents or where == Path.home().resolve():
        raise InputError(f"{flag} {out}: is the current folder, one above it or the home folder; name a new folder")
    for source in inputs:
        src = Path(source).expanduser().resolve()
        if where == src or where in src.parents or src in where.parents:
            relation = "is" if where == src else "holds" if where in src.parents else "lies inside"
            raise InputError(f"{flag} {out}: {relation} this command's input {source}; name a new folder")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InputError(f"{flag} {out}: exists and is not a folder; name a new folder")
    aside = path.with_name(path.name + ".old")
    if aside.exists():  # atomic_folder moves the old version there while it swaps, and deletes it after
        raise InputError(f"{flag} {out}: {aside} exists, and peftlab uses that name while writing {out}; move it")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError(
            f"{flag} {out}: already exists and is not empty; name a new folder, or add --overwrite to replace it"
        )
    return path


def check_output_file(out: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Path:
    """An output file that does not exist yet (or may be replaced, with ``--overwrite``), else a one-line refusal."""
    if not str(out).strip():
        raise InputError(f"{flag}: expected a file name, got an empty string")
    path = Path(out).expanduser()
    if path.is_dir():
        raise InputError(f"{flag} {out}: is a folder; name a file")
    if path.exists() and not overwrite:
        raise InputError(f"{flag} {out}: already exists; name a new file, or add --overwrite to replace it")
    return path


LOCK_FILE = ".peftlab.lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, report: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold ``folder/.peftlab.lock`` while a process writes into ``folder`` (created if missing): a second process
    is refused in one line naming the first. A lock left by a process that no longer runs on this machine is
    reported through ``report`` and taken over, so a killed run resumes. On exit the lock goes, and so does the
    folder if this call created it and it stayed empty."""
    folder = Path(folder)
    created = not folder.exists()
    _ensure_parent(folder / LOCK_FILE)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
        except FileExistsError:
            holder = _lock_holder(lock)
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _process_alive(pid):
                report(f"note: {folder}: removed a stale lock of process {pid} (no longer running)")
                lock.unlink(missing_ok=True)
                continue
            if not holder:  # being written this instant, or unreadable: treat as held
                holder = {"pid": "?", "host": "?", "since": "?"}
            raise InputError(
                f"{folder}: process {holder.get('pid')} on {holder.get('host')} has been writing into this folder "
                f"since {holder.get('since')}; wait for it, or choose another --out (if that process is gone, "
                f"delete {lock})"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    try:
        yield lock
    finally:
        if _lock_holder(lock).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def _lock_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


# A failed write: the OS's error, or safetensors' own for the same causes (a full disk) while it writes a file.
WRITE_ERRORS = (OSError, SafetensorError)


def _write_error(path: Path, e: Exception) -> PeftlabError:
    """A failed write (disk full, read-only file system...) as one line naming the file; nothing half-written
    stays, because the temporary file or folder is removed by the caller's ``finally``."""
    reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return PeftlabError(f"{path}: could not be written ({reason}); nothing was left half-written")


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporary files and folders that a killed process left in ``folder`` (``.<name>.*.tmp``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.glob(".*.tmp"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def read_folder(path: str | os.PathLike) -> Path | None:
    """The folder written by ``atomic_folder`` at ``path``, or its previous version after an interrupted swap."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    return old if old.is_dir() else None


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{path.parent}: cannot create the output folder ({e.strerror or e})") from e
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{path.parent}: the output folder is not writable")


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """Read a UTF-8 text file, turning every failure into a one-line InputError that names the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Read a JSON object, turning every failure into a one-line InputError that names the file."""
    path = Path(path)
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: {what} is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise InputError(f"{path}: {what} is JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: {what} must hold a JSON object, found {type(obj).__name__}")
    return obj
