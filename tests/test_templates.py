"""The template library and the instruction mixture (on made-up examples), and the packaged corpora readers (on
small files written here in the packaged formats)."""

import json
import zipfile

import pytest

from peftlab.data.corpora import chatterbot, chitchat_dialogues, news_articles, shakespeare_scenes
from peftlab.data.sft import _windows
from peftlab.data.templates import DEMONSTRATIONS, TASKS, Example, TemplatedConversation, build_mixture


def fake_examples(name: str, n: int = 400) -> list[Example]:
    task = TASKS[name]
    out = []
    for i in range(n):
        fields = {"text": f"item {i} of {name}", "question": f"question {i}?", "topic": "t"}
        if task.labels:
            out.append(Example(name, fields, task.labels[i % len(task.labels)]))
        else:
            out.append(Example(name, fields, outputs=(f"answer {i}", f"other {i}")))
    return out


def shared_articles(name: str) -> list[Example]:
    """topic and headline read the same articles in the same order (as the BBC tasks do)."""
    examples = fake_examples(name)
    return [Example(name, {**e.fields, "text": f"article {i}"}, e.label, e.outputs) for i, e in enumerate(examples)]


SIZES = {"sentiment": (20, 4, 6), "topic": (10, 2, 4), "headline": (8, 2, 2), "entities": (6, 2, 2)}
HELD = {"tweet_sentiment": 5, "open_qa": 7}


def mix(seed=0, examples_of=fake_examples):
    return build_mixture(seed, SIZES, HELD, examples_of=examples_of)


def test_every_template_renders_an_instruction_and_its_answer_words():
    for task in TASKS.values():
        assert len(task.templates) >= 3, task.name
        for template in task.templates:
            for example in fake_examples(task.name, 6):
                conv = template.render(example)
                assert isinstance(conv, TemplatedConversation) and conv.task == task.name
                assert [m["role"] for m in conv.messages] == ["user", "assistant"]
                assert "{" not in conv.messages[0]["content"]
                assert conv.reference() == conv.answers[0]
                if template.verbalizer:
                    assert conv.answers == [template.verbalizer[example.label]]
                    if "{options}" in template.prompt:  # listed options name every answer word
                        assert all(w in conv.messages[0]["content"] for w in template.verbalizer.values())
    options = TASKS["tweet_sentiment"].templates[0].render(fake_examples("tweet_sentiment", 1)[0])
    assert "negative, neutral or positive" in options.messages[0]["content"]
    # some templates list the options, some do not, and some put the input first
    sentiment = [t.prompt for t in TASKS["sentiment"].templates]
    assert any("{options}" in p or " or " in p for p in sentiment) and any(" or " not in p for p in sentiment)
    assert any(p.startswith("{text}") for p in sentiment)


def test_mixture_sizes_held_out_tasks_and_determinism():
    m = mix()
    assert len(m.splits["train"]) == sum(s[0] for s in SIZES.values())
    assert len(m.splits["test"]) == sum(s[2] for s in SIZES.values())
    assert {c.task for c in m.splits["train"]} == set(SIZES)
    for split in m.splits.values():  # held-out tasks never reach training, validation or test
        assert not {c.task for c in split} & set(HELD)
    assert {k: len(v) for k, v in m.held_out.items()} == HELD
    assert {c.task for c in m.held_out["open_qa"]} == {"open_qa"}
    again, other = mix(), mix(seed=1)
    assert [c.messages for c in again.splits["train"]] == [c.messages for c in m.splits["train"]]
    assert [c.messages for c in other.splits["train"]] != [c.messages for c in m.splits["train"]]
    templates = {(c.task, c.template) for c in m.splits["train"]}
    assert len({t for task, t in templates if task == "sentiment"}) >= 3  # several phrasings per task


def test_mixture_splits_articles_once_and_keeps_demonstrations_apart():
    m = mix(examples_of=shared_articles)
    text = {split: {c.example.fields["text"] for c in convs} for split, convs in m.splits.items()}
    assert not text["test"] & text["train"] and not text["validation"] & text["train"]
    for task in [*SIZES, *HELD]:
        assert len(m.demonstrations[task]) == min(DEMONSTRATIONS, 320)
        demos = {e.fields["text"] for e in m.demonstrations[task]}
        assert not demos & text["train"] and not demos & text["test"]


def test_instruct_mix_is_a_packaged_sft_dataset_with_held_out_evaluation(monkeypatch):
    import peftlab.data.templates as templates
    from peftlab.data.sft import load_sft

    real = templates.build_mixture
    monkeypatch.setattr(templates, "build_mixture", lambda seed: real(seed, SIZES, HELD, examples_of=fake_examples))
    data = load_sft("instruct_mix", eval_limit=3)
    assert set(data.extra_eval) == {"heldout:tweet_sentiment", "heldout:open_qa"}
    assert all(len(v) == 3 for v in data.extra_eval.values()) and len(data.splits["test"]) == 3
    assert set(data.demonstrations) == {*SIZES, *HELD}


# --- corpora readers ---------------------------------------------------------------------------------------------


def test_chitchat_alternates_speakers_and_joins_their_messages(tmp_path):
    def msg(sender, text):
        return {"sender": sender, "text": text, "timestamp": "t"}

    dialogues = {
        "b": {"messages": [[msg("x", "hello"), msg("x", "how are you?")], [msg("y", "fine")], [msg("x", "good")]]},
        "a": {"messages": [[msg("x", "alone")]]},  # one speaker only: no reply to learn
    }
    (tmp_path / "dataset.json").write_text(json.dumps(dialogues))
    assert chitchat_dialogues(tmp_path) == [["hello\nhow are you?", "fine", "good"]]
    windows = _windows(["u1", "a1", "u2", "a2", "u3", "a3", "u4"], 4)
    assert [[m["role"] for m in w.messages] for w in windows] == [["user", "assistant"] * 2, ["user", "assistant"]]
    assert windows[1].messages[1]["content"] == "a3"  # the trailing user turn without a reply is dropped


def test_chatterbot_questions_pool_alternatives_and_dialogue_topics_stay_dialogues(tmp_path):
    (tmp_path / "english").mkdir()
    (tmp_path / "english" / "ai.yml").write_text(
        "categories:\n- ai\nconversations:\n- - What is AI?\n  - A field.\n  - Machines that think.\n"
        "- - what is ai?\n  - Science.\n- Not a list\n- - Lonely\n"
    )
    (tmp_path / "english" / "conversations.yml").write_text(
        "conversations:\n- - Hello\n  - Hi\n  - How are you?\n  - Fine.\n"
    )
    items, dialogues = chatterbot(tmp_path)
    assert len(items) == 1 and items[0].answers == ["A field.", "Machines that think.", "Science."]
    assert dialogues == [("conversations", ["Hello", "Hi", "How are you?", "Fine."])]


def test_shakespeare_scenes_become_plain_text(tmp_path):
    (tmp_path / "plays" / "tragedies").mkdir(parents=True)
    (tmp_path / "plays" / "tragedies" / "play.md").write_text(
        "# Play\n\n## ACT I\n\n### SCENE I. A hall.\n\n_Enter A_\n\n**A**  \nWho's there?  \nSpeak.\n\n"
        "**B**  \nA friend.\n\n### SCENE II. A room.\n\n**A**  \nAgain.\n"
    )
    scenes = shakespeare_scenes(tmp_path)
    assert [name for name, _ in scenes] == ["play ACT I SCENE I. A hall.", "play ACT I SCENE II. A room."]
    assert scenes[0][1] == "[Enter A]\n\nA: Who's there?\nSpeak.\n\nB: A friend."


def test_news_articles_from_the_zipped_csv(tmp_path):
    with zipfile.ZipFile(tmp_path / "NewsArticles.zip", "w") as z:
        z.writestr("NewsArticles.csv", 'article_id,title,text\n1,A title,"Some, text"\n2,,no title\n')
    assert news_articles(tmp_path) == [("A title", "Some, text")]


@pytest.mark.real
def test_packaged_corpora_read(tmp_path):
    from peftlab.data.sft import load_sft

    chat = load_sft("chitchat")
    assert len(chat.splits["train"]) > 10_000 and all(
        c.messages[-1]["role"] == "assistant" for c in chat.splits["test"]
    )
    qa = load_sft("chatterbot_qa")
    assert any(len(c.answers) > 1 for c in qa.splits["train"])
    for name in ("shakespeare", "news_articles"):
        assert all(c.is_text for c in load_sft(name).splits["test"])
