"""A finished run folder: reading it back (``rebuild``), resuming it, evaluating it, merging and importing adapters
into one."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.adapter_file import CONFIG_FILE, read_tensors
from ..core.attach import Attachment, load_adapter
from ..core.pooling import install_pooling, pooling_of, write_pooling_files
from ..errors import InputError
from ..fileio import read_folder, read_json
from ..models import load_causal_lm, load_classifier, load_span_model, load_tagger
from ..train.loop import TrainSettings, autocast_for
from .options import RunOptions, split_config, without_command_line_only
from .prepare import PEFT_TASK_TYPES, TASK_TYPES, Prepared, build_model, encode_file, make_task, prepare_data


def load_run(run: str | Path) -> tuple[Path, dict]:
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: run folder not found")
    config = as_saved(read_json(run / "config.json", "run config"))
    adapter = read_folder(run / "adapter")  # also the previous version, if a crash fell between a save's renames
    if adapter is None or not (adapter / CONFIG_FILE).exists():
        raise InputError(f"{run}: the run has no adapter yet (did it finish its first epoch?)")
    return run, config


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
    attachment = load_adapter(model, run / "adapter", fp32_trainable=options.dtype != "fp32")  # as it trained
    return run, options, settings, prepared, attachment


def resume_config(run: str | Path) -> tuple[Path, dict]:
    """The saved configuration of a run folder to resume."""
    path = Path(run)
    if not (path / "config.json").exists():
        raise InputError(f"{path}: no run to resume (config.json not found)")
    return path, as_saved(read_json(path / "config.json", "run config"))


def as_saved(config: dict) -> dict:
    """A run's saved configuration, with what runs saved before an option existed meant then: a classifier read
    by the model's own readout (``pooling``)."""
    return {"pooling": "model", **config}


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
    from ..fileio import atomic_folder

    attachment.merge()
    model = attachment.unload()
    with atomic_folder(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "dim", None)
        write_pooling_files(tmp, pooling_of(model), hidden)  # how its head reads, for peftlab and sentence-transformers


def import_hf_adapter(
    adapter: str | Path, out: str | Path, model: str | None, labels: list[str] | None, overwrite: bool, quiet: bool
) -> Attachment:
    """A Hugging Face PEFT adapter converted to peftlab's format in ``out``, on the model its ``task_type`` names
    (a sequence classifier when it names none) of ``model`` (default: the adapter's base_model_name_or_path).
    Classifiers and taggers take ``labels`` (default: LABEL_0, ... for its head's rows)."""
    from ..core.hf_peft import HF_CONFIG, NOTES_FILE, import_hf
    from ..fileio import check_output
    from ..models import resolve_model

    src = Path(adapter)
    cfg = read_json(src / HF_CONFIG, "PEFT adapter config")
    task_type = cfg.get("task_type") or "SEQ_CLS"
    kinds = {peft: kind for kind, peft in PEFT_TASK_TYPES.items()}  # PEFT's task types that peftlab trains
    if task_type not in kinds:
        raise InputError(
            f"{src / HF_CONFIG}: task_type {task_type!r} is not one peftlab trains (expected one of {', '.join(kinds)})"
        )
    kind = kinds[task_type]
    if labels is not None and kind in ("span", "sft"):
        raise InputError(f"--labels: a {task_type} adapter has no classes (labels are for SEQ_CLS and TOKEN_CLS)")
    model_name = model or cfg.get("base_model_name_or_path")
    if not model_name:
        raise InputError(f"{src / HF_CONFIG}: no base_model_name_or_path; give the base with --model")
    path = resolve_model(model_name, quiet=quiet)
    check_output(out, [adapter, path], overwrite)
    notes = read_json(src / NOTES_FILE, "peftlab notes") if (src / NOTES_FILE).is_file() else {}
    task: dict = {"type": TASK_TYPES[kind]}
    if kind == "classify":
        labels = labels or default_labels(src)
        pooling = str(notes.get("pooling", "model"))  # written beside our own exports
        base = load_classifier(path, labels)
        install_pooling(base, pooling)
        task |= {"labels": labels, "pooling": pooling}
    elif kind == "tag":
        labels = labels or default_labels(src)
        base = load_tagger(path, labels)
        task |= {"labels": labels}
    elif kind == "span":
        base = load_span_model(path)
    else:
        base = load_causal_lm(path)
    attachment = import_hf(base, src)
    attachment.save(out, extra={"task": task, "model": model_name, "imported_from": str(src)})
    return attachment


def default_labels(src: Path) -> list[str]:
    """LABEL_0, ... for as many classes as the adapter's saved head has rows."""
    from ..core.hf_peft import HF_WEIGHTS

    tensors = read_tensors(src / HF_WEIGHTS)
    heads = [v.shape[0] for k, v in tensors.items() if "lora_" not in k and k.endswith(".weight") and v.ndim == 2]
    if not heads:
        raise InputError(f"{src}: the adapter has no task head; give its classes with --labels")
    return [f"LABEL_{i}" for i in range(min(heads))]
