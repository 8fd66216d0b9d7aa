"""The user's world: models by Hub ID, data in the ecosystem's formats and by Hub ID, and a process left untouched.

Hub IDs are tested offline for real: a Hugging Face cache is built in the hub's own layout (``tests/hub_cache.py``)
and peftlab runs in its own process with ``HF_HOME`` pointing at it and ``HF_HUB_OFFLINE=1``, through the real
``huggingface_hub`` and ``datasets`` code. Tests marked ``real`` do it with the packaged MiniLM and SmolLM2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from peftlab.core.hub import looks_like_hub_id
from peftlab.data.classification import load_classification
from peftlab.data.sft import load_sft
from peftlab.data.tables import HubData
from peftlab.data.tagging import load_tagging
from peftlab.errors import InputError
from peftlab.models import find_model

from .conftest import sentences
from .hub_cache import COMMIT, folder_files, offline_env, peftlab, put_repo
from .test_security import evil_model

REVIEW_FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})


def reviews(n: int, seed: int = 0) -> Dataset:
    rows = sentences(n, seed)
    return Dataset.from_dict(
        {"text": [t for t, _ in rows], "label": [int(label == "pos") for _, label in rows]}, features=REVIEW_FEATURES
    )


def short_training(*extra) -> list[str]:
    return ["--max-steps", "6", "--batch-size", "16", "--max-length", "32", "--eval-batch-size", "64", *extra]


# --- models by Hub ID --------------------------------------------------------------------------------------------


def test_a_model_by_hub_id_trains_offline_and_its_run_works_from_any_folder(tiny_model_dir, tiny_csv, tmp_path):
    home = tmp_path / "hf"
    put_repo(home / "hub", "tiny-org/tiny-bert", folder_files(tiny_model_dir))
    env = offline_env(home)
    work = tmp_path / "work"
    work.mkdir()
    (work / "reviews.csv").write_bytes(tiny_csv.read_bytes())
    code, _, err = peftlab(
        "train",
        "--model",
        "tiny-org/tiny-bert",
        "--data",
        "reviews.csv",
        "--out",
        "run",
        *short_training(),
        env=env,
        cwd=work,
    )
    assert code == 0, err
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["model"] == "tiny-org/tiny-bert" and config["revision"] == COMMIT
    assert config["data"] == str(work / "reviews.csv")  # absolute: the run means the same from anywhere
    assert "trust_remote_code" not in config and "allow_pickle" not in config

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out, err = peftlab("eval", work / "run", "--json", env=env, cwd=elsewhere)
    assert code == 0, err
    assert 0.0 <= json.loads(out)["test"]["accuracy"] <= 1.0
    code, _, err = peftlab("export", work / "run", "--format", "hf", "--out", tmp_path / "hf-adapter", env=env)
    assert code == 0, err
    exported = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == "tiny-org/tiny-bert"


def test_a_hub_model_neither_cached_nor_reachable_is_one_line_naming_it(cli, tiny_csv, tmp_path):
    code, _, err = cli("train", "--model", "nobody/not-here", "--data", tiny_csv, "--out", tmp_path / "run")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "'nobody/not-here'" in err and "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "run").exists()


def test_names_that_are_hub_ids_and_names_that_are_not():
    assert looks_like_hub_id("bert-base-uncased") and looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct")
    for name in ("./model", "/abs/model", "a/b/c", "org/na me", "org--x/y", "~/model"):
        assert not looks_like_hub_id(name), name


def test_the_old_packaged_name_is_an_alias_and_packaged_models_know_their_hub_id():
    from peftlab.assets import ASSETS, get_asset

    assert get_asset("qwen2.5-0.5b").name == "qwen2.5-coder-0.5b"
    assert ASSETS["qwen2.5-coder-0.5b"].hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert ASSETS["minilm"].hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(InputError, match="a revision applies to Hub models only"):
        find_model("minilm", revision="main")


def pickle_only_model(tiny_model_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_unless_the_command_line_allows_them(tiny_model_dir, tiny_csv, cli, tmp_path):
    folder = pickle_only_model(tiny_model_dir, tmp_path / "pickled")
    code, _, err = cli("train", "--model", folder, "--data", tiny_csv, "--out", tmp_path / "run", *short_training())
    assert code == 2 and err.count("\n") == 1, err
    assert "only pickle weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert not (tmp_path / "run").exists()
    code, _, err = cli(
        "train", "--model", folder, "--data", tiny_csv, "--out", tmp_path / "run", "--allow-pickle", *short_training()
    )
    assert code == 0, err
    # the switch is not saved: evaluating the run needs it on that command line again
    code, _, err = cli("eval", tmp_path / "run")
    assert code == 2 and "--allow-pickle" in err, err
    assert cli("eval", tmp_path / "run", "--allow-pickle")[0] == 0


def test_a_hub_repository_with_only_pickle_weights_is_refused(tiny_model_dir, tiny_csv, tmp_path):
    home = tmp_path / "hf"
    put_repo(home / "hub", "old-org/pickled", folder_files(pickle_only_model(tiny_model_dir, tmp_path / "p")))
    code, _, err = peftlab(
        "train", "--model", "old-org/pickled", "--data", tiny_csv, "--out", tmp_path / "run", env=offline_env(home)
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "model 'old-org/pickled': offers only pickle weights" in err


def test_remote_code_never_runs_because_a_run_folder_says_so(tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, err = cli(
        "train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run", *short_training()
    )
    assert code == 0, err
    evil, marker = evil_model(tiny_model_dir, tmp_path, "evil-bert")
    config_file = tmp_path / "run" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"model": str(evil), "trust_remote_code": True}))
    for command in (
        ["eval"],
        ["export", "--format", "hf", "--out", tmp_path / "x"],
        ["merge", "--out", tmp_path / "y"],
    ):
        code, _, err = cli(command[0], tmp_path / "run", *command[1:])
        assert code == 2 and "--trust-remote-code" in err, (command, err)
    assert not marker.exists()
    code, _, err = cli("train", "--resume", tmp_path / "run")
    assert code == 2 and "--trust-remote-code" in err, err
    assert not marker.exists()


# --- data in the ecosystem's formats -----------------------------------------------------------------------------


def test_parquet_and_arrow_files_read_with_their_class_names(tmp_path):
    data = reviews(200)
    data.to_parquet(str(tmp_path / "reviews.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "reviews.parquet", arrow):
        loaded = load_classification(str(source))
        assert loaded.labels == ["neg", "pos"], source
        assert loaded.sizes() == {"train": 160, "validation": 20, "test": 20}
    # the class ids follow the order the dataset declares, not the alphabet
    rows = sentences(40)
    backwards = Features({"text": Value("string"), "label": ClassLabel(names=["pos", "neg"])})
    Dataset.from_dict(
        {"text": [t for t, _ in rows], "label": [int(y == "neg") for _, y in rows]}, features=backwards
    ).to_parquet(str(tmp_path / "backwards.parquet"))
    loaded = load_classification(str(tmp_path / "backwards.parquet"))
    assert loaded.labels == ["pos", "neg"]
    assert all(loaded.labels[e.label] == dict(rows)[e.text] for split in loaded.splits.values() for e in split)
    # the same rows as the CSV the data came from
    texts = sorted(
        e.text for split in load_classification(str(tmp_path / "reviews.parquet")).splits.values() for e in split
    )
    assert texts == sorted(t for t, _ in sentences(200))


def test_save_to_disk_folders_and_their_splits(tmp_path):
    whole = tmp_path / "whole"
    reviews(100).save_to_disk(str(whole))
    assert load_classification(str(whole)).sizes() == {"train": 80, "validation": 10, "test": 10}
    split = tmp_path / "split"
    DatasetDict({"train": reviews(60, 1), "dev": reviews(12, 2), "test": reviews(14, 3)}).save_to_disk(str(split))
    loaded = load_classification(str(split))
    assert loaded.sizes() == {"train": 60, "validation": 12, "test": 14}
    chosen = load_classification(str(split), hub=HubData(splits={"test": "dev", "validation": "test"}))
    assert chosen.sizes() == {"train": 60, "validation": 14, "test": 12}
    with pytest.raises(InputError, match=r"no split 'holdout' \(--test-split\); splits: train, dev, test"):
        load_classification(str(split), hub=HubData(splits={"test": "holdout"}))


def test_tagging_and_sft_records_from_parquet(tmp_path):
    tags = ClassLabel(names=["O", "B-LOC", "I-LOC"])
    tagged = Dataset.from_dict(
        {"tokens": [["in", "new", "york"], ["hello", "paris"]] * 20, "ner_tags": [[0, 1, 2], [0, 1]] * 20},
        features=Features({"tokens": List(Value("string")), "ner_tags": List(tags)}),
    )
    tagged.to_parquet(str(tmp_path / "ner.parquet"))
    data = load_tagging(str(tmp_path / "ner.parquet"))
    assert data.labels == ["O", "B-LOC", "I-LOC"] and sum(data.sizes().values()) == 40
    alpaca = Dataset.from_dict(
        {"instruction": ["Say hi", "Add one"] * 10, "input": ["", "2"] * 10, "output": ["hi", "3"] * 10}
    )
    alpaca.to_parquet(str(tmp_path / "alpaca.parquet"))
    conversations = load_sft(str(tmp_path / "alpaca.parquet")).splits["train"]
    assert {c.messages[0]["content"] for c in conversations} == {"Say hi", "Add one\n\n2"}


def test_bad_tables_name_the_file_and_what_was_expected(tmp_path):
    Dataset.from_dict({"body": ["a", "b"], "label": [0, 1]}).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(InputError, match=r"x.parquet: no text column .* columns found: body, label"):
        load_classification(str(tmp_path / "x.parquet"))
    Dataset.from_dict({"text": ["a", None], "label": [0, 1]}).to_parquet(str(tmp_path / "y.parquet"))
    with pytest.raises(InputError, match=r"y.parquet row 1: column 'text' is missing; expected text"):
        load_classification(str(tmp_path / "y.parquet"))
    (tmp_path / "z.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match=r"z.parquet: cannot read the Parquet file"):
        load_classification(str(tmp_path / "z.parquet"))
    with pytest.raises(InputError, match=r"neither a packaged dataset .*\(did you mean 'rotten_tomatoes'"):
        load_classification("roten_tomatoes")


README_WITH_CONFIGS = """---
configs:
- config_name: small
  data_files:
  - split: train
    path: small/train.parquet
  - split: test
    path: small/test.parquet
- config_name: large
  data_files:
  - split: train
    path: large/train.parquet
---
# reviews
"""


def test_a_hub_dataset_trains_offline_with_its_configuration_and_splits(tiny_model_dir, tmp_path):
    home = tmp_path / "hf"
    put_repo(home / "hub", "tiny-org/tiny-bert", folder_files(tiny_model_dir))
    files = tmp_path / "files"
    (files / "small").mkdir(parents=True)
    (files / "large").mkdir()
    reviews(160, 1).to_parquet(str(files / "small" / "train.parquet"))
    reviews(30, 2).to_parquet(str(files / "small" / "test.parquet"))
    reviews(300, 3).to_parquet(str(files / "large" / "train.parquet"))
    repo = {
        "README.md": README_WITH_CONFIGS.encode(),
        "small/train.parquet": files / "small" / "train.parquet",
        "small/test.parquet": files / "small" / "test.parquet",
        "large/train.parquet": files / "large" / "train.parquet",
    }
    put_repo(home / "hub", "someone/reviews", repo, kind="dataset")
    env = offline_env(home)
    run = tmp_path / "run"
    args = ["train", "--model", "tiny-org/tiny-bert", "--data", "someone/reviews", "--data-config", "small"]
    code, _, err = peftlab(*args, "--train-split", "train[:100]", "--out", run, *short_training(), env=env)
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["data_sizes"] == {"train": 90, "validation": 10, "test": 30}
    assert results["labels"] == ["neg", "pos"]
    code, _, err = peftlab("eval", run, env=env, cwd=tmp_path / "files")  # the split is rebuilt from the config
    assert code == 0, err
    code, _, err = peftlab(*args[:-2], "--out", tmp_path / "r2", "--max-length", "32", env=env)
    assert code == 2 and err.count("\n") == 1 and "--data-config" in err, err
    code, _, err = peftlab(
        "train", "--model", "tiny-org/tiny-bert", "--data", "someone/absent", "--max-length", "32", env=env
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "as a Hub dataset: dataset 'someone/absent' is not in the Hugging Face cache" in err


# --- the user's process ------------------------------------------------------------------------------------------

IMPORT_EVERYTHING = """
import importlib, json, logging, os, pkgutil, warnings
import torch, transformers, huggingface_hub, datasets
from transformers.utils import logging as hf_logging

def state():
    return {
        "environ": dict(os.environ),
        "transformers verbosity": hf_logging.get_verbosity(),
        "transformers progress bars": hf_logging.is_progress_bar_enabled(),
        "hub progress bars": not huggingface_hub.utils.are_progress_bars_disabled(),
        "datasets progress bars": datasets.is_progress_bar_enabled(),
        "root logging level": logging.getLogger().level,
        "warning filters": len(warnings.filters),
        "torch threads": torch.get_num_threads(),
        "torch dtype": str(torch.get_default_dtype()),
        "torch deterministic": torch.are_deterministic_algorithms_enabled(),
        "hub offline": huggingface_hub.constants.HF_HUB_OFFLINE,
    }

before = state()
import peftlab
for module in pkgutil.walk_packages(peftlab.__path__, "peftlab."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
after = state()
print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}, default=str))
"""


def test_importing_every_module_leaves_the_process_as_it_was():
    env = {k: v for k, v in offline_env(Path("/nonexistent")).items() if k not in ("HF_HUB_OFFLINE", "HF_HOME")}
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


# --- real models through the hub cache ---------------------------------------------------------------------------


@pytest.mark.real
def test_minilm_by_its_hub_id_on_a_hub_dataset_offline(tmp_path):
    from peftlab.assets import locate

    home = tmp_path / "hf"
    minilm = {k: v for k, v in folder_files(locate("minilm")).items() if k != "asset.json"}
    put_repo(home / "hub", "sentence-transformers/all-MiniLM-L6-v2", minilm)
    rows = load_classification("rotten_tomatoes")
    split = {name: [(e.text, e.label) for e in rows.splits[name][:n]] for name, n in (("train", 400), ("test", 100))}
    features = Features({"text": Value("string"), "label": ClassLabel(names=rows.labels)})
    files = {}
    for name, pairs in split.items():
        path = tmp_path / f"{name}.parquet"
        Dataset.from_dict(
            {"text": [t for t, _ in pairs], "label": [y for _, y in pairs]}, features=features
        ).to_parquet(str(path))
        files[f"data/{name}-00000-of-00001.parquet"] = path
    put_repo(home / "hub", "someone/rt-small", files, kind="dataset")
    run = tmp_path / "run"
    code, out, err = peftlab(
        "train",
        "--model",
        "sentence-transformers/all-MiniLM-L6-v2",
        "--data",
        "someone/rt-small",
        "--out",
        run,
        "--max-steps",
        "60",
        "--batch-size",
        "16",
        "--max-length",
        "64",
        env=offline_env(home),
    )
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert results["data_sizes"] == {"train": 360, "validation": 40, "test": 100}
    assert results["labels"] == ["rotten", "fresh"]
    losses = [h["train_loss"] for h in results["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert results["metrics"]["test"]["accuracy"] > 0.6  # 60 LoRA steps on 360 reviews already beat chance


@pytest.mark.real
def test_smollm2_by_its_hub_id_tunes_on_an_instruction_dataset_offline(tmp_path):
    from peftlab.assets import locate

    home = tmp_path / "hf"
    smollm = {
        k: v
        for k, v in folder_files(locate("smollm2-135m")).items()
        if k.endswith((".json", ".safetensors", ".jinja", ".txt"))
    }
    put_repo(
        home / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", {k: v for k, v in smollm.items() if k != "asset.json"}
    )
    alpaca = Dataset.from_dict(
        {
            "instruction": [f"Repeat the word {w}." for w in ("apple", "river", "stone", "cloud")] * 10,
            "input": [""] * 40,
            "output": ["apple", "river", "stone", "cloud"] * 10,
        }
    )
    alpaca.to_parquet(str(tmp_path / "train.parquet"))
    put_repo(
        home / "hub",
        "someone/alpaca-tiny",
        {"data/train-00000-of-00001.parquet": tmp_path / "train.parquet"},
        kind="dataset",
    )
    run = tmp_path / "run"
    code, _, err = peftlab(
        "train",
        "--model",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--task",
        "sft",
        "--data",
        "someone/alpaca-tiny",
        "--out",
        run,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "64",
        "--eval-generate",
        "2",
        "--max-new-tokens",
        "4",
        "--forgetting-data",
        "none",
        env=offline_env(home),
    )
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    losses = [h["train_loss"] for h in results["history"]]
    assert len(losses) == 2 and losses[1] < losses[0]  # the second epoch fits the answers better


def test_dolly_and_prompt_completion_records_become_conversations(tmp_path):
    rows = [
        {"instruction": "Name the capital.", "context": "France", "response": "Paris"},
        {"prompt": "2 + 2 =", "completion": "4"},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        },
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 4) + "\n")
    seen = {tuple((m["role"], m["content"]) for m in c.messages) for c in load_sft(str(path)).splits["train"]}
    assert seen == {
        (("user", "Name the capital.\n\nFrance"), ("assistant", "Paris")),
        (("user", "2 + 2 ="), ("assistant", "4")),
        (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")),
    }
    path.write_text(json.dumps({"prompt": "2 + 2 =", "completion": ["4"]}) + "\n")
    with pytest.raises(InputError, match=r"mixed.jsonl:1: 'prompt' and 'completion' must both be text or both lists"):
        load_sft(str(path))


def test_the_python_export_names_the_base_the_model_was_loaded_from(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    import peftlab

    snapshot = put_repo(tmp_path / "hub", "tiny-org/tiny-bert", folder_files(tiny_model_dir))
    for folder, base in ((snapshot, "tiny-org/tiny-bert"), (tiny_model_dir, str(tiny_model_dir.resolve()))):
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2)
        out = peftlab.export_hf(peftlab.attach(model, "lora", r=2, targets=["query"]), tmp_path / f"out-{len(base)}")
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
