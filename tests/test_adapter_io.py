"""Saving and loading adapters: round trips, the base-model fingerprint, and refusing broken files."""

import json

import pytest
import torch

import peftlab
from peftlab.core.adapter_file import CONFIG_FILE, WEIGHTS_FILE
from peftlab.errors import InputError
from tests.conftest import tiny_classifier
from tests.test_lora import TOKENS, randomise_B


def trained_adapter(tmp_path, **options):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", r=4, **options)
    randomise_B(adapter)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    path = adapter.save(tmp_path / "adapter")
    return model, adapter, path


def test_save_load_round_trips_outputs_and_tensors(tmp_path):
    model, adapter, path = trained_adapter(tmp_path, targets=["query", "value"], rslora=True)
    loaded = peftlab.load_adapter(tiny_classifier(), path)
    assert torch.equal(loaded.model(TOKENS).logits, model(TOKENS).logits)
    assert loaded.targets == adapter.targets
    assert loaded.config == adapter.config
    for key, value in adapter.state().items():
        assert torch.equal(loaded.state()[key], value), key


def test_adapter_folder_holds_safetensors_and_json_only(tmp_path):
    _, adapter, path = trained_adapter(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["format"] == "peftlab-adapter" and meta["format_version"] == 1
    assert meta["method"] == "lora" and meta["config"]["r"] == 4
    assert meta["targets"] == adapter.targets and meta["trainable_modules"] == ["classifier"]
    assert meta["base"]["fingerprint"] == adapter.fingerprint
    assert meta["base"]["parameters"]["classifier.weight"] == [2, 32]


def test_saving_again_replaces_the_folder_whole(tmp_path):
    _, adapter, path = trained_adapter(tmp_path)
    (path / "stale.txt").write_text("old")
    adapter.save(path)
    assert not (path / "stale.txt").exists()
    assert not list(tmp_path.glob(".adapter*"))  # no temporary folders left behind


def test_extra_metadata_is_stored(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", r=2)
    path = adapter.save(tmp_path / "a", extra={"task": {"labels": ["neg", "pos"]}})
    assert json.loads((path / CONFIG_FILE).read_text())["task"]["labels"] == ["neg", "pos"]


@pytest.mark.parametrize(
    "other, detail",
    [
        ({"num_labels": 3}, r"parameter 'classifier.weight' is \(3, 32\) in this model but \(2, 32\)"),
        ({"vocab_size": 80}, "bert.embeddings.word_embeddings.weight"),
    ],
)
def test_loading_onto_a_different_base_says_what_differs(tmp_path, other, detail):
    _, _, path = trained_adapter(tmp_path)
    with pytest.raises(InputError, match="trained on a different base model") as e:
        peftlab.load_adapter(tiny_classifier(**other), path)
    assert e.match(detail)


def test_a_newer_format_version_is_refused(tmp_path):
    _, _, path = trained_adapter(tmp_path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["format_version"] = 99
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="format_version 99 is newer than this peftlab reads"):
        peftlab.load_adapter(tiny_classifier(), path)


def test_truncated_weights_are_refused(tmp_path):
    _, _, path = trained_adapter(tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable safetensors file"):
        peftlab.load_adapter(tiny_classifier(), path)


def test_garbage_weights_are_refused(tmp_path):
    _, _, path = trained_adapter(tmp_path)
    (path / WEIGHTS_FILE).write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        peftlab.load_adapter(tiny_classifier(), path)


def test_unknown_config_key_is_refused_with_a_suggestion(tmp_path):
    _, _, path = trained_adapter(tmp_path)
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["config"]["alpah"] = 3
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="unknown option 'alpah'.*did you mean 'alpha'"):
        peftlab.load_adapter(tiny_classifier(), path)


def test_missing_folder_and_foreign_json_are_refused(tmp_path):
    with pytest.raises(InputError, match="adapter folder not found"):
        peftlab.load_adapter(tiny_classifier(), tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / CONFIG_FILE).write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not a peftlab adapter"):
        peftlab.load_adapter(tiny_classifier(), tmp_path / "x")


def test_full_fine_tuning_saves_every_parameter(tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "full")
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(1.5)
    path = adapter.save(tmp_path / "full")
    loaded = peftlab.load_adapter(tiny_classifier(), path)
    assert torch.equal(loaded.model(TOKENS).logits, model(TOKENS).logits)
    assert len(loaded.state()) == len(list(model.parameters()))
