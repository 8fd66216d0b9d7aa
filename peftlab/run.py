"""One fine-tuning run, from names to a finished run folder.

``run_training`` resolves the model and data (pulling packaged assets on first use), tokenises once, attaches the
method, trains with the shared loop, evaluates the best validation state on the test split, counts parameters
honestly and writes the run folder:

    <out>/config.json      the full resolved configuration (a valid --config file: it reproduces the run)
    <out>/adapter/         the best adapter (peftlab format: adapter.safetensors + adapter.json)
    <out>/checkpoint/      the last training checkpoint, for --resume
    <out>/results.json     metrics, parameter counts, adapter bytes, memory, time, versions
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch

from .core.accounting import delta_ranks, folder_bytes, parameter_counts, rank_summary
from .core.adapter_file import CONFIG_FILE, WEIGHTS_FILE, read_tensors
from .core.attach import Attachment, attach, load_adapter, load_state
from .data.batches import encode
from .data.classification import Columns, load_classification, read_examples
from .data.conversations import read_conversations
from .data.lm import LMEncoded, encode_conversations, replay_rows, text_sample, with_rows
from .data.sft import load_sft, text_documents
from .data.tables import HubData
from .data.tagging import Sentence, encode_tagging, load_tagging, read_tagged
from .errors import InputError, require
from .evaluate.generation import generate, score
from .fileio import LOCK_FILE, folder_lock, read_folder, read_json, remove_stale_temporaries, write_json
from .methods import config_to_dict, get_method
from .models import ModelSource, find_model, load_causal_lm, load_classifier, load_tagger, load_tokenizer
from .train.distributed import from_environment, shard_model
from .train.lm_task import LanguageModelTask
from .train.loop import ClassificationTask, TrainSettings, autocast_for, fit, make_hooks
from .train.tag_task import TaggingTask
from .version import __version__

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
    task: Literal["classify", "tag", "sft"] = field(
        default="classify",
        metadata={"help": "classify: a label per text; tag: a tag per word (NER); sft: instruction/chat/text"},
    )
    packing: bool = field(default=False, metadata={"help": "sft: pack several conversations into each sequence"})
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

    def __post_init__(self):
        require(self.eval_limit is None or self.eval_limit > 0, "eval_limit", "a positive integer", self.eval_limit)
        require(self.forgetting_docs > 0, "forgetting_docs", "a positive integer", self.forgetting_docs)
        require(self.replay_ratio > 0, "replay_ratio", "a positive number", self.replay_ratio)
        require(self.max_length >= 8, "max_length", "an integer >= 8", self.max_length)
        require(self.eval_generate >= 0, "eval_generate", "an integer >= 0", self.eval_generate)
        require(self.max_new_tokens > 0, "max_new_tokens", "a positive integer", self.max_new_tokens)
        require(self.train_limit is None or self.train_limit > 0, "train_limit", "a positive integer", self.train_limit)
        require(self.threads is None or 0 < self.threads <= MAX_THREADS, "threads", f"1 to {MAX_THREADS}", self.threads)
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


def peak_memory() -> tuple[int, str]:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"
    except ImportError:  # pragma: no cover - Windows
        return 0, "unavailable"


def versions() -> dict[str, str]:
    import numpy
    import safetensors
    import transformers

    return {
        "peftlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# Options that only the command line can switch on, never a config file or a run folder's saved config.
COMMAND_LINE_ONLY = ("trust_remote_code", "allow_pickle")


@dataclass
class Prepared:
    kind: str  # "classify", "tag" or "sft"
    data: Any  # ClassificationData, TaggingData or SFTData
    splits: dict[str, Any]  # split -> Encoded (classify), TagEncoded (tag) or LMEncoded (sft)
    model: ModelSource
    tokenizer: Any

    @property
    def labels(self) -> list[str] | None:
        return None if self.kind == "sft" else self.data.labels

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
        replay_data=absolute(options.replay_data),
        forgetting_data=[absolute(d) for d in options.forgetting_data],
    )


def packaged_data_names() -> set[str]:
    from .data.classification import PACKAGED
    from .data.sft import PACKAGED_SFT
    from .data.tagging import PACKAGED_TAGGING

    return set(PACKAGED) | set(PACKAGED_TAGGING) | set(PACKAGED_SFT)


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
    columns = Columns(options.text_column, options.pair_column, options.label_column)
    data = load_classification(options.data, columns, options.split_seed, options.train_limit, quiet, hub_data(options))
    _limit_evaluation(data, options.eval_limit)
    splits = {name: encode(examples, tokenizer, options.max_length) for name, examples in data.splits.items()}
    return Prepared("classify", data, splits, source, tokenizer)


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
    torch.manual_seed(settings_seed)  # the new head's initialisation, then the method's
    trust, pickled = options.trust_remote_code, options.allow_pickle
    if prepared.kind == "sft":
        return load_causal_lm(prepared.model_path, trust_remote_code=trust, allow_pickle=pickled)
    if prepared.kind == "tag":
        return load_tagger(prepared.model_path, prepared.labels, trust_remote_code=trust, allow_pickle=pickled)
    return load_classifier(
        prepared.model_path,
        prepared.data.labels,
        trust_remote_code=trust,
        pad_token_id=prepared.tokenizer.pad_token_id,
        allow_pickle=pickled,
    )


def make_task(prepared: Prepared):
    if prepared.kind == "sft":
        return LanguageModelTask()
    if prepared.kind == "tag":
        return TaggingTask(prepared.labels)
    return ClassificationTask(len(prepared.data.labels))


def task_meta(options: RunOptions, prepared: Prepared) -> dict:
    kinds = {"classify": "classification", "tag": "tagging", "sft": "sft"}
    task = {"type": kinds[prepared.kind]} | ({"labels": prepared.labels} if prepared.labels else {})
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
    columns = Columns(options.text_column, options.pair_column, options.label_column)
    return encode(read_examples(path, prepared.labels, columns), prepared.tokenizer, options.max_length)


def hf_task_type(prepared: Prepared) -> str:
    return {"classify": "SEQ_CLS", "tag": "TOKEN_CLS", "sft": "CAUSAL_LM"}[prepared.kind]


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
        replies = (reply or own)([c.prompt() for c in chosen])
        out[name] = score(chosen, replies) | {
            "samples": [
                {"prompt": c.prompt()[-1]["content"][:200], "reply": r, "reference": c.reference()}
                for c, r in list(zip(chosen, replies, strict=True))[:3]
            ]
        }
    return out


def flat_config(options: RunOptions, settings: TrainSettings, method_config: Any) -> dict:
    """The run's configuration as config.json holds it (without the command-line-only switches)."""
    run = {k: v for k, v in dataclasses.asdict(options).items() if k not in COMMAND_LINE_ONLY}
    return {**run, **dataclasses.asdict(settings), **config_to_dict(method_config)}


def run_training(
    options: RunOptions, settings: TrainSettings, method_config: Any, resume: bool = False, show_progress: bool = True
) -> dict:
    wall_start = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)
    dist, dist_device = from_environment(options.device)  # torchrun's process group, if launched by it
    device = dist_device or pick_device(options.device)
    if options.fsdp and not dist.enabled:
        raise InputError("fsdp: shards the model across processes; start several with --nproc N or torchrun")
    method = get_method(options.method)
    out = Path(options.out) if options.out else default_out(options)
    if dist.enabled and not options.out:
        out = Path(dist.broadcast(str(out)))  # one folder for every process
    # One process trains into a folder at a time; a lock left by a killed run is reported and taken over.
    lock = folder_lock(out, report=lambda note: print(note, file=sys.stderr)) if dist.main else nullcontext()
    with lock:
        if not resume and out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise InputError(
                f"{out}: run folder already exists and is not empty (continue it with --resume {out}, "
                "or choose another --out)"
            )
        dist.barrier()  # every process checked the folder before rank 0 writes into it
        if resume and dist.main:
            remove_stale_temporaries(out)
        prepared = prepare_data(options, quiet=not show_progress)
        options = recorded(options, prepared)
        model = build_model(options, prepared, settings.seed)
        task = make_task(prepared)
        autocast = autocast_for(settings.precision, device)
        general = forgetting_samples(options, prepared)
        if general:  # the pretrained model, before any method is attached
            model.to(device)
            before = {
                n: task.evaluate(model, e, settings.eval_batch_size, device, autocast) for n, e in general.items()
            }
        if options.adapter:
            attachment = load_adapter(model, options.adapter)
            if attachment.method.name != method.name:
                raise InputError(
                    f"adapter: {options.adapter} holds a {attachment.method.name!r} adapter, "
                    f"but --method is {method.name!r}"
                )
        else:
            attachment = attach(model, method, method_config)
        model.to(device)
        if options.fsdp:
            shard_model(model)
            dist = dataclasses.replace(dist, sharded=True)
        lr = settings.lr if settings.lr is not None else method.lr
        if dist.main:
            write_json(out / "config.json", flat_config(options, settings, attachment.config))
        meta = task_meta(options, prepared)

        def save_best(metrics: dict, step: int) -> None:
            if dist.main or dist.sharded:  # sharded tensors are gathered by every process; rank 0 writes
                attachment.save(out / "adapter", extra={**meta, "validation": metrics, "step": step}, write=dist.main)

        hooks = make_hooks(attachment, settings)
        result = fit(
            attachment,
            task,
            prepared.splits["train"],
            prepared.splits["validation"],
            settings,
            lr,
            out / "checkpoint",
            save_best,
            device,
            resume=resume,
            show_progress=show_progress,
            hooks=hooks,
            dist=dist,
        )
        dist.barrier()  # rank 0 has written the best adapter; every process loads it
        # A method trained through a reparameterisation takes the form its adapter file holds (prefix tuning's MLP
        # computed into the prefixes); "trainable" still counts what the optimiser updated.
        trained = attachment.trainable_count()
        folded = attachment.fold()
        load_state(attachment, read_tensors(out / "adapter" / WEIGHTS_FILE), out / "adapter" / WEIGHTS_FILE)
        evaluation = dist.for_evaluation
        forgetting = {}
        if general:
            after = {
                n: task.evaluate(model, e, settings.eval_batch_size, device, autocast, evaluation)
                for n, e in general.items()
            }
            forgetting = forgetting_report(before, after)
        test = task.evaluate(model, prepared.splits["test"], settings.eval_batch_size, device, autocast, evaluation)
        generating = dist.main or dist.sharded  # under FSDP every process must take part in every forward pass
        generated = generation_metrics(options, prepared, model, settings.eval_batch_size) if generating else {}
        test.update({k: v for k, v in generated.pop("test", {}).items()})
        method_report = hooks.report(
            lambda: task.evaluate(
                model, prepared.splits["validation"], settings.eval_batch_size, device, autocast, evaluation
            )
        )
        accounted = attachment
        if dist.sharded:  # count on a whole (unsharded) copy: the base plus the adapter rank 0 wrote
            accounted = load_adapter(build_model(options, prepared, settings.seed), out / "adapter")
        counts = parameter_counts(accounted)
        if folded:
            counts["trainable"] = trained
        ranks = delta_ranks(accounted)
        if ranks:
            counts["delta_rank"] = rank_summary(ranks)
        memory, memory_source = peak_memory()
        results = {
            "method": method.name,
            "model": options.model,
            "data": options.data,
            "seed": settings.seed,
            "metrics": {"validation": result.best, "test": test, **generated},
            "params": counts,
            **({"forgetting": forgetting} if forgetting else {}),
            "method_report": method_report,
            "adapter_bytes": folder_bytes(out / "adapter"),
            "peak_memory_bytes": memory,
            "peak_memory_source": memory_source,
            "train_seconds": result.train_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "examples_per_second": result.examples / max(result.train_seconds, 1e-9),
            "tokens_per_second": result.tokens / max(result.train_seconds, 1e-9),
            "steps": result.steps,
            "best_step": result.best_step,
            "lr": lr,
            "data_sizes": prepared.data.sizes(),
            "labels": prepared.labels,
            "truncated": {k: v.truncated for k, v in prepared.splits.items()},
            "notes": prepared.data.notes,
            "history": result.history,
            "versions": versions(),
            "git_commit": git_commit(),
            "machine": machine(),
            "device": str(device),
            "run_dir": str(out),
            "processes": dist.world,
        }
        if dist.main:
            write_json(out / "results.json", results)
        dist.barrier()
        return results


def load_run(run: str | Path) -> tuple[Path, dict]:
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: run folder not found")
    config = read_json(run / "config.json", "run config")
    adapter = read_folder(run / "adapter")  # also the previous version, if a crash fell between a save's renames
    if adapter is None or not (adapter / CONFIG_FILE).exists():
        raise InputError(f"{run}: the run has no adapter yet (did it finish its first epoch?)")
    return run, config


def split_config(config: dict, source: str) -> tuple[RunOptions, TrainSettings, Any]:
    """Split a flat configuration into run options, training settings and the method's config."""
    from .methods import config_from_dict

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


def rebuild(
    run: str | Path, quiet: bool = True, trust_remote_code: bool = False, allow_pickle: bool = False
) -> tuple[Path, RunOptions, TrainSettings, Prepared, Attachment]:
    """The trained model of a run folder: same base, same data split, best adapter loaded. Code shipped with the
    model runs, and pickle weights load, only when this call (the command line) says so, whatever the run saved."""
    run, config = load_run(run)
    config = {**without_command_line_only(config), "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    options, settings, _ = split_config(config, str(run / "config.json"))
    prepared = prepare_data(options, quiet=quiet)
    model = build_model(options, prepared, settings.seed)
    attachment = load_adapter(model, run / "adapter")
    return run, options, settings, prepared, attachment


def resume_config(run: str | Path) -> tuple[Path, dict]:
    """The saved configuration of a run folder to resume."""
    path = Path(run)
    if not (path / "config.json").exists():
        raise InputError(f"{path}: no run to resume (config.json not found)")
    return path, read_json(path / "config.json", "run config")


def evaluate_run(
    options: RunOptions,
    settings: TrainSettings,
    prepared: Prepared,
    attachment: Attachment,
    device: torch.device,
    data: str | None = None,
    split: str = "test",
) -> dict[str, dict]:
    """Metrics of a rebuilt run's adapter on a data file (keyed by its file name), else on the run's own split
    (``split``; "all": train, validation and test)."""
    task = make_task(prepared)
    autocast = autocast_for(settings.precision, device)
    if data:
        splits = {Path(data).name: encode_file(options, prepared, data)}
    else:
        names = ["train", "validation", "test"] if split == "all" else [split]
        splits = {n: prepared.splits[n] for n in names}
    return {
        n: task.evaluate(attachment.model, e, settings.eval_batch_size, device, autocast) for n, e in splits.items()
    }


def save_merged(attachment: Attachment, tokenizer, out: str | Path) -> None:
    """The model with the adapter merged into its weights, and its tokenizer, as a plain Hugging Face folder."""
    from .fileio import atomic_folder

    attachment.merge()
    model = attachment.unload()
    with atomic_folder(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def import_hf_adapter(
    adapter: str | Path, out: str | Path, model: str | None, labels: list[str] | None, overwrite: bool, quiet: bool
) -> Attachment:
    """A Hugging Face PEFT LoRA adapter converted to peftlab's format in ``out``, on a classifier of ``model``
    (default: the adapter's base_model_name_or_path) with ``labels`` (default: LABEL_0, ... for its head's rows)."""
    from .core.hf_peft import HF_CONFIG, HF_WEIGHTS, import_hf
    from .fileio import check_output
    from .models import resolve_model

    src = Path(adapter)
    cfg = read_json(src / HF_CONFIG, "PEFT adapter config")
    model_name = model or cfg.get("base_model_name_or_path")
    if not model_name:
        raise InputError(f"{src / HF_CONFIG}: no base_model_name_or_path; give the base with --model")
    path = resolve_model(model_name, quiet=quiet)
    check_output(out, [adapter, path], overwrite)
    if labels is None:
        tensors = read_tensors(src / HF_WEIGHTS)
        heads = [v.shape[0] for k, v in tensors.items() if "lora_" not in k and k.endswith(".weight") and v.ndim == 2]
        if not heads:
            raise InputError(f"{src}: the adapter has no task head; give its classes with --labels")
        labels = [f"LABEL_{i}" for i in range(min(heads))]
    attachment = import_hf(load_classifier(path, labels), src)
    attachment.save(
        out,
        extra={"task": {"type": "classification", "labels": labels}, "model": model_name, "imported_from": str(src)},
    )
    return attachment
