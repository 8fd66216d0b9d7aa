"""Shared fixtures: tiny randomly initialised BERT models, a tiny tokenizer, and a small learnable dataset.

The tiny models keep the suite fast; tests marked ``real`` use the packaged MiniLM and Rotten Tomatoes instead.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, BertModel

from peftlab.bench.assets import FILLER, NEGATIVE, POSITIVE, build_tiny_bert, build_tiny_llama, tiny_bert_config


def tiny_config(num_labels: int = 2, dropout: float = 0.0, vocab_size: int = 64) -> BertConfig:
    return tiny_bert_config(vocab_size, num_labels, dropout)


def tiny_classifier(seed: int = 0, **kwargs) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(**kwargs)).eval()


def sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Short reviews whose label follows from their sentiment words: easy to learn in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def train_tiny_run(model_dir: Path, data: Path, out: Path, *options) -> Path:
    """A short run trained through the CLI in-process (``options`` as on the command line): a run folder for the
    tests of the commands that read one."""
    from peftlab.cli import main

    args = ["--no-progress", "train", "--model", model_dir, "--data", data, "--out", out, *options]
    assert main([str(a) for a in args]) == 0
    return out


def file_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with the SHA-256 of its bytes: to show nothing was touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model folder: a tiny BERT body plus a word-level tokenizer over the test vocabulary."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    build_tiny_bert(folder, POSITIVE + NEGATIVE + FILLER)
    return folder


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", sentences(240))


@pytest.fixture()
def cli(capsys):
    """Run the peftlab CLI in-process: returns (exit code, stdout, stderr)."""
    from peftlab.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--no-progress", *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


CHAT_WORDS = (
    POSITIVE
    + NEGATIVE
    + FILLER
    + "user assistant system hello hi how are you fine thanks what is answer yes no "
    "positive negative review sentiment classify label one two three four five".split()
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama causal LM folder with a word-level tokenizer and a ChatML chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(folder, sorted(set(CHAT_WORDS)))
    return folder


PEFT_NEEDS_PAST_KEY_VALUES = "Model does not support past key values which are required for prefix tuning"


@contextmanager
def skip_if_peft_prefix_tuning_fails_on_bert() -> Iterator[None]:
    """Around a forward pass of a PEFT prefix-tuned BERT model (the peer of a parity test): skip the test when PEFT
    raises its "does not support past key values" error, and only then (any other error fails the test).

    PEFT passes prefixes as a KV cache, and for a model without a ``past_key_values`` parameter in its own forward
    (a BERT classifier or tagger) it requires one in the backbone's forward (``BertModel.forward``), looked up by
    name. transformers 5.24 renamed that parameter to ``cache`` (``past_key_values`` is still accepted through a
    deprecation decorator, which does not show in the signature), so PEFT versions that look for the old name
    refuse to run prefix tuning on BERT there; the parity tests still run wherever PEFT can."""
    try:
        yield
    except ValueError as error:
        if PEFT_NEEDS_PAST_KEY_VALUES not in str(error):
            raise
        names = inspect.signature(BertModel.forward).parameters
        cause = "which transformers 5.24 renamed to `cache`" if "cache" in names else f"not among {list(names)}"
        pytest.skip(
            f"peft {peft.__version__} prefix tuning cannot run on transformers {transformers.__version__}'s BERT: "
            f"peft raises {str(error)!r}, as it looks for a `past_key_values` parameter in BertModel.forward, {cause}"
        )
