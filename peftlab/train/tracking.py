"""Experiment tracking: a run's numbers sent, as it trains, to TensorBoard, MLflow or Weights & Biases.

A ``Tracker`` is three calls: ``start(config)`` once (the resolved configuration as hyperparameters),
``log(step, metrics)`` by optimiser step (flat ``{"train/loss": ...}`` mappings of numbers), and ``finish()``.
``open_trackers`` builds one per tool named in ``--report-to`` and hands back a single object fanning out to all of
them, so the loop logs through one object and never asks which tools are behind it.

Each tool's library is imported only when the tool is chosen (``require`` checks them all before a run starts). No
tracker changes the process's environment or logging setup; each writes into the run folder:

    tensorboard   <run>/tensorboard/ (event files; a resumed run writes on in the same folder, and the events a
                  crash left after the checkpoint it resumes from are purged, so every step appears once)
    mlflow        MLFLOW_TRACKING_URI where the user set it; else a SQLite store <run>/mlruns/mlflow.db with
                  artifacts in <run>/mlruns/artifacts (MLflow 3 refuses its plain-file store unless the
                  environment variable MLFLOW_ALLOW_FILE_STORE is set, which a library must not set for its user)
    wandb         the user's W&B settings (WANDB_MODE, WANDB_PROJECT, ...): project "peftlab" unless WANDB_PROJECT
                  says otherwise, the run named after the run folder, its files under <run>/wandb/

MLflow's and W&B's run ids are kept in <run>/tracking.json, and a resumed run (``--resume``) continues the same
tracked run at the step its checkpoint reached.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Protocol

from ..errors import InputError

TOOLS = ("tensorboard", "mlflow", "wandb")
NONE = "none"
# The module each tool is imported by; what to install when it is missing.
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
INSTALL = "pip install 'peftlab[tracking]'"
IDS_FILE = "tracking.json"


class Tracker(Protocol):
    def start(self, config: dict) -> None: ...

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


def chosen(names: list[str]) -> list[str]:
    """The tools ``names`` (``--report-to``) asks for, in order, without repeats: none for ``[]`` or ``["none"]``."""
    unknown = [n for n in names if n not in (*TOOLS, NONE)]
    if unknown:
        raise InputError(f"report_to: unknown tracker {unknown[0]!r}; expected {', '.join(TOOLS)} or {NONE}")
    tools = list(dict.fromkeys(n for n in names if n != NONE))
    if tools and NONE in names:
        raise InputError(f"report_to: {NONE} turns tracking off; it cannot be combined with {', '.join(tools)}")
    return tools


def require(names: list[str]) -> None:
    """Import the library of every tool in ``names`` now, or raise InputError naming what to install."""
    for tool in chosen(names):
        try:
            importlib.import_module(MODULES[tool])
        except ImportError:
            raise InputError(f"--report-to {tool} needs the {MODULES[tool]} package: {INSTALL}") from None


def open_trackers(names: list[str], folder: Path, resume: bool = False) -> Tracker | None:
    """One tracker over every tool in ``names`` writing for the run folder ``folder`` (None when there is none);
    ``resume``: the run continues from a checkpoint, and so does its tracking."""
    tools = chosen(names)
    if not tools:
        return None
    makers = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
    trackers = [makers[tool](Path(folder), resume) for tool in tools]
    return trackers[0] if len(trackers) == 1 else FanOut(trackers)


class FanOut:
    """Several trackers behind one: every call goes to each in turn."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def start(self, config: dict) -> None:
        for t in self.trackers:
            t.start(config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def finish(self, failed: bool = False) -> None:
        for t in self.trackers:
            t.finish(failed)


# --- the tools --------------------------------------------------------------------------------------------------


class TensorBoard:
    """Event files in ``<run>/tensorboard`` through TensorBoard's writer (as PyTorch wraps it); the configuration as
    a text summary (a JSON table) and in TensorBoard's hyperparameter view."""

    def __init__(self, folder: Path, resume: bool):
        self.folder, self.resume = folder / "tensorboard", resume
        self.writer = None
        self.config: dict | None = None

    def start(self, config: dict) -> None:
        self.config = config  # written with the first step: a resumed run's purge step is that step

    def _open(self, step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Resuming at ``step``: events a crashed run wrote from ``step`` on (after its last checkpoint) are hidden.
        self.writer = SummaryWriter(str(self.folder), purge_step=step if self.resume else None)
        if self.config is not None and not self.resume:
            text = json.dumps(self.config, indent=1, sort_keys=True, default=str)
            self.writer.add_text("config", "```\n" + text + "\n```", global_step=0)
            for summary in hparams(scalar_params(self.config), {}):
                self.writer.file_writer.add_summary(summary)
        return self.writer

    def log(self, step: int, metrics: dict[str, float]) -> None:
        writer = self.writer or self._open(step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)

    def finish(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow:
    """A run in MLflow through its client (``MlflowClient``; never the global ``mlflow.start_run`` state): the
    configuration as parameters, the metrics by step."""

    def __init__(self, folder: Path, resume: bool):
        from mlflow.tracking import MlflowClient

        self.folder = folder
        uri = os.environ.get("MLFLOW_TRACKING_URI")  # the user's server or store, when they set one
        store = folder / "mlruns"
        if not uri:
            store.mkdir(parents=True, exist_ok=True)
            uri = "sqlite:///" + str((store / "mlflow.db").resolve())
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = saved_id(folder, "mlflow") if resume else None
        self.resumed = self.run_id is not None
        if self.resumed:  # the same MLflow run goes on (its parameters are logged already)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name("peftlab")
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (store / "artifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment("peftlab", artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=folder.name).info.run_id
        save_id(folder, "mlflow", self.run_id)

    def start(self, config: dict) -> None:
        if self.resumed:
            return
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]
        for k in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[k : k + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _millis()
        batch = [Metric(safe_key(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandB:
    """A Weights & Biases run (``wandb.init`` with the user's environment), files under ``<run>/wandb``."""

    def __init__(self, folder: Path, resume: bool):
        self.folder, self.resume = folder, resume
        self.run = None

    def start(self, config: dict) -> None:
        import wandb

        run_id = saved_id(self.folder, "wandb") if self.resume else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            save_id(self.folder, "wandb", run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "peftlab",
            name=self.folder.name,
            id=run_id,
            resume="allow",
            dir=str(self.folder),
            config=config,
            # W&B would otherwise wrap this process's stdout and stderr to copy the console into the run
            settings=wandb.Settings(console="off"),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


# --- helpers ----------------------------------------------------------------------------------------------------


def saved_id(folder: Path, tool: str) -> str | None:
    path = folder / IDS_FILE
    return json.loads(path.read_text()).get(tool) if path.is_file() else None


def save_id(folder: Path, tool: str, run_id: str) -> None:
    path = folder / IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    ids[tool] = run_id
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ids, indent=1) + "\n")


def scalar_params(config: dict) -> dict:
    """``config`` with every value a number, text or boolean (others as their text), for hyperparameter views."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


def safe_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / `` and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", key)


def numbers(prefix: str, metrics: dict) -> dict[str, float]:
    """The finite numbers of ``metrics`` as ``prefix/name``, nested mappings flattened (``prefix/a/b``)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(numbers(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def _millis() -> int:
    return int(time.time() * 1000)


class Window:
    """The optimiser steps since the last log: their mean training loss and their throughput."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.examples, self.tokens, self.seconds = 0.0, 0, 0, 0, 0.0

    def add(self, loss: float, examples: int, tokens: int, seconds: float) -> None:
        self.loss += loss
        self.steps += 1
        self.examples += examples
        self.tokens += tokens
        self.seconds += seconds

    def metrics(self) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {
            "train/loss": self.loss / max(self.steps, 1),
            "train/examples_per_second": self.examples / seconds,
            "train/tokens_per_second": self.tokens / seconds,
        }


def learning_rates(groups: list[dict], rates: list[float]) -> dict[str, float]:
    """``train/lr``, the run's rate (that of the groups at scale 1; else the first group's), and where the groups
    learn at different rates (the task head, a method's parts) one ``train/lr/<group>`` per named group."""
    run_rate = next((r for g, r in zip(groups, rates, strict=True) if g.get("lr_scale", 1.0) == 1.0), rates[0])
    out = {"train/lr": run_rate}
    named = {}
    for group, rate in zip(groups, rates, strict=True):
        pattern = str(group.get("name") or "*")  # the group's pattern: "classifier.*", or "*" for the rest
        named.setdefault("base" if pattern == "*" else pattern.removesuffix(".*"), rate)
    if len(set(named.values())) > 1:
        out.update({f"train/lr/{safe_key(name)}": rate for name, rate in named.items()})
    return out


def peak_process_memory(device) -> dict[str, float]:
    """Peak memory so far: the CUDA allocator's peak on a GPU (``memory/peak_cuda_bytes``), else the process's peak
    resident set size (``memory/peak_rss_bytes``, where the platform reports it)."""
    import torch

    if device.type == "cuda":
        return {"memory/peak_cuda_bytes": float(torch.cuda.max_memory_allocated(device))}
    try:
        import resource
    except ImportError:  # Windows
        return {}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"memory/peak_rss_bytes": float(rss if sys.platform == "darwin" else rss * 1024)}
