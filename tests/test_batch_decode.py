"""Decoding requests together (compose/batch_decode.py): each row equals its prompt decoded alone, with its own
budget and stop strings, and the streamed pieces join up to the final text."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.compose.batch_decode import DecodeRow, decode_together, held_back


def test_rows_of_different_lengths_and_budgets_equal_each_alone(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    prompts = [torch.randint(5, 40, (n,)).tolist() for n in (3, 9, 6)]
    budgets = [7, 2, 5]
    pieces: list[list[str]] = [[], [], []]
    rows = [DecodeRow(p, b, on_text=pieces[j].append) for j, (p, b) in enumerate(zip(prompts, budgets, strict=True))]
    decode_together(model, tokenizer, rows, eos=None, pad=0)
    for j, row in enumerate(rows):
        alone = model.generate(
            torch.tensor([prompts[j]]), max_new_tokens=budgets[j], do_sample=False, eos_token_id=None
        )
        assert row.tokens == alone[0, len(prompts[j]) :].tolist() and row.finish_reason == "length"
        assert "".join(pieces[j]) == row.text == tokenizer.decode(row.tokens, skip_special_tokens=True)


def test_a_stop_string_ends_the_row_and_is_never_streamed(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = torch.randint(5, 40, (5,), generator=torch.Generator().manual_seed(1)).tolist()
    free = DecodeRow(prompt, 8)
    decode_together(model, tokenizer, [free], eos=None, pad=0)
    middle = len(free.text) // 2
    stop = free.text[middle : middle + 4]  # across a token boundary: pieces of it must be held back
    pieces: list[str] = []
    cut = DecodeRow(prompt, 8, stop=["never there", stop], on_text=pieces.append)
    decode_together(model, tokenizer, [cut], eos=None, pad=0)
    assert cut.text == free.text[: free.text.index(stop)] and cut.finish_reason == "stop"
    assert len(cut.tokens) < 8
    assert "".join(pieces) == cut.text


def test_held_back_keeps_what_may_start_a_stop_string():
    assert held_back("the answer is ye", ["yes"]) == 2
    assert held_back("the answer", ["yes", "r!"]) == 1
    assert held_back("nothing", ["yes"]) == 0
    assert held_back("half \ufffd", []) == 1
