"""Crash safety: a training process killed with SIGKILL at a random step resumes to the same adapter, bit for bit.

Both runs use the CLI in a subprocess on the CPU. Dropout is on, so the resumed run must also restore the RNG.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors


def train_command(model, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "peftlab",
        "--no-progress",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--checkpoint-every",
        "1",
        "--dropout",
        "0.1",
        "--lr",
        "0.01",
        "--seed",
        "7",
        *extra,
    ]


def checkpoint_step(out: Path) -> int:
    for name in ("checkpoint", "checkpoint.old"):
        try:
            return json.loads((out / name / "trainer.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
    return -1


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter(tiny_model_dir, tiny_csv, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference = tmp_path / "reference"
    subprocess.run(train_command(tiny_model_dir, tiny_csv, reference), check=True, capture_output=True, env=env)
    total = json.loads((reference / "results.json").read_text())["steps"]

    kill_at = random.randint(2, total - 2)
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        train_command(tiny_model_dir, tiny_csv, interrupted),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 120
    while checkpoint_step(interrupted) < kill_at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_at} could be killed"
    assert not (interrupted / "results.json").exists()

    done = subprocess.run(
        [sys.executable, "-m", "peftlab", "--no-progress", "train", "--resume", str(interrupted)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    a = read_tensors(reference / "adapter" / WEIGHTS_FILE)
    b = read_tensors(interrupted / "adapter" / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), f"{key} differs after a kill at step {kill_at} and a resume"
    ours = json.loads((interrupted / "results.json").read_text())
    theirs = json.loads((reference / "results.json").read_text())
    assert ours["metrics"] == theirs["metrics"] and ours["steps"] == theirs["steps"]
    assert not list(interrupted.glob(".*.tmp")), "temporary files were left behind"
