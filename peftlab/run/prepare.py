"""From names to tensors: the model and data a run options name, resolved, tokenised once and split (``Prepared``),
the model built with its task head, the task, and the evaluation sets for generation and forgetting."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import progress
from ..core.adapter_file import read_adapter_meta
from ..core.pooling import install_pooling, resolve_pooling, saved_pooling
from ..core.precision import STORAGE
from ..data.batches import encode
from ..data.classification import Columns, load_classification, read_examples
from ..data.conversations import read_conversations
from ..data.lm import LMEncoded, encode_conversations, replay_rows, text_sample, with_rows
from ..data.sft import load_sft, text_documents
from ..data.spans import encode_spans, load_spans, read_spans
from ..data.tables import HubData
from ..data.tagging import Sentence, encode_tagging, load_tagging, read_tagged
from ..errors import InputError
from ..evaluate.generation import generate, score
from ..models import (
    ModelSource,
    find_model,
    load_causal_lm,
    load_classifier,
    load_span_model,
    load_tagger,
    load_tokenizer,
)
from ..train.lm_task import LanguageModelTask
from ..train.loop import ClassificationTask
from ..train.span_task import SpanTask
from ..train.tag_task import TaggingTask
from .options import RunOptions


@dataclass
class Prepared:
    kind: str  # "classify", "tag", "span" or "sft"
    data: Any  # ClassificationData, TaggingData, SpanData or SFTData
    splits: dict[str, Any]  # split -> Encoded (classify), TagEncoded (tag), SpanEncoded (span) or LMEncoded (sft)
    model: ModelSource
    tokenizer: Any
    pooling: str = "model"  # classify: how the head reads the text (``peftlab.pooling``), resolved from "auto"
    max_answer_tokens: int = 30  # span: the longest answer evaluation may predict

    @property
    def labels(self) -> list[str] | None:
        return None if self.kind in ("sft", "span") else self.data.labels

    @property
    def model_path(self) -> Path:
        return self.model.path


def hub_data(options: RunOptions) -> HubData:
    named = {"train": options.train_split, "validation": options.validation_split, "test": options.test_split}
    return HubData(options.data_config, options.data_revision, {k: v for k, v in named.items() if v is not None})


def recorded(options: RunOptions, prepared: Prepared) -> RunOptions:
    """The options as a run folder records them, so that they mean the same from any folder and any day: the
    model's Hub ID and the commit it came from (or its absolute folder), and absolute paths for local data."""

    def absolute(name: str | None) -> str | None:
        if not name or name in packaged_data_names() or not Path(name).expanduser().exists():
            return name
        return str(Path(name).expanduser().resolve())

    return dataclasses.replace(
        options,
        model=prepared.model.name,
        revision=prepared.model.revision,
        data=absolute(options.data),
        adapter=absolute(options.adapter),
        pooling=prepared.pooling if prepared.kind == "classify" else options.pooling,
        replay_data=absolute(options.replay_data),
        forgetting_data=[absolute(d) for d in options.forgetting_data],
    )


def packaged_data_names() -> set[str]:
    from ..data.classification import PACKAGED
    from ..data.sft import PACKAGED_SFT
    from ..data.spans import PACKAGED_SPANS
    from ..data.tagging import PACKAGED_TAGGING

    return set(PACKAGED) | set(PACKAGED_TAGGING) | set(PACKAGED_SPANS) | set(PACKAGED_SFT)


def prepare_data(options: RunOptions, quiet: bool = False) -> Prepared:
    source = find_model(options.model, options.revision, quiet, options.allow_pickle, options.trust_remote_code)
    model_path = source.path
    tokenizer = load_tokenizer(model_path, options.trust_remote_code)
    limit = max_positions(model_path, tokenizer)
    if limit is not None and options.max_length > limit:
        raise InputError(
            f"max_length: {options.max_length} tokens is more than model {options.model!r} accepts "
            f"(at most {limit}); longer texts are cut at max_length"
        )
    if options.task == "sft":
        data = load_sft(options.data, options.split_seed, options.train_limit, options.eval_limit, hub_data(options))
        splits = {
            name: encode_conversations(tokenizer, convs, options.max_length, options.packing and name == "train")
            for name, convs in data.splits.items()
        }
        if options.replay_data:
            splits["train"] = add_replay(options, data, splits["train"], tokenizer)
        return Prepared("sft", data, splits, source, tokenizer)
    if options.task == "tag":
        data = load_tagging(options.data, options.split_seed, options.train_limit, quiet, hub_data(options))
        _limit_evaluation(data, options.eval_limit)
        splits = {name: encode_tagging(s, tokenizer, options.max_length) for name, s in data.splits.items()}
        return Prepared("tag", data, splits, source, tokenizer)
    if options.task == "span":
        data = load_spans(options.data, options.split_seed, options.train_limit, quiet, hub_data(options))
        _limit_evaluation(data, options.eval_limit)
        splits = {n: encode_spans(s, tokenizer, options.max_length, options.doc_stride) for n, s in data.splits.items()}
        windows = {n: len(e) for n, e in splits.items()}
        data.notes.append(f"passages read in windows of {options.max_length} tokens: {windows} windows per split")
        return Prepared("span", data, splits, source, tokenizer, max_answer_tokens=options.max_answer_tokens)
    columns = Columns(options.text_column, options.pair_column, options.label_column)
    data = load_classification(options.data, columns, options.split_seed, options.train_limit, quiet, hub_data(options))
    _limit_evaluation(data, options.eval_limit)
    splits = {name: encode(examples, tokenizer, options.max_length) for name, examples in data.splits.items()}
    return Prepared("classify", data, splits, source, tokenizer, classifier_pooling(options, model_path))


def classifier_pooling(options: RunOptions, model_path: Path) -> str:
    """The classifier's pooling: as asked; for ``auto``, the pooling of the adapter training continues from (what it
    was trained with; ``model`` for adapters saved before pooling was recorded), else the checkpoint's own."""
    if options.pooling == "auto" and options.adapter:
        return resolve_pooling(saved_pooling(read_adapter_meta(options.adapter)[1]), model_path)
    return resolve_pooling(options.pooling, model_path)


def _limit_evaluation(data, limit: int | None) -> None:
    if limit is not None:
        for split in ("validation", "test"):
            data.splits[split] = data.splits[split][:limit]
        data.notes.append(f"validation and test sets limited to their first {limit} examples")


def add_replay(options: RunOptions, data, train: LMEncoded, tokenizer) -> LMEncoded:
    """Replay: blocks of general text (the train split of ``replay_data``) added to the training set, as many
    target tokens as ``replay_ratio`` times the task data's target tokens."""
    want = round(options.replay_ratio * train.targets())
    rows = replay_rows(tokenizer, text_documents(options.replay_data, "train"), options.max_length, want)
    got = sum(len(r) for r in rows)
    data.notes.append(
        f"replay: {len(rows)} blocks of {options.replay_data} (train split, {got} target tokens) mixed into "
        f"{len(train)} training rows ({train.targets()} target tokens); ratio {got / max(train.targets(), 1):.3f}"
    )
    return with_rows(train, rows, options.packing, options.max_length)


FORGETTING_BLOCK = 256  # tokens read from each document of the forgetting sample


def forgetting_samples(options: RunOptions, prepared: Prepared) -> dict[str, LMEncoded]:
    """The fixed general-text samples whose perplexity measures forgetting (test split, split seed 0)."""
    if prepared.kind != "sft":
        return {}
    sources = [s for s in options.forgetting_data if s.lower() != "none"]
    block = min(FORGETTING_BLOCK, max_positions(prepared.model_path, prepared.tokenizer) or FORGETTING_BLOCK)
    return {
        source: text_sample(prepared.tokenizer, text_documents(source, "test"), block, options.forgetting_docs)
        for source in sources
    }


def forgetting_report(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    return {
        name: {
            "before": before[name]["perplexity"],
            "after": after[name]["perplexity"],
            "change": after[name]["perplexity"] - before[name]["perplexity"],
            "relative_change": after[name]["perplexity"] / before[name]["perplexity"] - 1,
            "loss_before": before[name]["loss"],
            "loss_after": after[name]["loss"],
            "tokens": after[name]["tokens"],
            "documents": after[name]["examples"],
        }
        for name in after
    }


def max_positions(model_path: Path, tokenizer) -> int | None:
    """The longest input the model accepts: its position table, or the tokenizer's limit when smaller."""
    import json

    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    limits = [config.get("max_position_embeddings")]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits.append(tokenizer.model_max_length)
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def build_model(options: RunOptions, prepared: Prepared, settings_seed: int):
    """The base model with its task head, its weights stored in ``options.dtype`` (see ``core.precision``)."""
    torch.manual_seed(settings_seed)  # the new head's initialisation, then the method's
    trust, pickled, dtype = options.trust_remote_code, options.allow_pickle, STORAGE[options.dtype]
    if prepared.kind == "sft":
        return load_causal_lm(prepared.model_path, dtype=dtype, trust_remote_code=trust, allow_pickle=pickled)
    if prepared.kind == "span":
        return load_span_model(prepared.model_path, dtype=dtype, trust_remote_code=trust, allow_pickle=pickled)
    if prepared.kind == "tag":
        return load_tagger(
            prepared.model_path, prepared.labels, dtype=dtype, trust_remote_code=trust, allow_pickle=pickled
        )
    model = load_classifier(
        prepared.model_path,
        prepared.data.labels,
        dtype=dtype,
        trust_remote_code=trust,
        pad_token_id=prepared.tokenizer.pad_token_id,
        allow_pickle=pickled,
    )
    install_pooling(model, prepared.pooling)
    return model


def make_task(prepared: Prepared):
    if prepared.kind == "sft":
        return LanguageModelTask()
    if prepared.kind == "tag":
        return TaggingTask(prepared.labels)
    if prepared.kind == "span":
        return SpanTask(prepared.max_answer_tokens)
    return ClassificationTask(len(prepared.data.labels))


# Each task kind as an adapter file's ``task.type`` names it, and as Hugging Face PEFT's ``task_type`` does.
TASK_TYPES = {"classify": "classification", "tag": "tagging", "span": "span", "sft": "sft"}
PEFT_TASK_TYPES = {"classify": "SEQ_CLS", "tag": "TOKEN_CLS", "span": "QUESTION_ANS", "sft": "CAUSAL_LM"}


def task_meta(options: RunOptions, prepared: Prepared) -> dict:
    task = {"type": TASK_TYPES[prepared.kind]} | ({"labels": prepared.labels} if prepared.labels else {})
    if prepared.kind == "classify":
        task["pooling"] = prepared.pooling
    return {"task": task, "model": options.model, "max_length": options.max_length}


def encode_file(options: RunOptions, prepared: Prepared, path: str | Path):
    """One data file, read and encoded the way the run's own splits were (for ``peftlab eval --data``)."""
    if prepared.kind == "sft":
        return encode_conversations(prepared.tokenizer, read_conversations(path), options.max_length)
    if prepared.kind == "tag":
        index = {t: i for i, t in enumerate(prepared.labels)}
        sentences = []
        for where, words, tags in read_tagged(Path(path)):
            unknown = [t for t in tags if t not in index]
            if unknown:
                raise InputError(f"{where}: tag {unknown[0]!r} is not one the run was trained on")
            sentences.append(Sentence(words, [index[t] for t in tags]))
        return encode_tagging(sentences, prepared.tokenizer, options.max_length)
    if prepared.kind == "span":
        return encode_spans(read_spans(Path(path)), prepared.tokenizer, options.max_length, options.doc_stride)
    columns = Columns(options.text_column, options.pair_column, options.label_column)
    return encode(read_examples(path, prepared.labels, columns), prepared.tokenizer, options.max_length)


def hf_task_type(prepared: Prepared) -> str:
    return PEFT_TASK_TYPES[prepared.kind]


def generation_sets(options: RunOptions, prepared: Prepared, limit: int | None = None) -> dict[str, list]:
    """The conversations answered by generation at evaluation: the first ``limit`` (default ``eval_generate``)
    test conversations and of every extra evaluation set (held-out tasks)."""
    limit = options.eval_generate if limit is None else limit
    sets = {"test": prepared.data.splits["test"], **prepared.data.extra_eval}
    chosen = {name: [c for c in convs if not c.is_text][:limit] for name, convs in sets.items()}
    return {name: convs for name, convs in chosen.items() if convs}


def generation_metrics(
    options: RunOptions,
    prepared: Prepared,
    model,
    batch_size: int,
    limit: int | None = None,
    reply: Callable | None = None,
) -> dict[str, dict]:
    """Exact match, answer accuracy and token F1 of generated replies on ``generation_sets``. ``reply(prompts)``
    replaces the model's own greedy generation (e.g. proxy-tuned decoding)."""
    if prepared.kind != "sft" or (options.eval_generate == 0 and limit is None):
        return {}

    def own(prompts):
        return generate(model, prepared.tokenizer, prompts, options.max_new_tokens, batch_size=min(batch_size, 16))

    out = {}
    for name, chosen in generation_sets(options, prepared, limit).items():
        with progress.stage(f"generating {name}"):
            replies = (reply or own)([c.prompt() for c in chosen])
        out[name] = score(chosen, replies) | {
            "samples": [
                {"prompt": c.prompt()[-1]["content"][:200], "reply": r, "reference": c.reference()}
                for c, r in list(zip(chosen, replies, strict=True))[:3]
            ]
        }
    return out
