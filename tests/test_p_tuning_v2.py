"""P-tuning v2 through the command line on tiny models: sentence classification and sequence labelling (deep
prompts in every layer, a linear head on [CLS] or on every token), evaluation, and export to Hugging Face PEFT."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from peftlab.models import load_classifier, load_tagger
from peftlab.run import rebuild
from tests.conftest import skip_if_peft_prefix_tuning_fails_on_bert
from tests.test_tagging import toy_sentences, write_conll

FAST = ["--method", "p_tuning_v2", "--num-virtual-tokens", "4", "--epochs", "3", "--batch-size", "16",
        "--max-length", "32"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_csv, tmp_path_factory):
    from peftlab.cli import main

    root = tmp_path_factory.mktemp("p-tuning-v2")
    conll = write_conll(root / "toy.conll", toy_sentences(200))
    out = {}
    for task, data in (("classify", tiny_csv), ("tag", conll)):
        out[task] = root / task
        args = ["--no-progress", "train", "--task", task, "--model", tiny_model_dir, "--data", data, "--out", out[task]]
        assert main([*map(str, args), *FAST]) == 0
    return out


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_trains_saves_deep_prompts_and_evaluates(runs, cli, task):
    run = runs[task]
    results = json.loads((run / "results.json").read_text())
    losses = [h["validation"]["loss"] for h in results["history"]]
    assert losses[-1] < losses[0]
    saved = load_file(run / "adapter" / "adapter.safetensors")
    prefixes = {k for k in saved if ".attention.self.prefix_" in k}
    assert len(prefixes) == 4 and all(saved[k].shape == (4, 4, 8) for k in prefixes)  # 2 layers x keys, values
    assert results["params"]["trainable"] == results["params"]["changed"] == sum(v.numel() for v in saved.values())
    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    metric = "accuracy" if task == "classify" else "f1"
    assert json.loads(out)["test"][metric] == pytest.approx(results["metrics"]["test"][metric])


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_exports_to_peft_with_the_same_outputs(runs, cli, tmp_path, tiny_model_dir, task):
    run = runs[task]
    assert cli("export", run, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    _, _, _, prepared, adapter = rebuild(run)
    batch = prepared.splits["test"].batch(range(4))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    load = load_classifier if task == "classify" else load_tagger
    theirs = PeftModel.from_pretrained(load(tiny_model_dir, prepared.labels), tmp_path / "hf").eval()
    with torch.no_grad():
        expected = adapter.model.eval()(**inputs).logits
        with skip_if_peft_prefix_tuning_fails_on_bert():
            got = theirs(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if task == "tag":
        assert expected.shape[:2] == inputs["input_ids"].shape  # a tag for every token
