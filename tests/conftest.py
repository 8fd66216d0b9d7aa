"""Shared fixtures: tiny randomly initialised BERT models, a tiny tokenizer, and a small learnable dataset.

The tiny models keep the suite fast; tests marked ``real`` use the packaged MiniLM and Rotten Tomatoes instead.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

POSITIVE = ["great", "wonderful", "moving", "funny", "brilliant", "charming", "superb", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "tedious", "clumsy", "bland", "painful", "lifeless"]
FILLER = ["the", "film", "movie", "story", "was", "is", "a", "an", "and", "of", "plot", "acting", "this", "it"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_config(num_labels: int = 2, dropout: float = 0.0, vocab_size: int = 64) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model folder: a tiny BERT body plus a word-level tokenizer over the test vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {t: i for i, t in enumerate(SPECIALS + POSITIVE + NEGATIVE + FILLER)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(tiny_config(vocab_size=len(vocab)), add_pooling_layer=True).save_pretrained(folder)
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


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(CHAT_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=128,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=vocab["<|im_end|>"],
        bos_token_id=vocab["<|im_start|>"],
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # real embeddings are large enough for a frozen tied head to reach confident logits
        model.model.embed_tokens.weight.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder
