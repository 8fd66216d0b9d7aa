"""The KV cache as a forward pre-hook sees it, under either of its keyword names.

transformers 5.24 renamed the cache keyword of ``generate`` and of the models' ``forward`` from ``past_key_values``
to ``cache``; the old name is still accepted, and renamed by a decorator on ``forward``, which runs after the forward
pre-hooks. So a pre-hook sees ``cache`` when ``generate`` (5.24 on) or a caller passes the new name, and
``past_key_values`` when ``generate`` (up to 5.23) or a caller passes the old one: it must look for both.
"""

from __future__ import annotations

CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_length(kwargs: dict) -> int:
    """How many positions the KV cache among a forward call's keyword arguments already holds (0 without one)."""
    for name in CACHE_KEYWORDS:
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0
