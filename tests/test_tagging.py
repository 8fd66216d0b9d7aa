"""Sequence labelling: conlleval-style entity scoring, sub-word alignment, readers, and a run end to end."""

import json
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForTokenClassification, AutoTokenizer

import peftlab
from peftlab.data.tagging import Sentence, encode_tagging, entities, entity_scores, load_tagging
from peftlab.errors import InputError
from peftlab.models import load_tagger
from tests.conftest import FILLER, NEGATIVE, POSITIVE


def test_entities_are_read_as_conlleval_reads_them():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "B-PER", "I-LOC", "O"]
    assert entities(tags) == {("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6), ("PER", 6, 7), ("LOC", 7, 8)}


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-ORG"]]
    s = entity_scores(gold, pred)
    # gold entities: PER(0,2), LOC(3,4), ORG(1,2); predicted: PER(0,2), ORG(0,1), ORG(1,2); 2 correct
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["accuracy"] == pytest.approx(4 / 6) and s["entities"] == 3


def test_only_the_first_subword_of_a_word_carries_its_tag(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = encode_tagging([Sentence(["the", "great", "film"], [0, 1, 0])], tok, max_length=32)
    assert enc.labels[0] == [-100, 0, 1, 0, -100]  # [CLS] the great film [SEP]
    assert enc.first_subword[0] == [1, 2, 3]
    cut = encode_tagging([Sentence(["the"] * 40, [0] * 40)], tok, max_length=10)
    assert cut.truncated == 1 and len(cut.first_subword[0]) == 8 and len(cut.words[0]) == 40


def toy_sentences(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE, 1) + rng.sample(NEGATIVE, 1)
        rng.shuffle(words)
        tags = ["B-GOOD" if w in POSITIVE else "B-BAD" if w in NEGATIVE else "O" for w in words]
        out.append((words, tags))
    return out


def write_conll(path, sentences):
    path.write_text(
        "\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(ws, ts, strict=True)) for ws, ts in sentences) + "\n"
    )
    return path


def test_readers_and_their_errors(tmp_path):
    write_conll(tmp_path / "a.conll", toy_sentences(30))
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in toy_sentences(30))
    )
    for name in ("a.conll", "b.jsonl"):
        data = load_tagging(str(tmp_path / name))
        assert data.labels == ["O", "B-BAD", "B-GOOD"] and sum(data.sizes().values()) == 30
    (tmp_path / "bad.conll").write_text("the\tO\nfilm\n")
    with pytest.raises(InputError, match=r"bad.conll:2: expected 'word<TAB>tag'"):
        load_tagging(str(tmp_path / "bad.conll"))
    (tmp_path / "tags.conll").write_text("the\tPERSON\n")
    with pytest.raises(InputError, match="tag 'PERSON' is not BIO"):
        load_tagging(str(tmp_path / "tags.conll"))
    (tmp_path / "len.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(InputError, match=r"len.jsonl:1: 'tokens' and 'tags' must be non-empty and of equal length"):
        load_tagging(str(tmp_path / "len.jsonl"))


@pytest.fixture(scope="module")
def tag_run(tiny_model_dir, tmp_path_factory):
    from peftlab.cli import main

    root = tmp_path_factory.mktemp("tag")
    data = write_conll(root / "toy.conll", toy_sentences(200))
    out = root / "run"
    assert (
        main(
            [
                "--no-progress",
                "train",
                "--task",
                "tag",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--epochs",
                "4",
                "--batch-size",
                "16",
                "--lr",
                "0.01",
                "--max-length",
                "32",
            ]
        )
        == 0
    )
    return out


def test_tagging_learns_the_toy_entities(tag_run):
    results = json.loads((tag_run / "results.json").read_text())
    assert results["metrics"]["test"]["f1"] >= 0.9
    assert json.loads((tag_run / "adapter" / "adapter.json").read_text())["task"]["type"] == "tagging"


def test_tagging_eval_merge_and_export(tag_run, cli, tmp_path, tiny_model_dir):
    code, out, err = cli("eval", tag_run, "--json")
    assert code == 0, err
    results = json.loads((tag_run / "results.json").read_text())
    assert json.loads(out)["test"]["f1"] == pytest.approx(results["metrics"]["test"]["f1"])
    from peftlab.run import rebuild

    _, _, _, prepared, adapter = rebuild(tag_run)
    batch = prepared.splits["test"].batch(range(4))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = adapter.model.eval()(**inputs).logits
    assert cli("merge", tag_run, "--out", tmp_path / "merged")[0] == 0
    plain = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged").eval()
    assert cli("export", tag_run, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    theirs = PeftModel.from_pretrained(load_tagger(tiny_model_dir, prepared.labels), tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    labels = ",".join(prepared.labels)
    code, _, err = cli("import", tmp_path / "hf", "--out", tmp_path / "back", "--labels", labels)
    assert code == 0, err
    assert json.loads((tmp_path / "back" / "adapter.json").read_text())["task"] == {
        "type": "tagging",
        "labels": prepared.labels,
    }
    back = peftlab.load_adapter(load_tagger(tiny_model_dir, prepared.labels), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.real
def test_wnut16_loads():
    data = load_tagging("wnut16")
    assert sum(data.sizes().values()) == 2394
    assert len([t for t in data.labels if t.startswith("B-")]) == 10
