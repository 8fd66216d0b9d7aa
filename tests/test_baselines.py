"""Training-free baselines on the tiny Llama: few-shot prompts are built from same-task demonstrations in the
example's own template; PET scores are the label words' log-probabilities after the pattern (checked one token at
a time against plain forwards); ``peftlab baseline`` scores a dataset's test set."""

import dataclasses
import json
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.data.conversations import Conversation
from peftlab.data.templates import TASKS, Example, PetPattern
from peftlab.evaluate.baselines import few_shot_prompt, pet_baseline, word_log_probs


def reviews(n, label="fresh"):
    return [Example("sentiment", {"text": f"the movie {i} was great"}, label) for i in range(n)]


def test_few_shot_demonstrations_come_first_in_the_same_template():
    template = TASKS["sentiment"].templates[2]  # "Did the critic like the movie? Answer yes or no."
    question = template.render(reviews(1, "rotten")[0])
    pool = reviews(6)
    prompt = few_shot_prompt(question, pool, 3, random.Random(0))
    assert [m["role"] for m in prompt] == ["user", "assistant"] * 3 + ["user"]
    assert prompt[-1] == question.prompt()[-1]
    assert all(m["content"] == "yes" for m in prompt[1:-1:2])  # the template's own answer words
    assert all("Did the critic like the movie?" in m["content"] for m in prompt[::2])
    # the question itself is never its own demonstration; a system message stays first
    with_system = dataclasses.replace(
        question, messages=[{"role": "system", "content": "be brief"}, *question.messages]
    )
    own = few_shot_prompt(with_system, [question.example], 2, random.Random(0))
    assert own == with_system.prompt()
    plain = [Conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]) for i in "12"]
    assert len(few_shot_prompt(Conversation(with_system.messages), plain, 5, random.Random(0))) == 1 + 4 + 1


def test_pet_scores_are_label_word_log_probabilities(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prefixes, words = ["the movie was", "a dull and boring plot it was"], [" great", " awful", " one two"]
    scores = word_log_probs(model, tok, prefixes, words, batch_size=4)
    for i, prefix in enumerate(prefixes):
        for j, word in enumerate(words):  # reference: one forward per word token
            ids, want = tok(prefix)["input_ids"], 0.0
            for t in tok(word, add_special_tokens=False)["input_ids"]:
                with torch.no_grad():
                    want += torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)[t].item()
                ids = ids + [t]
            assert abs(scores[i, j].item() - want) < 1e-4


def test_pet_baseline_picks_the_best_label_word(tiny_llama_dir, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    pattern = PetPattern("{text} it was", {"rotten": " awful", "fresh": " great"})
    monkeypatch.setitem(TASKS, "sentiment", dataclasses.replace(TASKS["sentiment"], pet=pattern))
    examples = reviews(3, "fresh") + reviews(3, "rotten")
    convs = [TASKS["sentiment"].templates[0].render(e) for e in examples]
    result = pet_baseline(model, tok, convs)
    logp = word_log_probs(model, tok, [pattern.text(e) for e in examples], [" awful", " great"])
    predicted = ["rotten" if a > b else "fresh" for a, b in logp.tolist()]
    want = sum(p == e.label for p, e in zip(predicted, examples, strict=True)) / 6
    assert result["accuracy"] == want and result["tasks"]["sentiment"]["examples"] == 6
    plain = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert pet_baseline(model, tok, [plain]) is None


def test_baseline_command_scores_zero_and_few_shot(tiny_llama_dir, tmp_path, cli):
    rows = [
        {"instruction": "classify the sentiment", "input": f"the movie was {w}", "output": label, "task": "sentiment",
         "answers": [label]}
        for i in range(40)
        for w, label in [(["great", "awful"][i % 2], ["positive", "negative"][i % 2])]
    ]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "baseline.json"
    code, stdout, err = cli("baseline", "--model", tiny_llama_dir, "--data", data, "--shots", "0", "2",
                            "--limit", "3", "--max-new-tokens", "2", "--out", out)  # fmt: skip
    assert code == 0, err
    results = json.loads(out.read_text())
    assert results["0-shot"]["test"]["examples"] == 3 and results["2-shot"]["test"]["shots"] == 2
    assert "answer_accuracy" in results["2-shot"]["test"] and "pet" in results and not results["pet"]
    assert "2-shot generation" in stdout
    code, _, err = cli("baseline", "--model", tiny_llama_dir, "--data", data, "--shots", "-1")
    assert code == 2 and "--shots" in err
