"""The command line end to end on a tiny model: train, eval, merge, export, import, methods, config files, errors."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peftlab
from peftlab.models import load_classifier

FAST = ["--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--max-length", "32"]
RESULT_KEYS = {
    "method",
    "model",
    "data",
    "seed",
    "metrics",
    "params",
    "adapter_bytes",
    "peak_memory_bytes",
    "train_seconds",
    "examples_per_second",
    "versions",
}


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_csv, tmp_path_factory):
    from peftlab.cli import main

    out = tmp_path_factory.mktemp("runs") / "lora"
    code = main(
        [
            "--no-progress",
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_csv),
            "--out",
            str(out),
            "--r",
            "4",
            "--targets",
            "query",
            "value",
            *FAST,
        ]
    )
    assert code == 0
    return out


def test_train_writes_the_run_folder_of_the_contract(trained_run):
    assert (trained_run / "config.json").exists() and (trained_run / "adapter" / "adapter.json").exists()
    results = json.loads((trained_run / "results.json").read_text())
    assert results.keys() >= RESULT_KEYS
    assert {"total", "trainable", "changed"} <= results["params"].keys()
    assert results["params"]["delta_rank"]["max"] == 4
    assert {"accuracy", "precision", "recall", "f1"} <= results["metrics"]["test"].keys()
    config = json.loads((trained_run / "config.json").read_text())
    assert config["r"] == 4 and config["targets"] == ["query", "value"] and config["method"] == "lora"


def test_eval_reproduces_the_test_metrics(trained_run, cli):
    code, out, _ = cli("eval", trained_run, "--json")
    assert code == 0
    results = json.loads((trained_run / "results.json").read_text())
    assert json.loads(out)["test"] == pytest.approx(results["metrics"]["test"])


def test_eval_on_another_file(trained_run, cli, tmp_path):
    (tmp_path / "more.jsonl").write_text(
        '{"text": "a great film", "label": "pos"}\n{"text": "a dull film", "label": "neg"}\n'
    )
    code, out, _ = cli("eval", trained_run, "--data", tmp_path / "more.jsonl", "--json")
    assert code == 0 and json.loads(out)["more.jsonl"]["examples"] == 2


def test_merge_writes_a_model_plain_transformers_loads(trained_run, cli, tmp_path):
    code, _, _ = cli("merge", trained_run, "--out", tmp_path / "merged")
    assert code == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    inputs = tokenizer(["a great film", "the plot was dull"], return_tensors="pt", padding=True)
    from peftlab.run import rebuild

    _, _, _, _, adapter = rebuild(trained_run)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, adapter.model.eval()(**inputs).logits, rtol=0, atol=1e-5)
    assert plain.config.id2label == {0: "neg", 1: "pos"}


def test_export_gives_a_peft_adapter_with_the_same_outputs(trained_run, cli, tmp_path, tiny_model_dir):
    code, _, _ = cli("export", trained_run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0
    assert json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    from peftlab.run import rebuild

    _, _, _, prepared, adapter = rebuild(trained_run)
    theirs = PeftModel.from_pretrained(load_classifier(tiny_model_dir, ["neg", "pos"]), tmp_path / "hf").eval()
    inputs = prepared.splits["test"].batch(range(8))
    inputs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, adapter.model.eval()(**inputs).logits, rtol=0, atol=1e-6)
    code, _, _ = cli("import", tmp_path / "hf", "--out", tmp_path / "back", "--labels", "neg,pos")
    assert code == 0
    back = peftlab.load_adapter(load_classifier(tiny_model_dir, ["neg", "pos"]), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(
            back.model.eval()(**inputs).logits, adapter.model(**inputs).logits, rtol=0, atol=1e-6
        )


def test_continued_fine_tuning_starts_from_an_adapter(trained_run, cli, tiny_model_dir, tiny_csv, tmp_path):
    code, _, err = cli(
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_csv,
        "--adapter",
        trained_run / "adapter",
        "--out",
        tmp_path / "more",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "32",
    )
    assert code == 0, err
    config = json.loads((tmp_path / "more" / "config.json").read_text())
    assert config["targets"] == ["query", "value"]  # the adapter's config, not the defaults


def test_full_fine_tuning_baseline(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, out, err = cli(
        "train",
        "--method",
        "full",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_csv,
        "--out",
        tmp_path / "full",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "32",
    )
    assert code == 0, err
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["params"]["trainable"] == results["params"]["total"]
    assert results["lr"] == 5e-5 and "changed" in out


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_config_files_with_flag_overrides(tiny_model_dir, tiny_csv, cli, tmp_path, suffix):
    values = {
        "model": str(tiny_model_dir),
        "data": str(tiny_csv),
        "r": 2,
        "epochs": 1,
        "batch_size": 16,
        "max_length": 32,
        "targets": ["query"],
        "rank_pattern": {"layer.1.*": 1},
    }
    path = tmp_path / f"c{suffix}"
    if suffix == ".toml":
        path.write_text(
            f'model = "{tiny_model_dir}"\ndata = "{tiny_csv}"\nr = 2\nepochs = 1\nbatch-size = 16\nmax_length = 32\n'
            'targets = ["query"]\nrank_pattern = { "layer.1.*" = 1 }\n'
        )
    elif suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))
    code, _, err = cli("train", "--config", path, "--r", "3", "--out", tmp_path / "run")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["r"] == 3 and config["epochs"] == 1 and config["rank_pattern"] == {"layer.1.*": 1}


def test_resume_continues_a_run(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, _ = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "r", *FAST)
    assert code == 0
    code, _, err = cli("train", "--resume", tmp_path / "r")
    assert code == 0, err
    code, _, err = cli("train", "--resume", tmp_path / "r", "--epochs", "5")
    assert code == 2 and "drop --epochs" in err


@pytest.mark.parametrize("method", [m.name for m in peftlab.all_methods()])
def test_every_method_has_train_help(cli, method):
    """Every method's options show as flags (a literal % in a help text once broke argparse's formatting)."""
    with pytest.raises(SystemExit) as exit:
        cli("train", "--method", method, "--help")
    assert exit.value.code == 0


def test_methods_lists_and_explains(cli):
    code, out, _ = cli("methods")
    assert code == 0 and "lora" in out and "full" in out
    code, out, _ = cli("methods", "lora")
    assert code == 0 and "--rslora" in out and "arXiv:2106.09685" in out


@pytest.mark.parametrize(
    "args, message",
    [
        # the closest name comes first; other registered methods may follow it
        (["train", "--method", "lorra"], "unknown method 'lorra' (did you mean 'lora'"),
        (["train", "--rank", "4"], "unknown option '--rank'"),
        (["train", "--r", "four"], "--r: expected an integer, got 'four'"),
        (["train", "--r", "0", "--data", "missing.csv"], "r: expected a positive integer, got 0"),
        (["train", "--lr", "-1"], "lr: expected a positive number"),
        (["train", "--data", "missing.csv"], "'missing.csv' is neither a packaged dataset"),
        (["train", "--model", "bert-base-uncased"], "is neither a packaged model"),
        (["trian"], "unknown command 'trian' (did you mean 'train'?)"),
        (["eval", "no-such-run"], "no-such-run: run folder not found"),
        (["export", "x", "--format", "onnx", "--out", "y"], "invalid choice: 'onnx'"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(cli, args, message):
    code, _, err = cli(*args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_unknown_config_key_suggests_the_near_name(cli, tmp_path):
    (tmp_path / "c.toml").write_text("alhpa = 3\n")
    code, _, err = cli("train", "--config", tmp_path / "c.toml")
    assert code == 2 and "c.toml: unknown option 'alhpa' (did you mean 'alpha'?)" in err


def test_an_existing_run_folder_is_not_overwritten(trained_run, cli):
    code, _, err = cli("train", "--out", trained_run)
    assert code == 2 and "already exists" in err and "--resume" in err


def test_console_script_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "train", "--data", str(tmp_path / "none.csv")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab", "--debug", "train", "--data", str(tmp_path / "none.csv")],
        capture_output=True,
        text=True,
    )
    assert "Traceback" in proc.stderr
