"""Data-parallel training on the CPU with the gloo backend: 2 processes equal 1 process with the same global batch,
only rank 0 writes, the saved adapter is complete, and an interrupted 2-process run resumes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors

# Differences between 1 and 2 processes come only from float summation order across processes.
TOLERANCE = 1e-5


def command(model, data, out, *extra, nproc=None):
    args = [sys.executable, "-m", "peftlab", "--no-progress", "train"]
    if nproc:
        args += ["--nproc", str(nproc)]
    return args + [
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
        "--grad-accum",
        "2",
        "--max-length",
        "32",
        "--lr",
        "0.01",
        "--seed",
        "3",
        "--r",
        "4",
        *extra,
    ]


def run(args, **kw):
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def single_and_double(tiny_model_dir, tiny_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run(command(tiny_model_dir, tiny_csv, root / "one"))
    two = run(command(tiny_model_dir, tiny_csv, root / "two", nproc=2))
    return root / "one", root / "two", two


def test_two_processes_match_one_with_the_same_global_batch(single_and_double):
    one, two, _ = single_and_double
    a, b = read_tensors(one / "adapter" / WEIGHTS_FILE), read_tensors(two / "adapter" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # the saved adapter is complete
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < TOLERANCE, worst
    r1, r2 = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
    assert r2["processes"] == 2 and r1["steps"] == r2["steps"]
    assert r1["metrics"]["test"]["accuracy"] == r2["metrics"]["test"]["accuracy"]
    assert r1["metrics"]["test"]["loss"] == pytest.approx(r2["metrics"]["test"]["loss"], abs=TOLERANCE)
    for h1, h2 in zip(r1["history"], r2["history"], strict=True):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=TOLERANCE)


def test_only_rank_zero_writes_and_prints(single_and_double):
    _, two, done = single_and_double
    assert done.stdout.count("run folder:") == 1
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "checkpoint", "config.json", "results.json"]


def test_an_interrupted_two_process_run_resumes(tiny_model_dir, tiny_csv, tmp_path, single_and_double):
    _, reference, _ = single_and_double
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(tiny_model_dir, tiny_csv, out, "--checkpoint-every", "1", nproc=2),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 180
    step = -1
    while step < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        with contextlib.suppress(OSError, ValueError):
            step = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be interrupted"
    run([sys.executable, "-m", "peftlab", "--no-progress", "train", "--nproc", "2", "--resume", str(out)])
    a, b = read_tensors(reference / "adapter" / WEIGHTS_FILE), read_tensors(out / "adapter" / WEIGHTS_FILE)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
    assert torch.equal(torch.tensor(json.loads((out / "results.json").read_text())["steps"]), torch.tensor(24))


def test_fsdp_shards_the_model_and_still_saves_a_complete_adapter(
    tiny_model_dir, tiny_csv, tmp_path, single_and_double
):
    one, _, _ = single_and_double
    run(command(tiny_model_dir, tiny_csv, tmp_path / "fsdp", "--fsdp", nproc=2))
    a, b = read_tensors(one / "adapter" / WEIGHTS_FILE), read_tensors(tmp_path / "fsdp" / "adapter" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # gathered, never partial
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
    r1 = json.loads((one / "results.json").read_text())
    r2 = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert r2["metrics"]["test"]["loss"] == pytest.approx(r1["metrics"]["test"]["loss"], abs=TOLERANCE)
    assert r2["params"] == r1["params"]


def test_fsdp_needs_several_processes(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, err = cli("train", "--fsdp", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "x")
    assert code == 2 and "fsdp: shards the model across processes" in err


def test_fsdp_trains_a_decoder_through_the_chunked_loss_as_one_process_does(tiny_llama_dir, tmp_path):
    """SFT on the tiny Llama: the loss runs with the output layer set aside and applied in chunks to the targets;
    under FSDP the output layer's weights are sharded, and with gradient checkpointing on as well the result is
    still the single-process one."""
    from tests.test_sft import instruction_rows

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(48)))
    sft = ("--task", "sft", "--eval-generate", "0", "--epochs", "1")
    run(command(tiny_llama_dir, data, tmp_path / "one", *sft))
    run(command(tiny_llama_dir, data, tmp_path / "fsdp", *sft, "--fsdp", "--gradient-checkpointing", nproc=2))
    a = read_tensors(tmp_path / "one" / "adapter" / WEIGHTS_FILE)
    b = read_tensors(tmp_path / "fsdp" / "adapter" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
