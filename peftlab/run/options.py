"""A run's options: what to train on (``RunOptions``), as flags, config files and ``config.json`` hold them."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InputError, require
from ..methods import config_to_dict, get_method
from ..train.loop import TrainSettings
from ..train.tracking import chosen

MAX_THREADS = 1024  # far beyond any CPU; more makes tokenizers' thread pools fail outright


@dataclass
class RunOptions:
    model: str = field(
        default="minilm", metadata={"help": "packaged model name, Hugging Face model folder or Hub ID (org/name)"}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub branch, tag or commit of --model (a run records the commit it used)"}
    )
    data: str = field(
        default="rotten_tomatoes",
        metadata={
            "help": "packaged dataset name, data file (CSV/TSV/JSON/JSONL/Parquet/Arrow), folder (split files or "
            "datasets' save_to_disk) or Hub dataset ID (org/name)"
        },
    )
    data_config: str | None = field(default=None, metadata={"help": "configuration (subset) of a Hub dataset"})
    data_revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit of --data"})
    train_split: str | None = field(
        default=None,
        metadata={"help": "Hub or DatasetDict split to train on (default: train; a slice: train[:5000])"},
    )
    validation_split: str | None = field(
        default=None, metadata={"help": "split for validation (default: validation, valid, dev or val; else carved)"}
    )
    test_split: str | None = field(default=None, metadata={"help": "split to test on (default: test; else carved)"})
    method: str = field(default="lora", metadata={"help": "fine-tuning method (see: peftlab methods)"})
    out: str | None = field(default=None, metadata={"help": "run folder (default: a new folder under runs/)"})
    text_column: str | None = field(default=None, metadata={"help": "column holding the text"})
    pair_column: str | None = field(default=None, metadata={"help": "column holding the second text of a pair"})
    label_column: str | None = field(default=None, metadata={"help": "column holding the label"})
    max_length: int = field(default=128, metadata={"help": "tokens per example; longer ones are cut at the end"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/validation/test split"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "where to train"})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: torch's)"})
    adapter: str | None = field(default=None, metadata={"help": "continue fine-tuning from this adapter folder"})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "run code shipped with the model (only ever from this command line, never from a file)"},
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "load a model whose only weights are pickle files (pytorch_model.bin); command line only"},
    )
    task: Literal["classify", "tag", "span", "sft"] = field(
        default="classify",
        metadata={
            "help": "classify: a label per text; tag: a tag per word (NER); span: the passage span answering a "
            "question (SQuAD layout); sft: instruction/chat/text"
        },
    )
    doc_stride: int | None = field(
        default=None,
        metadata={
            "help": "span: tokens of overlap between the windows a long passage is read in (default: max_length / 4)"
        },
    )
    max_answer_tokens: int = field(
        default=30, metadata={"help": "span: the longest answer (in tokens) evaluation may predict"}
    )
    pooling: Literal["auto", "model", "cls", "mean", "max"] = field(
        default="auto",
        metadata={
            "help": "classify: how the head reads the text: the model's own readout ([CLS] through BERT's pooler, "
            "a decoder's last token), the first token's state, or the mean or max of all token states; auto: what "
            "the checkpoint was trained with (sentence-transformers models: mean), else the model's own"
        },
    )
    dtype: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata={
            "help": "dtype the frozen base weights are stored in (bf16 / fp16 halve their memory; what trains keeps "
            "fp32 master copies, and the forward pass runs under autocast in this dtype)"
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "sft: pack several conversations into each sequence; positions restart and attention stays "
            "inside each conversation, so each trains as if alone"
        },
    )
    eval_generate: int = field(
        default=64, metadata={"help": "sft: test conversations answered by generation at the end (0: none)"}
    )
    max_new_tokens: int = field(default=48, metadata={"help": "sft: longest generated reply at evaluation"})
    fsdp: bool = field(
        default=False,
        metadata={"help": "with several processes: shard the model across them (FSDP2) instead of copying it"},
    )
    eval_limit: int | None = field(
        default=None, metadata={"help": "use only the first N validation and test examples (and of each held-out set)"}
    )
    forgetting_data: list[str] = field(
        default_factory=lambda: ["news_articles"],
        metadata={
            "help": "sft: general text whose perplexity is measured before and after tuning (packaged text datasets "
            "or .txt/.jsonl files; their test split by split seed 0); none turns it off"
        },
    )
    forgetting_docs: int = field(
        default=16, metadata={"help": "sft: documents in each forgetting sample (the first 256 tokens of each)"}
    )
    replay_data: str | None = field(
        default=None,
        metadata={"help": "sft: general text mixed into training against forgetting (its train split, split seed 0)"},
    )
    replay_ratio: float = field(
        default=0.25, metadata={"help": "sft: replayed general-text target tokens per target token of the task data"}
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "none"]] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "experiment trackers to log the run to, one or several (needs pip install 'peftlab[tracking]'): "
            "TensorBoard event files in <run>/tensorboard, MLflow (MLFLOW_TRACKING_URI, else <run>/mlruns), "
            "Weights & Biases (your W&B settings; project peftlab unless WANDB_PROJECT)"
        },
    )
    log_every: int = field(
        default=10, metadata={"help": "optimiser steps between tracked training metrics (first and last always)"}
    )

    def __post_init__(self):
        require(self.eval_limit is None or self.eval_limit > 0, "eval_limit", "a positive integer", self.eval_limit)
        require(self.forgetting_docs > 0, "forgetting_docs", "a positive integer", self.forgetting_docs)
        require(self.replay_ratio > 0, "replay_ratio", "a positive number", self.replay_ratio)
        require(self.log_every > 0, "log_every", "a positive integer", self.log_every)
        chosen(self.report_to)  # none cannot be combined with a tracker
        require(self.max_length >= 8, "max_length", "an integer >= 8", self.max_length)
        require(self.doc_stride is None or self.doc_stride >= 0, "doc_stride", "an integer >= 0", self.doc_stride)
        require(self.max_answer_tokens > 0, "max_answer_tokens", "a positive integer", self.max_answer_tokens)
        require(self.eval_generate >= 0, "eval_generate", "an integer >= 0", self.eval_generate)
        require(self.max_new_tokens > 0, "max_new_tokens", "a positive integer", self.max_new_tokens)
        require(self.train_limit is None or self.train_limit > 0, "train_limit", "a positive integer", self.train_limit)
        require(self.threads is None or 0 < self.threads <= MAX_THREADS, "threads", f"1 to {MAX_THREADS}", self.threads)
        if self.task != "classify" and self.pooling not in ("auto", "model"):
            raise InputError(f"pooling: {self.pooling!r} reads one vector per text; it applies to --task classify only")
        require(0 <= self.split_seed < 2**63, "split_seed", "an integer >= 0 within 64 bits", self.split_seed)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device: 'cuda' was asked for but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_out(options: RunOptions) -> Path:
    stem = Path(options.data).stem if os.sep in options.data or "." in options.data else options.data
    return Path("runs") / f"{options.method}-{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# Options that only the command line can switch on, never a config file or a run folder's saved config.
COMMAND_LINE_ONLY = ("trust_remote_code", "allow_pickle")


def flat_config(options: RunOptions, settings: TrainSettings, method_config: Any) -> dict:
    """The run's configuration as config.json holds it (without the command-line-only switches)."""
    run = {k: v for k, v in dataclasses.asdict(options).items() if k not in COMMAND_LINE_ONLY}
    return {**run, **dataclasses.asdict(settings), **config_to_dict(method_config)}


def split_config(config: dict, source: str) -> tuple[RunOptions, TrainSettings, Any]:
    """Split a flat configuration into run options, training settings and the method's config."""
    from ..methods import config_from_dict

    run_keys = {f.name for f in dataclasses.fields(RunOptions)}
    train_keys = {f.name for f in dataclasses.fields(TrainSettings)}
    method = get_method(config.get("method", RunOptions.method))
    run = config_from_dict(RunOptions, {k: v for k, v in config.items() if k in run_keys}, source)
    settings = config_from_dict(TrainSettings, {k: v for k, v in config.items() if k in train_keys}, source)
    rest = {k: v for k, v in config.items() if k not in run_keys and k not in train_keys}
    method_config = config_from_dict(method.config, rest, source)
    return run, settings, method_config


def without_command_line_only(config: dict) -> dict:
    """A config read from a file, less the switches only a command line may turn on (a saved config may have them:
    run folders written before they were left out)."""
    return {k: v for k, v in config.items() if k not in COMMAND_LINE_ONLY}
