"""Property-based fuzz of what users hand back to peftlab: adapter metadata and a run's resume state.

Whatever a field holds, the command either works or ends with exit 2 and one ``error:`` line (no traceback, no
internal error), and nothing outside the run folder is touched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab.cli import main

from .conftest import file_hashes, train_tiny_run

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
META_KEYS = ["format", "format_version", "method", "config", "targets", "trainable_modules", "base", "task"]
STATE_KEYS = ["step", "train_seconds", "examples", "tokens", "best", "best_step", "history", "loss_sum", "optimizer"]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_csv, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "run"
    return train_tiny_run(
        tiny_model_dir, tiny_csv, folder, "--max-steps", "2", "--batch-size", "8", "--max-length", "32"
    )


def one_line_or_success(capsys, argv: list[str]) -> None:
    code = main(["--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and err.startswith("error: ") and err.count("\n") == 1), (code, err)
    assert "internal error" not in err and "Traceback" not in err


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(META_KEYS), value=JSON)
def test_any_adapter_metadata_field_is_loaded_or_refused_in_one_line(run, tmp_path_factory, capsys, key, value):
    copy = tmp_path_factory.mktemp("meta") / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "adapter" / "adapter.json").read_text())
    meta[key] = value
    (copy / "adapter" / "adapter.json").write_text(json.dumps(meta))
    outside = file_hashes(run)
    one_line_or_success(capsys, ["eval", str(copy)])
    assert file_hashes(run) == outside


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(STATE_KEYS), value=JSON, drop=st.booleans())
def test_any_resume_state_is_resumed_or_refused_in_one_line(run, tmp_path_factory, capsys, key, value, drop):
    copy = tmp_path_factory.mktemp("state") / "run"
    shutil.copytree(run, copy)
    state_file = copy / "checkpoint" / "trainer.json"
    state = json.loads(state_file.read_text())
    if drop:
        state.pop(key, None)
    else:
        state[key] = value
    state_file.write_text(json.dumps(state, allow_nan=True))
    outside = file_hashes(run)
    one_line_or_success(capsys, ["train", "--resume", str(copy)])
    assert file_hashes(run) == outside
