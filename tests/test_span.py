"""Extractive span prediction: answer-to-token mapping over stride windows, post-processing, SQuAD's EM/F1 by hand,
the WNUT-derived set, readers and their errors, every method family on a tiny BERT, a CLI run and the PEFT export."""

import json
import random
from contextlib import nullcontext

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

import peftlab
from peftlab.bench.assets import build_tiny_bert
from peftlab.core.attach import attach
from peftlab.data.spans import SpanExample, encode_spans, load_spans, read_spans
from peftlab.errors import InputError
from peftlab.evaluate.metrics import exact_match, normalise_answer, span_metrics, token_f1
from peftlab.models import load_span_model
from peftlab.train.span_task import INPUTS, SpanTask, best_span, choose_answers, span_logits
from tests.conftest import FILLER, NEGATIVE, POSITIVE

QUESTION_WORDS = ["which", "word", "?"]


@pytest.fixture(scope="module")
def span_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert-qa")
    build_tiny_bert(folder, POSITIVE + NEGATIVE + FILLER + QUESTION_WORDS)
    return folder


def toy_examples(n: int, seed: int = 0) -> list[dict]:
    """SQuAD-layout records: "which positive word ?" over a few filler words, one positive word and, half of the
    time, a negative one; asking for the negative word of a passage without one has no answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE)] + ([rng.choice(NEGATIVE)] if i % 2 else [])
        rng.shuffle(words)
        context = " ".join(words)
        kind = "positive" if i % 4 < 2 else "negative"
        target = next((w for w in words if w in (POSITIVE if kind == "positive" else NEGATIVE)), None)
        start = len(" ".join(words[: words.index(target)])) + 1 if target and words.index(target) else 0
        answers = {"text": [target], "answer_start": [start]} if target else {"text": [], "answer_start": []}
        rows.append({"id": str(i), "question": f"which {kind} word ?", "context": context, "answers": answers})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- encoding -----------------------------------------------------------------------------------------------------


def test_an_answer_maps_to_its_tokens_and_a_cut_one_to_cls(span_model_dir):
    tok = AutoTokenizer.from_pretrained(span_model_dir)
    context = " ".join(["the", "film", "was", "a", "great", "and", "moving", "story", "of", "it"])
    start = context.index("great and moving")
    example = SpanExample("which word ?", context, [("great and moving", start)])
    # [CLS] which word ? [SEP] = 5 tokens, then passage tokens and [SEP]: max_length 11 leaves 5 passage tokens
    enc = encode_spans([example], tok, max_length=11, stride=2)
    passages = [[context[o[0] : o[1]] for o in offsets if o] for offsets in enc.offsets]
    assert passages == [
        ["the", "film", "was", "a", "great"],
        ["a", "great", "and", "moving", "story"],
        ["moving", "story", "of", "it"],
    ]
    assert enc.example == [0, 0, 0] and enc.truncated == 1
    # window 0 cuts the answer after "great": [CLS]; window 1 holds it whole at tokens 6..8; window 2 lacks its start
    assert list(zip(enc.starts, enc.ends, strict=True)) == [(0, 0), (6, 8), (0, 0)]
    assert tok.convert_ids_to_tokens(enc.input_ids[1][6:9]) == ["great", "and", "moving"]
    assert enc.token_type_ids is None  # this tokenizer gives none; a BERT tokenizer's mark the passage with 1
    short = encode_spans([example], tok, max_length=32)
    assert len(short) == 1 and short.truncated == 0 and (short.starts[0], short.ends[0]) == (9, 11)
    none = encode_spans([SpanExample("which word ?", context, [])], tok, max_length=32)
    assert (none.starts, none.ends) == ([0], [0])
    with pytest.raises(InputError, match="doc_stride: 8 tokens of overlap leave no progress"):
        encode_spans([example], tok, max_length=11, stride=8)


# --- post-processing ----------------------------------------------------------------------------------------------


def test_best_span_is_valid_and_the_null_answer_wins_when_it_scores_higher():
    inside = [False, False, True, True, True, True]  # [CLS] q | four passage tokens
    start = torch.tensor([0.0, 9.0, 1.0, 5.0, 0.0, 3.0])
    end = torch.tensor([0.0, 9.0, 4.0, 0.0, 2.0, 1.0])
    # the question token 1 is best alone but outside the passage; end before start (3 -> 2: 9) is invalid
    assert best_span(start, end, inside, max_answer_tokens=30) == (7.0, 3, 4)
    assert best_span(start, end, inside, max_answer_tokens=1) == (5.0, 2, 2)  # one token: 1+4 beats 5+0, 0+2, 3+1
    assert best_span(start, end, [False] * 6, 30)[0] == float("-inf")

    from peftlab.data.spans import SpanEncoded

    examples = [SpanExample("q", "aa bb cc", [("bb", 3)]), SpanExample("q", "dd ee", [])]
    offsets = [None, None, (0, 2), (3, 5), (6, 8)]
    data = SpanEncoded(
        [[0] * 5] * 3, None, [0] * 3, [0] * 3, [0, 0, 1], [offsets, offsets, offsets[:4]], examples, 1, 0
    )
    # example 0: windows 0 and 1; the best span (score 6, "bb cc") is in window 1; the lowest null score is 5 (< 6)
    windows = {0: (4.0, 3, 3, 7.0), 1: (6.0, 3, 4, 5.0), 2: (2.0, 2, 3, 2.5)}
    assert choose_answers(windows, data) == ["bb cc", ""]  # example 1: null 2.5 beats 2.0
    windows[2] = (3.0, 2, 3, 2.5)
    assert choose_answers(windows, data)[1] == "dd ee"


# --- metrics ------------------------------------------------------------------------------------------------------


def test_exact_match_and_f1_follow_squad_by_hand():
    assert normalise_answer("The  Empire-State, Building!") == "empirestate building"
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    # pred "eiffel tower in paris" vs gold "eiffel tower" ("the" dropped, "in" kept): 2 shared, P = 1/2, R = 1
    assert token_f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert token_f1("Eiffel Tower in Paris", "Paris") == pytest.approx(0.4)  # P = 1/4, R = 1
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)  # a multiset: 2 shared, P = R = 2/3
    assert token_f1("a b b", "b b c") == pytest.approx(0.8)  # "a" is an article: "b b" vs "b b c", P = 1, R = 2/3
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("the", "x") == 0.0
    metrics = span_metrics(
        ["Eiffel Tower in Paris", "", "London", ""],
        [["the Eiffel Tower", "Paris"], [], [], ["Rome"]],
    )
    # 1: EM 0, F1 max(2/3, 0.4) = 2/3; 2: a right no-answer (EM = F1 = 1); 3: an answer where there is none; 4: missed
    assert metrics["exact"] == pytest.approx(1 / 4)
    assert metrics["f1"] == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)
    assert metrics["has_answer_f1"] == pytest.approx(1 / 3) and metrics["has_answer_exact"] == 0.0
    assert metrics["no_answer_accuracy"] == pytest.approx(0.5)
    assert (metrics["has_answer"], metrics["no_answer"], metrics["examples"]) == (2, 2, 4)


# --- readers ------------------------------------------------------------------------------------------------------


def test_readers_take_squad_and_flat_layouts_and_name_bad_rows(tmp_path):
    rows = toy_examples(12)
    examples = read_spans(write_jsonl(tmp_path / "a.jsonl", rows))
    wanted = [list(zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True)) for r in rows]
    assert [e.answers for e in examples] == wanted and sum(not a for a in wanted) == 3
    assert all(e.context[s : s + len(t)] == t for e in examples for t, s in e.answers)
    flat = tmp_path / "b.csv"
    flat.write_text("question,context,answer_text,answer_start\nwho ?,bob met alice,alice,8\nwho ?,no one,,\n")
    assert [e.answers for e in read_spans(flat)] == [[("alice", 8)], []]
    squad = {"data": [{"paragraphs": [{"context": "bob met alice", "qas": [{"id": "q", "question": "who ?",
             "answers": [{"text": "bob", "answer_start": 0}]}, {"question": "why ?", "answers": [],
             "is_impossible": True}]}]}]}  # fmt: skip
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    assert [e.answers for e in read_spans(tmp_path / "squad.json")] == [[("bob", 0)], []]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(
        bad, [{"question": "who ?", "context": "bob met alice", "answers": {"text": ["alice"], "answer_start": [4]}}]
    )
    with pytest.raises(InputError, match=r"bad.jsonl:1: answer 'alice' is not at answer_start 4 of the context"):
        read_spans(bad)
    write_jsonl(bad, [{"question": "who ?", "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(InputError, match=r"bad.jsonl:1: column 'context' is missing or empty"):
        read_spans(bad)
    write_jsonl(bad, [{"question": "who ?", "context": "bob"}])
    with pytest.raises(InputError, match=r"bad.jsonl:1: no answers: expected an 'answers' field"):
        read_spans(bad)


def test_bad_files_give_one_line_errors_on_the_command_line(cli, tmp_path, span_model_dir):
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "q", "context": "abc", "answers": {"text": ["x"], "answer_start": [1]}}]
    )
    code, _, err = cli(
        "train", "--task", "span", "--model", span_model_dir, "--max-length", 32, "--data", bad, "--out", tmp_path / "r"
    )
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "answer 'x' is not at" in err
    code, _, err = cli("train", "--task", "span", "--pooling", "mean", "--data", bad, "--out", tmp_path / "r")
    assert code == 2 and "applies to --task classify only" in err


# --- the WNUT-16 set ----------------------------------------------------------------------------------------------


@pytest.mark.real
def test_wnut16_spans_is_deterministic_and_every_answer_sits_at_its_start():
    first, again = load_spans("wnut16_spans", quiet=True), load_spans("wnut16_spans", quiet=True)
    assert first.splits == again.splits
    everything = [e for split in first.splits.values() for e in split]
    for e in everything:
        for text, start in e.answers:
            assert e.context[start : start + len(text)] == text
    answered = sum(bool(e.answers) for e in everything)
    assert (answered, len(everything) - answered) == (1212, 1726)
    assert {e.question for e in everything} >= {"Which person is mentioned?", "Which TV show is mentioned?"}
    from peftlab.data.tagging import load_tagging

    tweets = load_tagging("wnut16", quiet=True)  # the same tweets in each split as the tagging task's
    for split, sentences in tweets.splits.items():
        contexts = {" ".join(s.words) for s in sentences}
        assert {e.context for e in first.splits[split]} <= contexts


# --- every method family ------------------------------------------------------------------------------------------

METHODS = {
    "lora": ({"r": 4}, 1e-2),
    "ia3": ({}, 3e-2),
    "houlsby": ({}, 1e-2),
    "prompt_tuning": ({"num_virtual_tokens": 4}, 3e-2),
    "prefix_tuning": ({"num_virtual_tokens": 4}, 1e-2),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_family_trains_on_spans(method, span_model_dir):
    tok = AutoTokenizer.from_pretrained(span_model_dir)
    examples = read_spans_rows(toy_examples(32))
    data = encode_spans(examples, tok, max_length=24)
    torch.manual_seed(0)
    model = load_span_model(span_model_dir)
    options, lr = METHODS[method]
    attachment = attach(model, method, **options)
    assert "qa_outputs" in attachment.trainable_modules
    task = SpanTask()
    params = attachment.trainable_parameters()
    optimiser = torch.optim.AdamW(params, lr=lr)
    batch = data.batch(range(len(data)))
    model.train()
    losses = []
    for _ in range(15):
        loss = task.loss(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    with torch.no_grad():
        out = model.eval()(**{k: v for k, v in batch.items() if k in INPUTS})
    assert out.start_logits.shape == batch["input_ids"].shape  # virtual tokens taken back out
    metrics = task.evaluate(model, data, 8, "cpu", nullcontext)
    assert 0 <= metrics["exact"] <= metrics["f1"] <= 1 and metrics["examples"] == len(examples)
    assert metrics["has_answer"] + metrics["no_answer"] == len(examples) and metrics["loss"] > 0


def read_spans_rows(rows):
    from peftlab.data.spans import span_records

    return span_records([(f"row {i}", r) for i, r in enumerate(rows)])


# --- the command line, export ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def span_run(span_model_dir, tmp_path_factory):
    from peftlab.cli import main

    root = tmp_path_factory.mktemp("span")
    data = write_jsonl(root / "toy.jsonl", toy_examples(240))
    out = root / "run"
    # the head's rate pinned: the toy model learns spans within 3 epochs whatever the default floor
    args = ["--no-progress", "train", "--task", "span", "--model", span_model_dir, "--data", data, "--out", out,
            "--epochs", "3", "--batch-size", "16", "--lr", "0.01", "--head-lr", "0.02", "--max-length", "24",
            "--doc-stride", "4"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    return out


def test_a_span_run_writes_exact_and_f1(span_run):
    results = json.loads((span_run / "results.json").read_text())
    test = results["metrics"]["test"]
    assert {"exact", "f1", "has_answer_f1", "no_answer_accuracy", "loss"} <= set(test)
    assert 0 <= test["exact"] <= test["f1"] <= 1 and test["examples"] == 24
    assert test["f1"] > 0.3, test  # better than always answering nothing (half the questions have an answer)
    assert results["labels"] is None and results["history"][-1]["validation"]["f1"] >= 0
    meta = json.loads((span_run / "adapter" / "adapter.json").read_text())
    assert meta["task"]["type"] == "span" and meta["trainable_modules"] == ["qa_outputs"]
    config = json.loads((span_run / "config.json").read_text())
    assert config["task"] == "span" and config["doc_stride"] == 4


def test_span_eval_and_peft_export_give_the_same_logits(span_run, cli, tmp_path, span_model_dir):
    code, out, err = cli("eval", span_run, "--json")
    assert code == 0, err
    results = json.loads((span_run / "results.json").read_text())
    assert json.loads(out)["test"]["f1"] == pytest.approx(results["metrics"]["test"]["f1"])
    extra = write_jsonl(tmp_path / "more.jsonl", toy_examples(10, seed=5))
    code, out, err = cli("eval", span_run, "--data", extra, "--json")
    assert code == 0, err
    assert json.loads(out)["more.jsonl"]["examples"] == 10
    from peftlab.run import rebuild

    _, _, _, prepared, adapter = rebuild(span_run)
    batch = prepared.splits["test"].batch(range(4))
    inputs = {k: v for k, v in batch.items() if k in INPUTS}
    with torch.no_grad():
        ours = adapter.model.eval()(**inputs)
    assert cli("export", span_run, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["task_type"] == "QUESTION_ANS" and config["modules_to_save"] == ["qa_outputs"]
    theirs = PeftModel.from_pretrained(load_span_model(span_model_dir), tmp_path / "hf").eval()
    with torch.no_grad():
        got = theirs(**inputs)
    torch.testing.assert_close(got.start_logits, ours.start_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.end_logits, ours.end_logits, rtol=1e-5, atol=1e-5)
    code, _, err = cli("import", tmp_path / "hf", "--out", tmp_path / "back")  # its task_type picks the model
    assert code == 0, err
    assert json.loads((tmp_path / "back" / "adapter.json").read_text())["task"] == {"type": "span"}
    back = peftlab.load_adapter(load_span_model(span_model_dir), tmp_path / "back")
    with torch.no_grad():
        again = back.model.eval()(**inputs)
    torch.testing.assert_close(again.start_logits, ours.start_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.end_logits, ours.end_logits, rtol=1e-5, atol=1e-5)
    code, _, err = cli("import", tmp_path / "hf", "--out", tmp_path / "labelled", "--labels", "a,b")
    assert code == 2 and "QUESTION_ANS" in err and err.count("\n") == 1 and not (tmp_path / "labelled").exists()


def test_a_prompt_tuned_span_model_exports_with_the_same_logits_on_the_real_tokens(tmp_path, span_model_dir):
    """PEFT's question answerer keeps the virtual tokens' logits in front; ours takes them out."""
    import peftlab

    m = 4
    torch.manual_seed(0)
    ours = attach(load_span_model(span_model_dir), "prompt_tuning", num_virtual_tokens=m, init="random")
    with torch.no_grad():
        for p in ours.trainable_parameters():
            p.normal_(0, 0.5)
    tok = AutoTokenizer.from_pretrained(span_model_dir)
    batch = encode_spans(read_spans_rows(toy_examples(4)), tok, max_length=24).batch(range(4))
    inputs = {k: v for k, v in batch.items() if k in INPUTS}
    with torch.no_grad():
        expected = ours.model.eval()(**inputs)
    peftlab.export_hf(ours, tmp_path / "hf", task_type="QUESTION_ANS")
    theirs = PeftModel.from_pretrained(load_span_model(span_model_dir), tmp_path / "hf").eval()
    with torch.no_grad():
        got = theirs(**inputs)
    assert got.start_logits.shape[1] == expected.start_logits.shape[1] + m
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.start_logits[:, m:][keep], expected.start_logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.end_logits[:, m:][keep], expected.end_logits[keep], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the task reads PEFT's model (the benchmark's peer) on the same real tokens as ours
        for a, b in zip(span_logits(theirs, batch), span_logits(ours.model, batch), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
