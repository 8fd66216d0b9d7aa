"""Data readers, column detection, labels and deterministic splits."""

import bz2
import csv
import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab.data.classification import Columns, load_classification, read_examples
from peftlab.data.readers import read_records
from peftlab.errors import InputError
from tests.conftest import sentences, write_csv

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def test_csv_tsv_json_jsonl_and_compressed_files_read_the_same(tmp_path):
    rows = [{"text": "a good film", "label": "pos"}, {"text": 'so, so "bad"', "label": "neg"}]
    write_csv(tmp_path / "d.csv", [(r["text"], r["label"]) for r in rows])
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d2.json").write_text(json.dumps({"data": rows}))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv.bz2").write_bytes(bz2.compress((tmp_path / "d.csv").read_bytes()))
    for name in ["d.csv", "d.tsv", "d.jsonl", "d.json", "d2.json", "d.jsonl.gz", "d.csv.bz2"]:
        assert [r for _, r in read_records(tmp_path / name)] == rows, name


def test_records_carry_their_location(tmp_path):
    write_csv(tmp_path / "d.csv", [("a", "x"), ("b", "y")])
    assert [w for w, _ in read_records(tmp_path / "d.csv")] == [f"{tmp_path / 'd.csv'}:2", f"{tmp_path / 'd.csv'}:3"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "data file not found"),
        ("empty.csv", b"", "data file is empty"),
        ("blank.jsonl", b"\n  \n", "data file is empty"),
        ("binary.csv", b"text,label\n\x00\x01\x02", "looks binary"),
        ("latin.csv", "text,label\ncaf\xe9,x\n".encode("latin-1"), r"latin.csv:2: not UTF-8"),
        ("bad.jsonl", b'{"text": "a", "label": 1}\n{"text": "b" "label": 2}\n', r"bad.jsonl:2: malformed JSON line"),
        ("list.jsonl", b"[1, 2]\n", r"list.jsonl:1: expected a JSON object"),
        ("bad.json", b'[{"text": "a"},', r"bad.json:1: malformed JSON"),
        ("scalar.json", b'"text"', r"expected a JSON list of objects"),
        ("ragged.csv", b"text,label\na,b\nc,d,e\n", r"ragged.csv:3: row has 3 fields, the header has 2"),
        ("data.xlsx", b"PK", "unknown data format '.xlsx'"),
        ("header.csv", b"text,text\na,b\n", "duplicate column name 'text'"),
    ],
)
def test_bad_files_give_one_line_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        read_records(path)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_columns_are_found_by_usual_names_or_flags(tmp_path):
    write_csv(tmp_path / "d.csv", sentences(20), header=("sentence", "category"))
    data = load_classification(str(tmp_path / "d.csv"))
    assert data.labels == ["neg", "pos"] and sum(data.sizes().values()) == 20
    write_csv(tmp_path / "e.csv", sentences(20), header=("review_body", "stars"))
    with pytest.raises(InputError, match="no text column .*columns found: review_body, stars.*--text-column"):
        load_classification(str(tmp_path / "e.csv"))
    data = load_classification(str(tmp_path / "e.csv"), Columns(text="review_body", label="stars"))
    assert data.labels == ["neg", "pos"]
    with pytest.raises(InputError, match="no label column 'rating'; columns found: review_body, stars"):
        load_classification(str(tmp_path / "e.csv"), Columns(text="review_body", label="rating"))


def test_sentence_pairs(tmp_path):
    rows = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "label": i % 3} for i in range(30)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_classification(str(tmp_path / "p.jsonl"), Columns(pair="sentence2"))
    example = data.splits["train"][0]
    assert example.pair is not None and example.pair.startswith("b")
    assert data.labels == ["0", "1", "2"]


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": f"t{i}", "label": [2, 10, 1][i % 3]} for i in range(30)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_classification(str(tmp_path / "d.json")).labels == ["1", "2", "10"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "", "label": "a"}, "column 'text' is empty"),
        ({"text": 42, "label": "a"}, "column 'text' holds a number"),
        ({"text": None, "label": "a"}, "column 'text' is missing"),
        ({"text": "ok", "label": None}, "label column 'label' holds None"),
        ({"text": "ok", "label": 1.5}, "label 1.5 in column 'label' is not a class"),
        ({"text": "ok"}, "label column 'label' holds None"),
    ],
)
def test_bad_values_name_the_item(tmp_path, row, message):
    rows = [{"text": "fine", "label": "a"}, {"text": "also", "label": "b"}, row]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=message) as e:
        load_classification(str(tmp_path / "d.jsonl"))
    assert "d.jsonl:3" in str(e.value)


def test_splits_are_deterministic_disjoint_and_sized(tiny_csv):
    a = load_classification(str(tiny_csv), split_seed=0)
    b = load_classification(str(tiny_csv), split_seed=0)
    c = load_classification(str(tiny_csv), split_seed=1)
    assert a.splits == b.splits and a.splits != c.splits
    assert a.sizes() == {"train": 192, "validation": 24, "test": 24}
    texts = [{e.text for e in a.splits[s]} for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_train_limit_takes_a_prefix_of_the_shuffled_split(tiny_csv):
    full = load_classification(str(tiny_csv))
    limited = load_classification(str(tiny_csv), train_limit=10)
    assert limited.splits["train"] == full.splits["train"][:10]
    assert limited.splits["test"] == full.splits["test"]


def test_folder_with_split_files(tmp_path):
    write_csv(tmp_path / "train.csv", sentences(100))
    write_csv(tmp_path / "dev.csv", sentences(10, seed=1))
    data = load_classification(str(tmp_path))
    assert data.sizes() == {"train": 90, "validation": 10, "test": 10}
    assert any("validation file serves as test" in n for n in data.notes)
    write_csv(tmp_path / "test.csv", sentences(12, seed=2))
    assert load_classification(str(tmp_path)).sizes() == {"train": 100, "validation": 10, "test": 12}


def test_folder_without_a_train_file(tmp_path):
    write_csv(tmp_path / "other.csv", sentences(10))
    with pytest.raises(InputError, match="no train file"):
        load_classification(str(tmp_path))


def test_labels_unseen_in_training_are_an_error(tmp_path):
    write_csv(tmp_path / "train.csv", sentences(40))
    write_csv(tmp_path / "test.csv", [("a film", "pos"), ("the plot", "meh")])
    with pytest.raises(InputError, match=r"test.csv:3: label 'meh' never occurs in the training split"):
        load_classification(str(tmp_path))


def test_a_single_class_training_set_is_an_error(tmp_path):
    write_csv(tmp_path / "one.csv", [(f"text {i}", "pos") for i in range(20)])
    with pytest.raises(InputError, match="one class only \\('pos'\\)"):
        load_classification(str(tmp_path / "one.csv"))


def test_unknown_source_is_an_error():
    with pytest.raises(InputError, match="neither a packaged dataset .*rotten_tomatoes.* nor an existing file"):
        load_classification("imdb")


def test_read_examples_checks_labels(tmp_path):
    write_csv(tmp_path / "x.csv", [("good", "pos"), ("odd", "zzz")])
    with pytest.raises(InputError, match="x.csv:3: label 'zzz' is not one the run was trained on"):
        read_examples(tmp_path / "x.csv", ["neg", "pos"])


@pytest.mark.skipif(not SST2.exists(), reason="../shared/data/sst2 is not on this machine")
def test_sst2_folder_loads_with_its_own_validation_as_test():
    data = load_classification(str(SST2))
    assert data.labels == ["0", "1"]
    assert data.sizes()["test"] == 872
    assert data.sizes()["train"] + data.sizes()["validation"] == 67349


@pytest.mark.real
def test_rotten_tomatoes_is_deduplicated_and_binary():
    data = load_classification("rotten_tomatoes")
    assert data.labels == ["rotten", "fresh"]
    assert sum(data.sizes().values()) == 12752
    texts = [e.text for s in data.splits.values() for e in s]
    assert len(texts) == len(set(texts))


text_strategy = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"), min_size=1, max_size=40
).filter(lambda s: s.strip() != "")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(text_strategy, st.sampled_from(["a", "b", "c"])), min_size=1, max_size=15))
def test_csv_and_jsonl_round_trip_any_text(tmp_path, rows):
    with open(tmp_path / "r.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    (tmp_path / "r.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows), encoding="utf-8"
    )
    # csv normalises line endings inside quoted fields only as written; compare on the values
    assert [(r["text"], r["label"]) for _, r in read_records(tmp_path / "r.jsonl")] == rows
    got = [(r["text"], r["label"]) for _, r in read_records(tmp_path / "r.csv")]
    assert got == rows
