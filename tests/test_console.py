"""What a person reads on the console: the training bar's rate and time left, the bars over evaluation, the start
header of a run, resuming, and that importing peftlab leaves the process's warning filters alone."""

from __future__ import annotations

import json
import subprocess
import sys

from peftlab import progress
from peftlab.errors import Interrupted

FAST = ["--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--max-length", "32"]


def test_significant_digits_never_round_to_zero_nor_use_exponents():
    assert progress.significant(0.2712) == "0.27"
    assert progress.significant(0.0034) == "0.0034"
    assert progress.significant(3.74) == "3.7"
    assert progress.significant(27.3) == "27"
    assert progress.significant(1234.5) == "1234"
    assert progress.significant(0) == "0"


def test_rate_text_of_slow_and_fast_steps():
    # a 4-example step every 15 s (a big model on a small machine): never "0 ex/s"
    assert progress.rate_text(examples=8, seconds=30.0, steps=2) == "15 s/step, 0.27 ex/s"
    assert progress.rate_text(examples=4, seconds=3.7, steps=1) == "3.7 s/step, 1.1 ex/s"
    # fast steps: examples per second alone
    assert progress.rate_text(examples=3200, seconds=2.0, steps=100) == "1600 ex/s"
    assert progress.rate_text(examples=32, seconds=0.5, steps=1) == "64 ex/s"
    assert progress.rate_text(examples=0, seconds=0.0, steps=0) == ""


def test_time_left_from_the_first_step_on():
    assert progress.time_left(0, 100, 0.0) == "-:--:--"
    assert progress.time_left(1, 100, 40.0) == "1:06:00"  # one 40 s step done, 99 to go
    assert progress.time_left(50, 100, 5.0) == "0:00:05"
    assert progress.time_left(100, 100, 5.0) == "0:00:00"
    assert progress.duration(3725) == "1:02:05"


def test_track_draws_nothing_when_off_and_one_line_for_long_work_in_line_mode(capsys, monkeypatch):
    with progress.showing("off"), progress.track(10) as advance:
        advance(10)
    assert capsys.readouterr() == ("", "")
    monkeypatch.setattr(progress, "LINE_AFTER", 0.0)
    with progress.showing("line"), progress.stage("test"), progress.track(10) as advance:
        for _ in range(5):
            advance(2)
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("test: 10 examples in ") and err.count("\n") == 1


def test_track_joins_a_live_bar_as_a_row_and_leaves_it():
    bar = progress.new_bar(True)
    with bar, progress.showing("bar", host=bar):
        with progress.stage("validation"), progress.track(4) as advance:
            (task,) = [t for t in bar.tasks if t.description == "validation"]
            advance(4)
            assert task.completed == 4
        assert not bar.tasks
    with progress.showing("bar"), progress.track(3, default="generating", unit="replies") as advance:
        advance(3)  # no live bar to join: a transient one of its own, gone at the end


def test_train_prints_what_will_run(tiny_model_dir, tiny_csv, cli, tmp_path):
    run = tmp_path / "r"
    code, out, err = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", run, *FAST)
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    sizes = results["data_sizes"]
    header = out[: out.index("epoch 1")]
    assert f"lora on {tiny_model_dir}" in header and "task classify" in header
    assert f"{sizes['train']} train, {sizes['validation']} validation, {sizes['test']} test" in header
    labels = results["labels"]
    assert f"labels: {len(labels)}: {', '.join(labels)}" in header
    per_epoch = -(-sizes["train"] // 16)
    assert f"steps: {2 * per_epoch} ({per_epoch} per epoch, 2 epochs)" in header
    assert "batch: 16 x 1 accumulation = 16 examples per step" in header
    assert "learning rate: 0.01, head" in header
    assert "device: cpu, weights fp32, compute fp32" in header
    assert f"folder: {run}" in header
    assert "resuming" not in header


def test_resume_says_the_folder_and_the_step(tiny_model_dir, tiny_csv, cli, tmp_path):
    run = tmp_path / "r"
    args = ("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", run, *FAST)
    code, out, err = cli(*args)
    assert code == 0, err
    steps = json.loads((run / "results.json").read_text())["steps"]
    code, out, err = cli("train", "--resume", run)
    assert code == 0, err
    assert f"resuming {run} from step {steps} of {steps}" in out


def test_an_interrupted_run_names_its_folder(tiny_model_dir, tiny_csv, cli, tmp_path, monkeypatch):
    import peftlab.run.training as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit", interrupted)
    run = tmp_path / "r"
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", run, *FAST)
    assert code == 130
    assert err.strip() == f"error: interrupted (continue the run with: peftlab train --resume {run.resolve()})"
    assert isinstance(Interrupted(run), KeyboardInterrupt)


def test_importing_peftlab_changes_no_warning_filter():
    # the libraries peftlab builds on add filters of their own when imported (torch, numpy): import them first
    code = (
        "import warnings, numpy, torch, transformers, safetensors, rich; before = list(warnings.filters); "
        "import peftlab, peftlab.cli, peftlab.run, peftlab.bench, peftlab.process, peftlab.progress; "
        "assert list(warnings.filters) == before, [f for f in warnings.filters if f not in before]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
