"""Supervised fine-tuning of a decoder end to end on a tiny Llama: train, evaluate, generate, merge, export."""

import json
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftlab
from peftlab.data.conversations import Conversation
from peftlab.evaluate.generation import generate, normalise, score
from tests.conftest import FILLER, NEGATIVE, POSITIVE

FAST = ["--epochs", "10", "--batch-size", "8", "--lr", "0.005", "--max-length", "48", "--eval-generate", "16",
        "--max-new-tokens", "3"]  # fmt: skip


def instruction_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2) + ["the", "movie"]
        rng.shuffle(words)
        rows.append(
            {
                "instruction": "classify the sentiment",
                "input": " ".join(words),
                "output": label,
                "task": "sentiment",
                "answers": [label],
            }
        )
    return rows


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(160)))
    return path


def general_text(n=12, seed=1):
    """Paragraphs of plain text (blank-line separated), the shape of a forgetting or replay corpus."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choices(FILLER + POSITIVE, k=30)) for _ in range(n)) + "\n"


@pytest.fixture(scope="module")
def general_file(sft_data):
    path = sft_data.parent / "general.txt"
    path.write_text(general_text())
    return path


@pytest.fixture(scope="module")
def sft_run(tiny_llama_dir, sft_data, general_file, tmp_path_factory):
    from peftlab.cli import main

    out = tmp_path_factory.mktemp("sft-runs") / "lora"
    assert (
        main(
            [
                "--no-progress",
                "train",
                "--task",
                "sft",
                "--model",
                str(tiny_llama_dir),
                "--data",
                str(sft_data),
                "--out",
                str(out),
                "--r",
                "4",
                "--forgetting-data",
                str(general_file),
                "--forgetting-docs",
                "4",
                *FAST,
            ]
        )
        == 0
    )
    return out


def test_sft_learns_and_reports_lm_and_generation_metrics(sft_run):
    results = json.loads((sft_run / "results.json").read_text())
    losses = [h["validation"]["loss"] for h in results["history"]]
    assert losses[-1] < 0.5 * losses[0]
    test = results["metrics"]["test"]
    assert {"loss", "perplexity", "exact_match", "answer_accuracy"} <= test.keys()
    assert test["perplexity"] == pytest.approx(2.718281828 ** test["loss"], rel=1e-6)
    assert test["answer_accuracy"] >= 0.75
    assert results["params"]["delta_rank"]["max"] == 4
    config = json.loads((sft_run / "adapter" / "adapter.json").read_text())
    assert config["task"] == {"type": "sft"} and config["trainable_modules"] == []
    assert not any(t.endswith("lm_head") for t in config["targets"])


def test_forgetting_is_the_perplexity_of_general_text_before_and_after(sft_run, general_file, tiny_llama_dir):
    from peftlab.data.lm import text_sample
    from peftlab.data.sft import text_documents
    from peftlab.run import rebuild
    from peftlab.train.lm_task import LanguageModelTask

    results = json.loads((sft_run / "results.json").read_text())
    f = results["forgetting"][str(general_file)]
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    sample = text_sample(tok, text_documents(str(general_file)), 128, 4)  # 128: the tiny model's positions
    assert f["documents"] == 4 and f["tokens"] == sample.tokens() - len(sample)
    task, ctx = LanguageModelTask(), __import__("contextlib").nullcontext
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert f["before"] == pytest.approx(task.evaluate(base, sample, 8, "cpu", ctx)["perplexity"], rel=1e-5)
    _, _, _, _, adapter = rebuild(sft_run)
    assert f["after"] == pytest.approx(task.evaluate(adapter.model, sample, 8, "cpu", ctx)["perplexity"], rel=1e-5)
    assert f["change"] == pytest.approx(f["after"] - f["before"])


def test_replay_mixes_general_text_into_training(tiny_llama_dir, sft_data, general_file):
    from peftlab.run import RunOptions, prepare_data

    common = {"model": str(tiny_llama_dir), "data": str(sft_data), "task": "sft", "max_length": 48}
    plain = prepare_data(RunOptions(**common))
    mixed = prepare_data(RunOptions(**common, replay_data=str(general_file), replay_ratio=0.5))
    extra = mixed.splits["train"].input_ids[len(plain.splits["train"]) :]
    assert extra and all(len(r) <= 48 for r in extra)
    replayed = sum(len(r) for r in extra)
    task_targets = plain.splits["train"].targets()
    assert 0.5 * task_targets <= replayed < 0.5 * task_targets + 48  # whole blocks until the ratio is reached
    assert mixed.splits["train"].labels[-1] == extra[-1]  # every replayed token is a target
    assert mixed.splits["validation"].input_ids == plain.splits["validation"].input_ids
    assert any(n.startswith("replay:") for n in mixed.data.notes)


def test_eval_generate_rescores_a_run(sft_run, cli):
    results = json.loads((sft_run / "results.json").read_text())
    code, out, err = cli("eval", sft_run, "--generate", "16", "--json")
    assert code == 0, err
    again = json.loads(out)["test"]
    assert again["answer_accuracy"] == results["metrics"]["test"]["answer_accuracy"]
    assert again["examples"] == results["metrics"]["test"]["examples"]


def test_eval_reproduces_the_test_loss(sft_run, cli):
    code, out, err = cli("eval", sft_run, "--json")
    assert code == 0, err
    results = json.loads((sft_run / "results.json").read_text())
    assert json.loads(out)["test"]["loss"] == pytest.approx(results["metrics"]["test"]["loss"], rel=1e-5)


def test_merged_decoder_loads_in_plain_transformers(sft_run, cli, tmp_path, tiny_llama_dir):
    code, _, err = cli("merge", sft_run, "--out", tmp_path / "merged")
    assert code == 0, err
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    from peftlab.run import rebuild

    _, _, _, _, adapter = rebuild(sft_run)
    ids = torch.randint(5, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # logits of size ~10 here: float32 rounding in the merged weights is relative
        torch.testing.assert_close(plain(ids).logits, adapter.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    code, _, err = cli("export", sft_run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0, err
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    theirs = PeftModel.from_pretrained(base, tmp_path / "hf").eval()
    assert json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, adapter.model(ids).logits, rtol=0, atol=1e-5)
    code, _, err = cli("import", tmp_path / "hf", "--out", tmp_path / "back")
    assert code == 0, err
    assert json.loads((tmp_path / "back" / "adapter.json").read_text())["task"] == {"type": "sft"}
    back = peftlab.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(ids).logits, adapter.model(ids).logits, rtol=0, atol=1e-5)


def test_generation_stops_at_the_end_of_turn_and_scores(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make the end-of-turn token the only likely next token
        model.lm_head.weight.zero_()
        model.lm_head.weight[eot] = 0
        model.model.norm.weight.zero_()
        model.lm_head.bias = None
    replies = generate(model, tok, [[{"role": "user", "content": "hello"}]] * 3, max_new_tokens=5)
    assert replies == ["", "", ""] or all(r.strip() == "" for r in replies)
    conv = Conversation(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Positive."}], answers=["positive"]
    )
    assert normalise(" Positive. ") == "positive"
    assert score([conv], ["positive"]) == {
        "exact_match": 1.0,
        "token_f1": 1.0,
        "examples": 1,
        "answer_accuracy": 1.0,
        "answered_examples": 1,
    }


def test_generate_from_a_run_or_from_model_and_adapter(sft_run, cli, tmp_path, tiny_llama_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("classify the sentiment\n" + json.dumps({"prompt": "classify the sentiment"}) + "\n")
    code, out, err = cli("generate", sft_run, "--prompts", prompts, "--max-new-tokens", "3", "--json")
    assert code == 0, err
    replies = [json.loads(line)["reply"] for line in out.splitlines()]
    assert len(replies) == 2 and replies[0] == replies[1]
    code, out2, err = cli(
        "generate",
        "--model",
        tiny_llama_dir,
        "--adapter",
        sft_run / "adapter",
        "--prompts",
        prompts,
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert code == 0, err
    assert [json.loads(line)["reply"] for line in out2.splitlines()] == replies


def test_chat_keeps_the_history_and_resets(sft_run, cli, monkeypatch):
    lines = iter(["classify the sentiment", "/reset", "hello how are you", "/exit"])
    seen = []
    import peftlab.evaluate.generation as generation

    real = generation.generate

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.append(prompts[0])
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = cli("chat", sft_run, "--max-new-tokens", "3")
    assert code == 0, err
    assert out.count("bot>") == 2 and "(history cleared)" in out
    assert [len(p) for p in seen] == [1, 1]  # after /reset the second question starts a fresh history


def test_generate_refuses_a_classification_run(trained_classifier_run, cli):
    code, _, err = cli("generate", trained_classifier_run, "--prompts", "-")
    assert code == 2 and "has no language-model head" in err


@pytest.fixture(scope="module")
def trained_classifier_run(tiny_model_dir, tiny_csv, tmp_path_factory):
    from peftlab.cli import main

    out = tmp_path_factory.mktemp("cls") / "run"
    assert (
        main(
            [
                "--no-progress",
                "train",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(tiny_csv),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--max-length",
                "32",
            ]
        )
        == 0
    )
    return out
