"""Security: no pickles, configs that cannot run code, remote code only behind an explicit flag."""

import json
import re
from pathlib import Path

import peftlab

PACKAGE = Path(peftlab.__file__).parent
FORBIDDEN = {
    # the pickle modules themselves (the --allow-pickle flag and its messages may name pickle files)
    r"\b(import|from) (c?pickle|dill|cloudpickle)\b|\bpickle\.(loads?|Unpickler)\b": "pickle",
    r"torch\.load\(": "torch.load",
    r"\bjoblib\b": "joblib",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle",
    r"yaml\.load\(": "yaml.load (use yaml.safe_load)",
    r"yaml\.unsafe_load": "yaml.unsafe_load",
    r"(?<![.\w])eval\(": "eval",
    r"(?<![.\w])exec\(": "exec",
    r"trust_remote_code\s*=\s*True": "trust_remote_code=True",
}


def test_the_package_never_unpickles_evaluates_or_trusts_remote_code():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for pattern, what in FORBIDDEN.items():
            for match in re.finditer(pattern, text):
                line = text[: match.start()].count("\n") + 1
                source_line = text.splitlines()[line - 1]
                if "never" in source_line.lower():  # prose that says we never do it
                    continue
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {what}")
    assert not offenders, offenders


def test_run_folders_hold_only_safetensors_and_json(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, _ = cli(
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_csv,
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "32",
    )
    assert code == 0
    suffixes = {p.suffix for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes


def evil_model(tiny_model_dir, tmp_path, model_type: str):
    """A model folder whose config points to code that would leave a marker file if it ever ran."""
    evil = tmp_path / f"evil-{model_type}"
    evil.mkdir()
    for f in tiny_model_dir.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / f"pwned-{model_type}"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (evil / "configuration_evil.py").write_text(payload + "from transformers import BertConfig as EvilConfig\n")
    (evil / "modeling_evil.py").write_text(payload + "from transformers import BertForSequenceClassification as M\n")
    config = json.loads((evil / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForSequenceClassification": "modeling_evil.M",
    }
    (evil / "config.json").write_text(json.dumps(config))
    return evil, marker


def test_remote_code_of_an_unknown_architecture_is_refused_without_the_flag(tiny_model_dir, tiny_csv, cli, tmp_path):
    evil, marker = evil_model(tiny_model_dir, tmp_path, "evil-bert")
    code, _, err = cli(
        "train", "--model", evil, "--data", tiny_csv, "--out", tmp_path / "run", "--epochs", "1", "--max-length", "32"
    )
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "trust_remote_code" in err or "trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_remote_code_beside_a_known_architecture_is_ignored(tiny_model_dir, tiny_csv, cli, tmp_path):
    evil, marker = evil_model(tiny_model_dir, tmp_path, "bert")
    code, _, err = cli(
        "train", "--model", evil, "--data", tiny_csv, "--out", tmp_path / "run", "--epochs", "1", "--max-length", "32"
    )
    assert code == 0, err  # transformers' own BERT class is used
    assert not marker.exists()
