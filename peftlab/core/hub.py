"""Small facts about the Hugging Face Hub shared by models and data: what a Hub ID looks like, which ID a cache
folder holds, where the cache is and why the hub could not be reached. ``huggingface_hub`` is imported only when
asked."""

from __future__ import annotations

from pathlib import Path


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or a bare ``name`` as the hub accepts it; never a path (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id_of_folder(path: str | Path) -> str | None:
    """``org/name`` for a snapshot folder inside a Hugging Face cache (``models--org--name/snapshots/<commit>``)."""
    parts = Path(path).expanduser().resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/", 1)
    return None


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline_reason() -> str:
    """Why the hub was not asked: ``HF_HUB_OFFLINE=1``, or no connection."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no connection"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
