"""The memory levers of decoder training keep the numbers: the chunked, target-only loss equals the loss over full
logits (value and gradients) and never saves full-vocabulary logits for backward."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
from peftlab.bench.measure import saved_activation_bytes
from peftlab.data.lm import IGNORE
from peftlab.train.lm_task import token_losses

VOCAB = 5000


def llama(vocab: int = VOCAB, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        **overrides,
    )
    return LlamaForCausalLM(config)


def batch(rows: int = 3, length: int = 24, vocab: int = VOCAB, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded rows whose second half is the target (a reply after a prompt), as SFT batches are."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE)
    for r in range(rows):
        real = length - 3 * r  # rows of different lengths, padded at the end
        ids[r, real:], mask[r, real:] = 0, 0
        labels[r, real // 2 : real] = ids[r, real // 2 : real]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_logit_loss(model, b) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    targets = b["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method, options", [("lora", {"r": 4}), ("prompt_tuning", {"num_virtual_tokens": 3}),
                                             ("prefix_tuning", {"num_virtual_tokens": 3, "encoder_hidden": 16}),
                                             ("full", {})])  # fmt: skip
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_the_chunked_loss_equals_the_full_logit_loss_and_its_gradients(method, options, chunk):
    b = batch()
    reference = peftlab.attach(llama(), method, **options)
    expected, expected_count = full_logit_loss(reference.model, b)
    expected.backward()
    chunked = peftlab.attach(llama(), method, **options)
    loss, count = token_losses(chunked.model, b, chunk=chunk)
    loss.backward()
    assert count == expected_count
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    want, got = trainable_grads(reference.model), trainable_grads(chunked.model)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert type(chunked.model.get_output_embeddings()) is not torch.nn.Identity  # the output layer is back


def test_no_full_vocabulary_logits_are_saved_for_backward():
    """Saved activations of the chunked loss stay far below one fp32 logit per (position, vocabulary entry)."""
    b = batch(rows=4, length=64)
    model = peftlab.attach(llama(), "lora", r=4).model
    full, chunked = {}, {}
    with saved_activation_bytes(model, full):
        full_logit_loss(model, b)[0].backward()
    with saved_activation_bytes(model, chunked):
        token_losses(model, b, chunk=16)[0].backward()
    logit_bytes = 4 * 64 * VOCAB * 4  # one fp32 logit per position and vocabulary entry
    assert full["activations"] - chunked["activations"] > 0.9 * logit_bytes  # what the reference saves on top
    assert chunked["activations"] < logit_bytes / 2  # the model's own activations only


def test_soft_capped_logits_take_the_full_logit_path():
    """Gemma-style soft-capping is applied after the output layer: the chunked path would skip it."""
    model = llama()
    model.config.final_logit_softcapping = 30.0
    b = batch()
    with torch.no_grad():
        loss, _ = token_losses(model, b, chunk=4)
        expected, _ = full_logit_loss(model, b)
    torch.testing.assert_close(loss, expected)
