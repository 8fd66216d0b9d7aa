"""Never destroy what is not ours: every --out is new or empty (or replaced with --overwrite, never over the
command's own inputs), and one process at a time trains into a run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.fileio import LOCK_FILE

from .conftest import file_hashes, train_tiny_run

SHORT = ["--max-steps", "4", "--batch-size", "16", "--max-length", "32", "--eval-batch-size", "64"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_csv, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model_dir, tiny_csv, tmp_path_factory.mktemp("runs") / "run", *SHORT)


@pytest.mark.parametrize(
    "command",
    [
        ["export", "{run}", "--format", "hf", "--out", "{run}"],
        ["export", "{run}", "--format", "hf", "--out", "{run}/adapter", "--overwrite"],
        ["merge", "{run}", "--out", "{run}"],
        ["merge", "{run}", "--out", "{run}/..", "--overwrite"],
        ["import", "{run}/adapter", "--out", "{run}/adapter", "--overwrite"],
        ["compose", "merge", "{run}", "--rank", "2", "--out", "{run}/adapter", "--overwrite"],
    ],
    ids=["export-over-run", "export-into-run", "merge-over-run", "merge-above-run", "import-over-input", "compose"],
)
def test_no_command_writes_over_or_into_its_own_input(trained, cli, command):
    before = file_hashes(trained)
    code, _, err = cli(*[part.format(run=trained) for part in command])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "this command's input" in err, err
    assert file_hashes(trained) == before


def test_a_non_empty_out_is_refused_and_replaced_only_with_overwrite(trained, cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for command in (["export", trained, "--format", "hf"], ["merge", trained]):
        code, _, err = cli(*command, "--out", mine)
        assert code == 2 and err.count("\n") == 1, err
        assert f"--out {mine}: already exists and is not empty" in err and "--overwrite" in err
        assert (mine / "thesis.tex").read_text() == "years of work"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("export", trained, "--format", "hf", "--out", empty)[0] == 0  # an empty folder is fine
    assert (empty / "adapter_config.json").is_file()
    code, _, err = cli("export", trained, "--format", "hf", "--out", empty)  # a second time: not without the flag
    assert code == 2 and "already exists and is not empty" in err
    assert cli("export", trained, "--format", "hf", "--out", mine, "--overwrite")[0] == 0
    assert not (mine / "thesis.tex").exists() and (mine / "adapter_config.json").is_file()


@pytest.mark.parametrize("out", ["", ".", "~"])
def test_the_current_folder_home_and_empty_names_are_refused(trained, cli, out, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("keep")
    code, _, err = cli("merge", trained, "--out", out, "--overwrite")
    assert code == 2 and err.count("\n") == 1, err
    assert (tmp_path / "keep.txt").read_text() == "keep"


def test_result_files_are_not_replaced_without_overwrite(tmp_path, cli):
    results = tmp_path / "results.json"
    results.write_text("{}")
    code, _, err = cli("compose", "bench", "--model", "nowhere", "--out", results)
    assert code == 2 and f"--out {results}: already exists" in err, err
    assert results.read_text() == "{}"


def test_train_refuses_a_folder_another_process_is_training_into(tiny_model_dir, tiny_csv, tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "now"}))
        code, _, err = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", run, *SHORT)
        assert code == 2 and err.count("\n") == 1, err
        assert f"process {holder.pid}" in err and "has been writing into this folder" in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written beside the other's lock
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_killed_run_is_reported_and_resume_still_works(tiny_model_dir, tiny_csv, tmp_path, cli):
    run = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", run, *SHORT]
    assert cli(*args)[0] == 0
    assert not (run / LOCK_FILE).exists()  # released at the end
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "since": "then"}))
    code, _, err = cli("train", "--resume", run)
    assert code == 0, err
    assert f"removed a stale lock of process {gone.pid} (no longer running)" in err
    assert not (run / LOCK_FILE).exists()


def test_two_trainings_started_into_one_folder_never_mix(tiny_model_dir, tiny_csv, tmp_path):
    run = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", tiny_csv, "--out", run, "--epochs", "500", "--max-length", "32"]
    command = [sys.executable, "-m", "peftlab", "--no-progress", "train", *map(str, args)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        second = subprocess.run([*command, "--seed", "1"], capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # the first is still training: the second met its lock
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and "has been writing into this folder" in second.stderr, second.stderr
    assert json.loads((run / "config.json").read_text())["seed"] == 0


def test_a_folder_beside_out_named_like_the_swap_copy_is_never_deleted(trained, cli, tmp_path):
    mine = tmp_path / "merged.old"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    code, _, err = cli("merge", trained, "--out", tmp_path / "merged")
    assert code == 2 and err.count("\n") == 1 and "merged.old exists" in err, err
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "merged").exists()
