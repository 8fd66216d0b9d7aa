"""The ``peftlab compose`` commands on the tiny model: merge, lorahub, bench."""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab.models import load_classifier


def saved_lora(folder, model_dir, labels, seed: int, **options):
    attachment = peftlab.attach(load_classifier(model_dir, labels), "lora", **options)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in attachment.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    task = {"type": "classification", "labels": labels}
    return attachment.save(folder, extra={"task": task, "model": str(model_dir)})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("compose-cli")
    return [
        saved_lora(root / "reviews", tiny_model_dir, ["neg", "pos"], 1, r=2),
        saved_lora(root / "topics", tiny_model_dir, ["a", "b", "c"], 2, r=3),
    ]


def test_merge_writes_an_ordinary_lora_adapter(cli, adapters, tmp_path, tiny_model_dir):
    code, out, err = cli("compose", "merge", *adapters, "--weights", "0.5", "1.5", "--rank", "5",
                         "--head", "topics", "--out", tmp_path / "m", "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["head"] == "topics" and report["relative_error"]["total"] < 1e-6  # rank 5 >= 2 + 3
    merged = peftlab.load_adapter(load_classifier(tiny_model_dir, ["a", "b", "c"]), tmp_path / "m")
    assert merged.config.r == 5 and merged.trainable_modules == ["classifier"]
    code, out, err = cli("compose", "merge", *adapters, "--rank", "1", "--out", tmp_path / "m1")
    assert code == 0 and "total" in out
    meta = json.loads((tmp_path / "m1" / "adapter.json").read_text())
    assert 0 < meta["composition"]["relative_error"]["total"] < 1
    code, out, err = cli("compose", "merge", *adapters, "--rank", "2", "--head", "x", "--out", tmp_path / "bad")
    assert code == 2 and "--head" in err


def test_lorahub_and_bench_run(cli, adapters, tiny_model_dir, tiny_csv, tmp_path):
    options = ["--k", "8", "--budget", "3", "--test-limit", "10", "--max-length", "32"]
    code, out, err = cli("compose", "lorahub", *adapters, "--data", tiny_csv, "--model", tiny_model_dir, *options,
                         "--out", tmp_path / "hub.json")  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "hub.json").read_text())
    assert set(result["accuracy"]) == {"zero-shot", "single:reviews", "single:topics", "lorahub"}
    code, out, err = cli("compose", "bench", "--model", tiny_model_dir, "--adapters", "2", "--rank", "2",
                         "--batch-size", "4", "--length", "8", "--repeats", "1")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["max_abs_difference_vs_peft"] < 1e-4
