"""Experiment tracking (``--report-to``): what TensorBoard, MLflow and W&B receive, read back with each tool's own
reader; the errors before a run starts; a resumed run's steps; no side effects on import."""

import json
import os
import subprocess
import sys

import pytest

from tests.short_fit import crash_after_checkpoint

# Two short epochs of the tiny task (steps of 16 examples), LoRA rank 4.
TINY = ("--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--max-length", "32", "--r", "4")


def train(cli, tiny_model_dir, tiny_csv, out, *extra):
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", out, *TINY, *extra)
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def scalars(folder) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard's own reader finds under ``folder``: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_loss_rates_and_validation_metrics(cli, tiny_model_dir, tiny_csv, tmp_path):
    pytest.importorskip("tensorboard")
    flags = ("--report-to", "tensorboard", "--log-every", "1", "--head-lr", "2e-2")
    results = train(cli, tiny_model_dir, tiny_csv, tmp_path / "run", *flags)
    logged = scalars(tmp_path / "run" / "tensorboard")
    steps = results["steps"]
    losses = logged["train/loss"]
    assert sorted(losses) == list(range(1, steps + 1))  # --log-every 1: every step
    start = 0
    for entry in results["history"]:  # the history's train loss is the mean of the steps since the last evaluation
        window = [losses[s] for s in range(start + 1, entry["step"] + 1)]
        assert sum(window) / len(window) == pytest.approx(entry["train_loss"], rel=1e-5)
        assert logged["train/epoch_loss"][entry["step"]] == pytest.approx(entry["train_loss"], rel=1e-6)
        assert logged["validation/accuracy"][entry["step"]] == pytest.approx(entry["validation"]["accuracy"])
        start = entry["step"]
    assert logged["test/accuracy"][steps] == pytest.approx(results["metrics"]["test"]["accuracy"])
    assert logged["params/trainable"][steps] == results["params"]["trainable"]
    assert logged["params/changed"][steps] == results["params"]["changed"]
    # the task head learns at its own rate: both groups' rates are logged, each within its peak rate
    base, head = logged["train/lr/base"], logged["train/lr/classifier"]
    assert max(base.values()) == pytest.approx(1e-2) and max(head.values()) == pytest.approx(2e-2)
    assert all(head[s] == pytest.approx(2 * base[s]) for s in base)
    assert max(logged["train/lr"].values()) == pytest.approx(1e-2, rel=0.2)
    assert all(v > 0 for v in logged["train/grad_norm"].values())
    assert all(v > 0 for v in logged["train/examples_per_second"].values())
    assert all(v > 0 for v in logged["train/tokens_per_second"].values())
    assert all(v > 0 for v in logged["memory/peak_rss_bytes"].values())  # the CPU: the process's peak RSS


def test_the_interval_logs_the_first_and_last_step(cli, tiny_model_dir, tiny_csv, tmp_path):
    pytest.importorskip("tensorboard")
    results = train(cli, tiny_model_dir, tiny_csv, tmp_path / "run", "--report-to", "tensorboard", "--log-every", "5")
    steps = results["steps"]
    expected = sorted({1, steps, *range(5, steps + 1, 5)})
    assert sorted(scalars(tmp_path / "run" / "tensorboard")["train/loss"]) == expected


def test_a_resumed_run_continues_the_tensorboard_steps(cli, tiny_model_dir, tiny_csv, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    flags = ("--report-to", "tensorboard", "--log-every", "1", "--checkpoint-every", "5")
    with crash_after_checkpoint(15):  # the command stops there as if interrupted (exit 130)
        code, _, _ = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", out, *TINY, *flags)
    assert code == 130
    assert max(scalars(out / "tensorboard")["train/loss"]) == 15
    code, _, err = cli("train", "--resume", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    losses = scalars(out / "tensorboard")["train/loss"]
    assert sorted(losses) == list(range(1, results["steps"] + 1))  # every step once, the resumed ones after 15


def test_mlflow_records_params_and_metrics_in_the_run_folder(cli, tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy", reason="MLflow's local store in the run folder is SQLite (sqlalchemy, alembic)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    results = train(cli, tiny_model_dir, tiny_csv, out, "--report-to", "mlflow", "tensorboard")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "tracking.json").read_text())["mlflow"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["method"] == "lora"
    assert float(run.data.params["lr"]) == 1e-2
    assert run.data.params["report_to"] == "['mlflow', 'tensorboard']"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step for m in loss} >= {1, results["steps"]}
    accuracy = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "validation/accuracy")}
    assert accuracy == {h["step"]: pytest.approx(h["validation"]["accuracy"]) for h in results["history"]}
    assert run.data.metrics["test/accuracy"] == pytest.approx(results["metrics"]["test"]["accuracy"])
    assert (out / "tensorboard").is_dir()  # both trackers at once


def test_wandb_offline_writes_the_run_into_its_folder(cli, tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(cli, tiny_model_dir, tiny_csv, out, "--report-to", "wandb")
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]
    (run_dir,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    # wandb 0.31 has no Python reader of its offline log (run-<id>.wandb, protobuf records read by its Go core), so
    # only the presence of the metric names in it is checked here, not their values.
    log = (run_dir / f"run-{run_id}.wandb").read_bytes()
    for key in (b"train/loss", b"train/grad_norm", b"validation/accuracy", b"test/accuracy", b"params/changed"):
        assert key in log, key


def test_a_missing_tracker_library_is_one_line_before_training(cli, tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails for real
    code, out, err = cli(
        "train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run", "--report-to", "mlflow"
    )
    assert code == 2
    assert err.strip() == "error: --report-to mlflow needs the mlflow package: pip install 'peftlab[tracking]'"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--report-to", "neptune"), "invalid choice: 'neptune'"),
        (("--report-to", "none", "tensorboard"), "none turns tracking off"),
        (("--log-every", "0"), "log_every"),
    ],
)
def test_bad_tracking_options_are_one_line_errors(cli, tiny_model_dir, tiny_csv, tmp_path, flags, message):
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run", *flags)
    assert code == 2
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    if flags[1] == "neptune":
        assert "tensorboard" in err and "mlflow" in err and "wandb" in err


def test_report_to_in_a_config_file_is_checked(cli, tiny_model_dir, tiny_csv, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('report_to = ["tensorbord"]\n')
    code, _, err = cli("train", "--config", config, "--model", tiny_model_dir, "--data", tiny_csv)
    assert code == 2
    assert "tensorbord" in err and "tensorboard, mlflow, wandb" in err


def test_importing_tracking_has_no_side_effects():
    script = (
        "import logging, os\n"
        "env = dict(os.environ)\n"
        "levels = {n: l.level for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger)}\n"
        "root = logging.root.level\n"
        "import peftlab, peftlab.train.tracking, peftlab.run, peftlab.cli\n"
        "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
        "assert logging.root.level == root\n"
        "for n, level in levels.items(): assert logging.getLogger(n).level == level, n\n"
        "import sys\n"
        "assert not {'tensorboard', 'mlflow', 'wandb'} & set(sys.modules), 'a tracker library was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_a_resumed_run_continues_the_same_mlflow_run(cli, tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy", reason="MLflow's local store in the run folder is SQLite (sqlalchemy, alembic)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    flags = ("--report-to", "mlflow", "--log-every", "1", "--checkpoint-every", "5")
    with crash_after_checkpoint(15):
        code, _, _ = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", out, *TINY, *flags)
    assert code == 130
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"
    code, _, err = cli("train", "--resume", out)
    assert code == 0, err
    steps = json.loads((out / "results.json").read_text())["steps"]
    assert json.loads((out / "tracking.json").read_text())["mlflow"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, steps + 1))
