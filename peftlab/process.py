"""What peftlab's own commands choose for their process, and nothing else.

Importing peftlab changes no environment variable, logging level or global setting of the user's process: a
notebook that imports it keeps its hub access, its warnings and its progress bars. Only ``peftlab`` commands (the
CLI's ``main``) call ``quiet_libraries`` to keep their output to peftlab's own lines, and run within
``library_warnings_filtered`` (the library warnings that are noise to a peftlab user, filtered by message and
category). A library function that needs a setting for a moment (converting a GGUF file without transformers' bar)
takes it with ``scoped`` and puts it back.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Warnings of the libraries peftlab calls that are about the libraries themselves, not about anything a peftlab
# user or peftlab's own calls can change: (category, start of the message, why it is noise). Filtered only within a
# peftlab command (``library_warnings_filtered``), never at import.
LIBRARY_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (
        FutureWarning,
        "`is_gradient_checkpointing` is deprecated",
        "peft's PeftModel (the bench's PEFT peer) reads this transformers property when it wraps a model; the "
        "deprecation is between peft and transformers",
    ),
)


@contextmanager
def library_warnings_filtered() -> Iterator[None]:
    """For peftlab's commands: ignore exactly the ``LIBRARY_NOISE`` warnings within the block (the filters before
    it are restored after it)."""
    with warnings.catch_warnings():
        for category, message, _ in LIBRARY_NOISE:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        yield


def quiet_libraries() -> None:
    """For peftlab's commands: transformers and datasets print errors only and draw no bars of their own (peftlab
    draws its own progress). huggingface_hub keeps its download bars, with rate and ETA (``--no-progress`` turns
    them off per download). datasets is not imported for this: its variables are read when it is first imported."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets = sys.modules.get("datasets")
    if datasets is not None:  # already imported (peftlab's main called from Python): set it directly
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


@contextmanager
def scoped(environ: dict[str, str] | None = None, transformers_quiet: bool = False) -> Iterator[None]:
    """Set environment variables (and optionally silence transformers) for the duration of a block, then restore
    exactly what was there before."""
    environ = environ or {}
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    restore_logging = None
    if transformers_quiet:
        from transformers.utils import logging as hf_logging

        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

        def restore_logging():
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()

    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if restore_logging:
            restore_logging()
