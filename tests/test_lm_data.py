"""Decoder data: conversations from instruction/chat/text records, assistant-only targets, truncation, packing."""

import json

import pytest
from transformers import AutoTokenizer

from peftlab.data.conversations import Conversation, read_conversations
from peftlab.data.lm import IGNORE, encode_conversation, encode_conversations, render
from peftlab.errors import InputError


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return Conversation(messages)


def targets(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels, strict=True) if y != IGNORE])


def test_only_assistant_tokens_are_targets(tok):
    conv = chat("hello how are you", "fine thanks", "what is the answer", "yes", system="you are fine")
    ids, labels, cut = encode_conversation(tok, conv, 128)
    assert not cut
    assert ids == render(tok, conv.messages)
    assert targets(tok, ids, labels).split() == ["fine", "thanks", "<|im_end|>", "yes", "<|im_end|>"]


def test_truncation_drops_old_exchanges_first(tok):
    conv = chat("hello how are you", "fine thanks", "what is the answer", "yes no yes")
    full, _, _ = encode_conversation(tok, conv, 128)
    ids, labels, cut = encode_conversation(tok, conv, len(full) - 2)
    assert cut and len(ids) <= len(full) - 2
    text = tok.decode(ids)
    assert "fine thanks" not in text and "what is the answer" in text
    assert targets(tok, ids, labels).split() == ["yes", "no", "yes", "<|im_end|>"]


def test_truncation_then_shortens_the_last_user_message_and_keeps_the_reply(tok):
    long_review = " ".join(["the movie was great and the acting was superb"] * 8)
    conv = chat(f"classify {long_review}", "positive")
    ids, labels, cut = encode_conversation(tok, conv, 24)
    assert cut and len(ids) <= 24
    assert targets(tok, ids, labels).split() == ["positive", "<|im_end|>"]


def test_raw_text_becomes_blocks_of_targets(tok):
    texts = [Conversation(text="the movie was great " * 10), Conversation(text="the plot was dull " * 10)]
    encoded = encode_conversations(tok, texts, max_length=16)
    assert all(len(r) <= 16 for r in encoded.input_ids)
    assert all(ids == labels for ids, labels in zip(encoded.input_ids, encoded.labels, strict=True))
    assert encoded.tokens() == 80 + 2  # two documents of 40 words, each followed by end-of-sequence


def test_packing_fills_rows_without_splitting_examples(tok):
    convs = [chat("hello", "hi"), chat("how are you", "fine"), chat("what is the answer", "yes")] * 4
    plain = encode_conversations(tok, convs, max_length=40)
    packed = encode_conversations(tok, convs, max_length=40, packing=True)
    assert len(packed) < len(plain)
    assert all(len(r) <= 40 for r in packed.input_ids)
    assert packed.targets() == plain.targets() and packed.tokens() == plain.tokens()


def test_batches_pad_right_with_ignored_labels(tok):
    encoded = encode_conversations(tok, [chat("hello", "hi"), chat("what is the answer here", "yes no")], 64)
    batch = encoded.batch([0, 1])
    short = len(encoded.input_ids[0])
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE).all()


def test_records_of_every_shape(tmp_path):
    rows = [
        {
            "instruction": "classify",
            "input": "a great film",
            "output": "positive",
            "task": "sentiment",
            "answers": ["positive"],
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"text": "plain text for language modelling"},
    ]
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs = read_conversations(tmp_path / "mix.jsonl")
    assert convs[0].messages[0]["content"] == "classify\n\na great film" and convs[0].task == "sentiment"
    assert convs[0].reference() == "positive" and convs[0].answers == ["positive"]
    assert convs[1].messages == convs[2].messages
    assert convs[3].is_text
    (tmp_path / "doc.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert [c.text for c in read_conversations(tmp_path / "doc.txt")] == ["first paragraph", "second paragraph"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": []}, "non-empty list of messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role='robot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "from='alien'"),
        ({"instruction": "do it", "output": 3}, "'output' must be text"),
        ({"instruction": " ", "output": "x"}, "must not be empty"),
        (
            {"question": "x"},
            "expected 'messages', 'conversations', 'instruction'/'output', 'prompt'/'completion' or 'text'",
        ),
    ],
)
def test_bad_records_name_the_line(tmp_path, row, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=message) as e:
        read_conversations(tmp_path / "bad.jsonl")
    assert "bad.jsonl:2" in str(e.value)
