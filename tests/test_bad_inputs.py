"""The bad-input matrix: every mistake a user can make ends with one line naming the file, line or field and what
was expected, a non-zero exit code, no traceback, and nothing half-written left behind.

Each case runs the real CLI in-process (``peftlab.cli.main``); ``test_console_script_exits_2_without_a_traceback``
in test_cli.py checks the same through a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from tests.conftest import sentences, tiny_config, train_tiny_run, write_csv

FAST = ["--epochs", "1", "--batch-size", "16", "--max-length", "32"]


@pytest.fixture(scope="module")
def world(tiny_model_dir, tiny_csv, tmp_path_factory):
    """A trained adapter, a second base model, and a folder of broken inputs."""

    root = tmp_path_factory.mktemp("bad")
    run = train_tiny_run(tiny_model_dir, tiny_csv, root / "good-run", "--r", "2", *FAST)
    other = root / "other-model"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (other / f.name).write_bytes(f.read_bytes())
    torch.manual_seed(1)
    config = tiny_config(vocab_size=len(json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"]))
    config.intermediate_size = 48
    BertModel(config).save_pretrained(other)
    return {
        "run": run,
        "adapter": run / "adapter",
        "other": other,
        "root": root,
        "model": tiny_model_dir,
        "data": tiny_csv,
    }


def copy_adapter(world, name: str) -> Path:
    target = world["root"] / name
    target.mkdir(exist_ok=True)
    for f in world["adapter"].iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def data_file(world, name: str, content: bytes | str) -> Path:
    path = world["root"] / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(world, name: str, rows: list[dict]) -> Path:
    return data_file(world, name, "".join(json.dumps(r) + "\n" for r in rows))


# Each case: (id, builder(world) -> argv, expected exit code, substrings the one line must contain)
CASES = [
    ("missing data file", lambda w: ["--data", w["root"] / "nope.csv"], 2, ["nope.csv", "neither a packaged dataset"]),
    ("empty data file", lambda w: ["--data", data_file(w, "empty.csv", b"")], 2, ["empty.csv", "data file is empty"]),
    (
        "binary data file",
        lambda w: ["--data", data_file(w, "bin.csv", b"text,label\n\x00\xff\x10")],
        2,
        ["bin.csv", "looks binary", "expected UTF-8 text"],
    ),
    (
        "latin-1 data file",
        lambda w: ["--data", data_file(w, "latin.csv", "text,label\ncaf\xe9,pos\n".encode("latin-1"))],
        2,
        ["latin.csv:2", "not UTF-8"],
    ),
    (
        "malformed JSON line",
        lambda w: ["--data", data_file(w, "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b",\n')],
        2,
        ["bad.jsonl:2", "malformed JSON line"],
    ),
    (
        "JSON that is not a list",
        lambda w: ["--data", data_file(w, "obj.json", '{"text": "a"}')],
        2,
        ["obj.json", "expected a JSON list of objects"],
    ),
    (
        "missing text column",
        lambda w: ["--data", write_csv(w["root"] / "notext.csv", sentences(20), ("body", "label"))],
        2,
        ["notext.csv", "no text column", "columns found: body, label"],
    ),
    (
        "missing label column",
        lambda w: ["--data", write_csv(w["root"] / "nolabel.csv", sentences(20), ("text", "y"))],
        2,
        ["nolabel.csv", "no label column", "columns found: text, y"],
    ),
    ("named column absent", lambda w: ["--text-column", "review"], 2, ["no text column 'review'", "columns found"]),
    (
        "ragged CSV row",
        lambda w: ["--data", data_file(w, "ragged.csv", "text,label\na,b\nc,d,e\n")],
        2,
        ["ragged.csv:3", "row has 3 fields, the header has 2"],
    ),
    (
        "unknown data format",
        lambda w: ["--data", data_file(w, "data.xlsx", b"PK")],
        2,
        ["data.xlsx", "unknown data format '.xlsx'"],
    ),
    (
        "truncated parquet file",
        lambda w: ["--data", data_file(w, "data.parquet", b"PAR1")],
        2,
        ["data.parquet", "cannot read the Parquet file"],
    ),
    (
        "arrow file that is not arrow",
        lambda w: ["--data", data_file(w, "data.arrow", b"text,label\nhello,pos\n")],
        2,
        ["data.arrow", "cannot read the Arrow file"],
    ),
    (
        "test label unseen in training",
        lambda w: ["--data", _split_folder(w)],
        2,
        ["test.csv:3", "label 'meh' never occurs in the training split"],
    ),
    (
        "single-class training set",
        lambda w: ["--data", write_csv(w["root"] / "one.csv", [(f"t {i}", "pos") for i in range(30)])],
        2,
        ["one.csv", "one class only ('pos')"],
    ),
    (
        "empty text",
        lambda w: ["--data", jsonl(w, "emptytext.jsonl", [{"text": "ok", "label": "a"}, {"text": " ", "label": "b"}])],
        2,
        ["emptytext.jsonl:2", "column 'text' is empty"],
    ),
    (
        "non-string text",
        lambda w: ["--data", jsonl(w, "number.jsonl", [{"text": "ok", "label": "a"}, {"text": 7, "label": "b"}])],
        2,
        ["number.jsonl:2", "column 'text' holds a number (7)", "expected text"],
    ),
    (
        "missing label value",
        lambda w: ["--data", jsonl(w, "nolab.jsonl", [{"text": "ok", "label": "a"}, {"text": "x"}])],
        2,
        ["nolab.jsonl:2", "label column 'label' holds None"],
    ),
    (
        "max length past the model",
        lambda w: ["--max-length", "5000"],
        2,
        ["max_length: 5000 tokens is more than model", "at most 64"],
    ),
    (
        "target pattern matches nothing",
        lambda w: ["--targets", "qurey"],
        2,
        ["targets: pattern 'qurey' matches no module", "closest module names: query"],
    ),
    (
        "target of the wrong layer type",
        lambda w: ["--targets", "LayerNorm"],
        2,
        ["matches only LayerNorm modules", "adapts Linear"],
    ),
    ("rank larger than the layer", lambda w: ["--r", "64"], 2, ["r: rank 64 is larger than layer", "at most 32"]),
    ("zero rank", lambda w: ["--r", "0"], 2, ["r: expected a positive integer, got 0"]),
    ("negative alpha", lambda w: ["--alpha", "-2"], 2, ["alpha: expected a positive number, got -2.0"]),
    ("zero learning rate", lambda w: ["--lr", "0"], 2, ["lr: expected a positive number, got 0.0"]),
    ("negative epochs", lambda w: ["--epochs", "-1"], 2, ["epochs: expected a positive number, got -1.0"]),
    ("zero batch size", lambda w: ["--batch-size", "0"], 2, ["batch_size: expected a positive integer, got 0"]),
    ("dropout of one", lambda w: ["--dropout", "1"], 2, ["dropout: expected a probability in [0, 1), got 1.0"]),
    ("not a number", lambda w: ["--lr", "fast"], 2, ["--lr: expected a number, got 'fast'"]),
    ("unknown method", lambda w: ["--method", "lorra"], 2, ["unknown method 'lorra' (did you mean 'lora'"]),
    ("unknown flag", lambda w: ["--alhpa", "3"], 2, ["unknown option '--alhpa'", "did you mean '--alpha'"]),
    (
        "unknown config key",
        lambda w: ["--config", data_file(w, "typo.toml", "epochs = 1\nlearning_rate = 0.1\n")],
        2,
        ["typo.toml: unknown option 'learning_rate'"],
    ),
    (
        "malformed config file",
        lambda w: ["--config", data_file(w, "broken.toml", "r = = 3\n")],
        2,
        ["broken.toml: not a valid TOML file"],
    ),
    (
        "wrongly typed config value",
        lambda w: ["--config", data_file(w, "typed.yaml", "r: many\n")],
        2,
        ["typed.yaml: r: expected an integer, got 'many'"],
    ),
    (
        "config that executes code",
        lambda w: ["--config", data_file(w, "evil.yaml", "r: !!python/object/apply:os.system ['echo pwned']\n")],
        2,
        ["evil.yaml: not a valid YAML file"],
    ),
    (
        "adapter onto the wrong base",
        lambda w: ["--model", w["other"], "--adapter", w["adapter"]],
        2,
        ["adapter.json: adapter was trained on a different base model", "intermediate.dense.weight"],
    ),
    (
        "truncated safetensors",
        lambda w: ["--adapter", _truncate(copy_adapter(w, "truncated"))],
        2,
        ["adapter.safetensors: not a readable safetensors file"],
    ),
    (
        "corrupted safetensors",
        lambda w: ["--adapter", _corrupt(copy_adapter(w, "corrupt"))],
        2,
        ["adapter.safetensors: not a readable safetensors file"],
    ),
    (
        "adapter from a newer format",
        lambda w: ["--adapter", _newer(copy_adapter(w, "newer"))],
        2,
        ["format_version 7 is newer than this peftlab reads", "upgrade peftlab"],
    ),
    (
        "adapter folder missing",
        lambda w: ["--adapter", w["root"] / "no-adapter"],
        2,
        ["no-adapter: adapter folder not found"],
    ),
    ("model folder without config", lambda w: ["--model", w["root"]], 2, ["has no config.json"]),
    ("unknown model name", lambda w: ["--model", "gpt5"], 2, ["model: 'gpt5' is neither a packaged model"]),
    (
        "output under a file",
        lambda w: ["--out", data_file(w, "a-file", "x") / "run"],
        2,
        ["cannot create the output folder"],
    ),
    ("cuda without a GPU", lambda w: ["--device", "cuda"], 2, ["device: 'cuda' was asked for but no CUDA device"]),
    ("resume without a run", lambda w: ["--resume", w["root"] / "never-ran"], 2, ["never-ran: no run to resume"]),
    # --- reliability II: metadata, state and values a user can hand us --------------------------------------------
    (
        "adapter method null",
        lambda w: ["--adapter", _edit_meta(copy_adapter(w, "method-null"), method=None)],
        2,
        ["adapter.json: field 'method' must be a method name, found None"],
    ),
    (
        "adapter config a list",
        lambda w: ["--adapter", _edit_meta(copy_adapter(w, "config-list"), config=[1, 2])],
        2,
        ["adapter.json: field 'config' must be an object of the method's options"],
    ),
    (
        "adapter base a string",
        lambda w: ["--adapter", _edit_meta(copy_adapter(w, "base-str"), base="bert")],
        2,
        ["adapter.json: field 'base' must be an object describing the base model"],
    ),
    (
        "format_version a string",
        lambda w: ["--adapter", _edit_meta(copy_adapter(w, "version-str"), format_version="1")],
        2,
        ["format_version must be a positive integer, found '1'"],
    ),
    (
        "format_version true",
        lambda w: ["--adapter", _edit_meta(copy_adapter(w, "version-bool"), format_version=True)],
        2,
        ["format_version must be a positive integer, found True"],
    ),
    (
        "format_version negative",
        lambda w: ["--adapter", _edit_meta(copy_adapter(w, "version-neg"), format_version=-1)],
        2,
        ["format_version must be a positive integer, found -1"],
    ),
    (
        "adapter tensor NaN",
        lambda w: ["--adapter", _edit_tensors(copy_adapter(w, "nan"), lambda t: t.fill_(float("nan")))],
        2,
        ["adapter.safetensors: tensor", "holds NaN or infinite values"],
    ),
    (
        "adapter tensor integer",
        lambda w: ["--adapter", _edit_tensors(copy_adapter(w, "int"), lambda t: t.to(torch.int32))],
        2,
        ["adapter.safetensors: tensor", "torch.int32, expected floating-point values"],
    ),
    (
        "adapter tensor complex",
        lambda w: ["--adapter", _edit_tensors(copy_adapter(w, "complex"), lambda t: t.to(torch.complex64))],
        2,
        ["adapter.safetensors: tensor", "torch.complex64, expected floating-point values"],
    ),
    ("alpha infinite", lambda w: ["--alpha", "inf"], 2, ["--alpha: expected a finite number, got 'inf'"]),
    ("threads absurd", lambda w: ["--threads", "100000"], 2, ["threads: expected 1 to 1024, got 100000"]),
    ("seed beyond 64 bits", lambda w: ["--seed", str(2**70)], 2, ["--seed: expected an integer that fits in 64 bits"]),
    ("seed beyond the streams", lambda w: ["--seed", str(2**50)], 2, ["seed: expected an integer from 0 to 2^40 - 1"]),
    (
        "data too small to split",
        lambda w: ["--data", write_csv(w["root"] / "three.csv", [("good", "pos"), ("bad", "neg"), ("fine", "pos")])],
        2,
        ["three.csv: too few examples to split (2 train, 0 validation, 1 test)", "validation split is empty"],
    ),
    ("data from a pipe", lambda w: ["--data", _fifo(w)], 2, ["pipe.csv: is not a regular file"]),
    (
        "JSON nested too deeply",
        lambda w: ["--data", data_file(w, "deep.json", "[" * 100_000 + "]" * 100_000)],
        2,
        ["deep.json: JSON nested too deeply"],
    ),
    (
        "lone surrogate escape",
        lambda w: ["--data", data_file(w, "surrogate.jsonl", '{"text": "bad \\ud800 text", "label": "pos"}\n')],
        2,
        ["surrogate.jsonl:1: invalid Unicode escape"],
    ),
    (
        "model config disagrees with its weights",
        lambda w: ["--model", _resized_model(w)],
        2,
        ["resized-model: cannot load the model"],
    ),
    (
        "resume state missing a key",
        lambda w: ["--resume", _edit_state(w, "no-step", lambda m: m.pop("step"))],
        2,
        ["trainer.json: missing field 'step'"],
    ),
    (
        "resume state of the wrong type",
        lambda w: ["--resume", _edit_state(w, "step-text", lambda m: m.update(step="three"))],
        2,
        ["trainer.json: field 'step' holds 'three', of the wrong type"],
    ),
    (
        "resume state for another model",
        lambda w: ["--resume", _edit_state(w, "wrong-groups", lambda m: m["optimizer"].update(param_groups=[]))],
        2,
        ["the checkpoint does not fit this run"],
    ),
]


def _edit_meta(folder: Path, **fields) -> Path:
    meta = json.loads((folder / "adapter.json").read_text())
    (folder / "adapter.json").write_text(json.dumps(meta | fields))
    return folder


def _edit_tensors(folder: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter.safetensors")
    first = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[first] = change(tensors[first].clone())
    save_file(tensors, folder / "adapter.safetensors")
    return folder


def _fifo(world) -> Path:
    path = world["root"] / "pipe.csv"
    if not path.exists():
        os.mkfifo(path)
    return path


def _resized_model(world) -> Path:
    folder = world["root"] / "resized-model"
    folder.mkdir(exist_ok=True)
    for f in world["model"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"hidden_size": config["hidden_size"] * 2}))
    return folder


def _edit_state(world, name: str, change) -> Path:
    """A copy of the trained run whose checkpoint's trainer state has been changed."""
    import shutil

    run = world["root"] / name
    if not run.exists():
        shutil.copytree(world["run"], run)
        state = json.loads((run / "checkpoint" / "trainer.json").read_text())
        change(state)
        (run / "checkpoint" / "trainer.json").write_text(json.dumps(state))
    return run


def _split_folder(world) -> Path:
    folder = world["root"] / "split"
    folder.mkdir(exist_ok=True)
    write_csv(folder / "train.csv", sentences(40))
    write_csv(folder / "test.csv", [("a film", "pos"), ("the plot", "meh")])
    return folder


def _truncate(folder: Path) -> Path:
    f = folder / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return folder


def _corrupt(folder: Path) -> Path:
    f = folder / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{" * 32  # the JSON header is no longer JSON
    f.write_bytes(bytes(data))
    return folder


def _newer(folder: Path) -> Path:
    meta = json.loads((folder / "adapter.json").read_text())
    meta["format_version"] = 7
    (folder / "adapter.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, cli, tmp_path, case):
    _, build, expected_code, parts = case
    out = tmp_path / "run"
    args = [str(a) for a in build(world)]
    base = ["--model", str(world["model"]), "--data", str(world["data"]), *FAST]
    if "--resume" not in args:
        args = base + args + (["--out", str(out)] if "--out" not in args else [])
    code, stdout, stderr = cli("train", *args)
    assert code == expected_code, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for part in parts:
        assert part in stderr, f"{part!r} not in {stderr!r}"
    assert not out.exists(), f"partial output left in {out}: {list(out.iterdir())}"


def test_eval_with_a_corrupted_adapter(world, cli):
    run = world["root"] / "corrupt-run"
    run.mkdir()
    (run / "config.json").write_text((world["run"] / "config.json").read_text())
    _truncate(copy_adapter(world, "corrupt-run/adapter"))
    code, _, err = cli("eval", run)
    assert code == 2 and "adapter.safetensors: not a readable safetensors file" in err and err.count("\n") == 1


def test_export_of_a_method_peft_lacks(world, cli, tmp_path):
    code, _, _ = cli(
        "train",
        "--model",
        world["model"],
        "--data",
        world["data"],
        "--method",
        "full",
        "--out",
        tmp_path / "full",
        *FAST,
    )
    assert code == 0
    code, _, err = cli("export", tmp_path / "full", "--format", "hf", "--out", tmp_path / "hf")
    assert code == 2 and "'full' cannot be written in the Hugging Face PEFT format" in err
    assert not (tmp_path / "hf").exists()


def test_a_full_disk_names_the_file_and_leaves_nothing(world, cli, tmp_path, monkeypatch):
    import peftlab.fileio as fileio

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", no_space)
    out = tmp_path / "run"
    code, _, err = cli("train", "--model", world["model"], "--data", world["data"], "--out", out, *FAST)
    assert code == 1 and err.count("\n") == 1
    assert "config.json: could not be written (No space left on device)" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_diverging_run_stops_with_a_message_and_keeps_the_last_good_checkpoint(world, cli, tmp_path, monkeypatch):
    from peftlab.train.loop import ClassificationTask

    calls = {"n": 0}
    real = ClassificationTask.loss

    def nan_after_5(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return loss * float("inf") if calls["n"] > 5 else loss

    monkeypatch.setattr(ClassificationTask, "loss", nan_after_5)
    out = tmp_path / "run"
    code, _, err = cli(
        "train", "--model", world["model"], "--data", world["data"], "--out", out, "--checkpoint-every", "2", *FAST
    )
    assert code == 1 and err.count("\n") == 1
    assert "training diverged at step 6: loss is inf" in err and "last good checkpoint is kept" in err
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == 4
    assert not (out / "results.json").exists()


def test_the_matrix_has_at_least_thirty_cases():
    assert len(CASES) + 4 >= 60


def test_whole_number_labels_written_as_floats_are_one_class(tmp_path):
    from peftlab.data.classification import load_classification

    rows = [(text, "1" if label == "pos" else "0") for text, label in sentences(40)]
    rows = [(text, label + ".0" if i % 2 else label) for i, (text, label) in enumerate(rows)]  # pandas' 1.0 beside 1
    data = load_classification(str(write_csv(tmp_path / "mixed.csv", rows)))
    assert data.labels == ["0", "1"]


def test_eval_and_merge_recover_an_adapter_whose_save_was_interrupted(world, cli, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "adapter").rename(run / "adapter.old")  # a crash between the two renames of a save leaves only this
    code, _, err = cli("eval", run)
    assert code == 0, err
    assert cli("merge", run, "--out", tmp_path / "merged")[0] == 0


@pytest.mark.parametrize("field, value", [("r", None), ("lora_alpha", "sixteen"), ("lora_dropout", [0.1])])
def test_a_peft_adapter_config_field_of_the_wrong_type_is_one_line(world, cli, tmp_path, field, value):
    exported = tmp_path / "hf"
    assert cli("export", world["run"], "--format", "hf", "--out", exported)[0] == 0
    config = json.loads((exported / "adapter_config.json").read_text())
    (exported / "adapter_config.json").write_text(json.dumps(config | {field: value}))
    code, _, err = cli("import", exported, "--out", tmp_path / "ours", "--model", world["model"], "--labels", "neg,pos")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "adapter_config.json" in err and "internal error" not in err
    assert not (tmp_path / "ours").exists()


def test_a_peft_task_type_peftlab_does_not_train_is_one_line(world, cli, tmp_path):
    exported = tmp_path / "hf"
    assert cli("export", world["run"], "--format", "hf", "--out", exported)[0] == 0
    config = json.loads((exported / "adapter_config.json").read_text())
    (exported / "adapter_config.json").write_text(json.dumps(config | {"task_type": "SEQ_2_SEQ_LM"}))
    code, _, err = cli("import", exported, "--out", tmp_path / "ours", "--model", world["model"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "SEQ_2_SEQ_LM" in err and "QUESTION_ANS" in err and not (tmp_path / "ours").exists()


def test_a_full_disk_inside_safetensors_is_one_line_and_leaves_no_adapter(world, cli, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import peftlab.core.adapter_file as attach

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(attach, "save_file", no_space)
    out = tmp_path / "run"
    code, _, err = cli("train", "--model", world["model"], "--data", world["data"], "--out", out, *FAST)
    assert code == 1 and err.count("\n") == 1, err
    assert "adapter: could not be written (Error while serializing: IoError(No space left on device))" in err
    assert not (out / "adapter").exists() and not list(out.glob(".adapter.*.tmp"))
