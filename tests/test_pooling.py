"""The classifier's pooling: read from a sentence-transformers checkpoint, applied by a hook that leaves the head's
own code in charge, recorded in runs, adapters, PEFT exports and merged models, and read back by each."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
)

import peftlab
from peftlab.bench.assets import tiny_llama_config
from peftlab.core.pooling import (
    checkpoint_pooling,
    install_pooling,
    pool,
    pooling_of,
    resolve_pooling,
    write_pooling_files,
)
from peftlab.models import load_classifier

from .conftest import tiny_classifier

IDS = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 9, 10, 11, 12, 13]])
MASK = (IDS != 0).long()
FAST = ["--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--max-length", "32", "--r", "4"]


def classifiers():
    small = dict(vocab_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    return {
        "bert": tiny_classifier(vocab_size=32),
        "mpnet": MPNetForSequenceClassification(MPNetConfig(hidden_size=32, **small)).eval(),
        "distilbert": DistilBertForSequenceClassification(
            DistilBertConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2, hidden_dim=37)
        ).eval(),
        "llama": LlamaForSequenceClassification(tiny_llama_config(32)).eval(),
    }


def head_on(model, pooled: torch.Tensor) -> torch.Tensor:
    """What each architecture's own head computes from one vector per text (eval mode: dropout off)."""
    if isinstance(model, MPNetForSequenceClassification):
        return model.classifier(pooled.unsqueeze(1))
    if isinstance(model, DistilBertForSequenceClassification):
        return model.classifier(torch.relu(model.pre_classifier(pooled)))
    if isinstance(model, LlamaForSequenceClassification):
        return model.score(pooled)
    return model.classifier(pooled)


@pytest.mark.parametrize("arch", ["bert", "mpnet", "distilbert", "llama"])
@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_the_head_reads_the_pooled_token_states(arch, mode):
    model = classifiers()[arch]
    with torch.no_grad():
        states = model.base_model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        handle = install_pooling(model, mode)
        got = model(input_ids=IDS, attention_mask=MASK).logits
        torch.testing.assert_close(got, head_on(model, pool(states, MASK, mode)), rtol=0, atol=1e-5)
        # padding does not change a text's reading
        longer = torch.cat([IDS[:1], torch.zeros(1, 3, dtype=torch.long)], dim=1)
        padded = model(input_ids=longer, attention_mask=(longer != 0).long()).logits
        torch.testing.assert_close(padded[0], got[0], rtol=0, atol=1e-5)
    assert pooling_of(model) == mode
    handle.remove()


def test_mean_and_max_pool_over_the_mask_only():
    states = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(states, mask, "mean").tolist() == [[2.0, -1.0]]
    assert pool(states, mask, "max").tolist() == [[3.0, 2.0]]
    assert pool(states, mask, "cls").tolist() == [[1.0, 2.0]]
    torch.testing.assert_close(pool(states, None, "mean"), torch.tensor([[104 / 3, 98 / 3]]))


def test_the_model_readout_changes_nothing():
    model = tiny_classifier(vocab_size=32)
    with torch.no_grad():
        before = model(input_ids=IDS, attention_mask=MASK).logits
        assert install_pooling(model, "model") is None
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["mean", "max", "cls"])
def test_sentence_transformers_files_round_trip(tmp_path, mode):
    write_pooling_files(tmp_path, mode, 32)
    assert checkpoint_pooling(tmp_path) == mode
    assert resolve_pooling("auto", tmp_path) == mode
    assert resolve_pooling("model", tmp_path) == "model"


def test_checkpoints_without_a_single_known_pooling_read_their_own_position(tmp_path):
    assert checkpoint_pooling(tmp_path) is None and resolve_pooling("auto", tmp_path) == "model"
    write_pooling_files(tmp_path, "mean", 32)
    config = tmp_path / "1_Pooling" / "config.json"
    both = json.loads(config.read_text()) | {"pooling_mode_max_tokens": True}
    config.write_text(json.dumps(both))
    assert checkpoint_pooling(tmp_path) is None
    (tmp_path / "modules.json").write_text("not json")
    assert checkpoint_pooling(tmp_path) is None


@pytest.fixture(scope="module")
def mean_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny BERT folder with sentence-transformers files saying it is read by its mean."""
    folder = tmp_path_factory.mktemp("tiny-st") / "model"
    shutil.copytree(tiny_model_dir, folder)
    write_pooling_files(folder, "mean", 32)
    return folder


@pytest.fixture(scope="module")
def mean_run(mean_model_dir, tiny_csv, tmp_path_factory):
    from .conftest import train_tiny_run

    return train_tiny_run(mean_model_dir, tiny_csv, tmp_path_factory.mktemp("runs") / "mean", *FAST)


def test_a_run_takes_the_checkpoints_pooling_and_records_it(mean_run, cli):
    results = json.loads((mean_run / "results.json").read_text())
    assert results["pooling"] == "mean"
    assert json.loads((mean_run / "config.json").read_text())["pooling"] == "mean"
    assert json.loads((mean_run / "adapter" / "adapter.json").read_text())["task"]["pooling"] == "mean"
    code, out, _ = cli("eval", mean_run, "--json")
    assert code == 0 and json.loads(out)["test"] == pytest.approx(results["metrics"]["test"])


def test_a_saved_adapter_brings_its_pooling_to_a_plain_classifier(mean_run, mean_model_dir):
    from peftlab.run import rebuild

    _, _, _, prepared, trained = rebuild(mean_run)
    inputs = prepared.splits["test"].batch(range(8))
    inputs.pop("labels")
    loaded = peftlab.load_adapter(load_classifier(mean_model_dir, ["neg", "pos"]), mean_run / "adapter")
    assert pooling_of(loaded.model) == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(**inputs).logits, trained.model.eval()(**inputs).logits)
    other = load_classifier(mean_model_dir, ["neg", "pos"])
    install_pooling(other, "max")
    with pytest.raises(peftlab.errors.InputError, match="trained on 'mean' pooling"):
        peftlab.load_adapter(other, mean_run / "adapter")


def test_export_notes_the_pooling_and_import_applies_it(mean_run, mean_model_dir, cli, tmp_path):
    from peftlab.run import rebuild

    code, out, _ = cli("export", mean_run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0 and "mean-pooled" in out
    assert json.loads((tmp_path / "hf" / "peftlab.json").read_text())["pooling"] == "mean"
    _, _, _, prepared, trained = rebuild(mean_run)
    inputs = prepared.splits["test"].batch(range(8))
    inputs.pop("labels")
    with torch.no_grad():
        expected = trained.model.eval()(**inputs).logits
        # PEFT's own model gives the same outputs once it reads the same pooling
        theirs = load_classifier(mean_model_dir, ["neg", "pos"])
        install_pooling(theirs, "mean")
        theirs = PeftModel.from_pretrained(theirs, tmp_path / "hf").eval()
        torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=0, atol=1e-6)
    code, _, _ = cli("import", tmp_path / "hf", "--out", tmp_path / "back", "--labels", "neg,pos")
    assert code == 0
    assert json.loads((tmp_path / "back" / "adapter.json").read_text())["task"]["pooling"] == "mean"
    back = peftlab.load_adapter(load_classifier(mean_model_dir, ["neg", "pos"]), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_a_merged_model_says_how_it_is_read(mean_run, cli, tmp_path):
    from peftlab.run import rebuild

    code, out, _ = cli("merge", mean_run, "--out", tmp_path / "merged")
    assert code == 0 and "mean-pooled" in out
    assert checkpoint_pooling(tmp_path / "merged") == "mean"
    _, _, _, prepared, trained = rebuild(mean_run)
    inputs = prepared.splits["test"].batch(range(8))
    inputs.pop("labels")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    install_pooling(merged, resolve_pooling("auto", tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, trained.model.eval()(**inputs).logits, atol=1e-5, rtol=0)


def test_runs_saved_before_pooling_was_recorded_read_the_models_own_position(mean_run, tmp_path):
    from peftlab.run import rebuild

    old = tmp_path / "old"
    shutil.copytree(mean_run, old)
    config = json.loads((old / "config.json").read_text())
    del config["pooling"]
    (old / "config.json").write_text(json.dumps(config))
    adapter = json.loads((old / "adapter" / "adapter.json").read_text())
    del adapter["task"]["pooling"]
    (old / "adapter" / "adapter.json").write_text(json.dumps(adapter))
    _, options, _, prepared, attachment = rebuild(old)
    assert options.pooling == "model" and prepared.pooling == "model" and pooling_of(attachment.model) == "model"


def test_continued_training_keeps_the_adapters_pooling(mean_run, tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, err = cli(
        "train", "--model", tiny_model_dir, "--data", tiny_csv, "--adapter", mean_run / "adapter",
        "--out", tmp_path / "more", "--max-steps", "2", "--max-length", "32",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "more" / "results.json").read_text())["pooling"] == "mean"


@pytest.mark.parametrize("flags", [["--pooling", "mean", "--task", "tag"], ["--pooling", "median"]])
def test_bad_pooling_is_one_error_line(flags, tiny_model_dir, tiny_csv, cli, tmp_path):
    code, _, err = cli("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "x", *flags)
    assert code == 2 and err.count("\n") == 1 and "pooling" in err, err


def test_a_composed_adapter_keeps_its_heads_pooling(mean_run, mean_model_dir, cli, tmp_path):
    from peftlab.run import rebuild

    code, _, err = cli("compose", "merge", mean_run, mean_run, "--weights", "0.5", "0.5", "--rank", "8",
                       "--out", tmp_path / "merged")  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "adapter.json").read_text())["task"]["pooling"] == "mean"
    _, _, _, prepared, trained = rebuild(mean_run)
    inputs = prepared.splits["test"].batch(range(8))
    inputs.pop("labels")
    composed = peftlab.load_adapter(load_classifier(mean_model_dir, ["neg", "pos"]), tmp_path / "merged")
    assert pooling_of(composed.model) == "mean"
    with torch.no_grad():  # half of the same adapter twice, at its own rank, is the adapter
        torch.testing.assert_close(composed.model.eval()(**inputs).logits, trained.model.eval()(**inputs).logits,
                                   atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.parametrize("method, options", [("prompt_tuning", {"num_virtual_tokens": 3}), ("p_tuning", {})])
def test_virtual_tokens_are_pooled_with_the_text(method, options):
    model = tiny_classifier(vocab_size=32)
    seen = {}  # the body's own states and the mask it was given, before the pooling hook (registered after) runs

    def capture(module, args, kwargs, output):
        seen.update(mask=kwargs["attention_mask"], states=output[0].clone())

    model.base_model.register_forward_hook(capture, with_kwargs=True)
    install_pooling(model, "mean")
    adapter = peftlab.attach(model, method, **options)
    with torch.no_grad():
        logits = adapter.model.eval()(input_ids=IDS, attention_mask=MASK).logits
        expected = model.classifier(pool(seen["states"], seen["mask"], "mean"))
    added = seen["mask"].shape[1] - MASK.shape[1]  # virtual tokens, always visible
    assert added > 0 and seen["mask"].sum() == MASK.sum() + 2 * added
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
