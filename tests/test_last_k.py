"""Last-k layer tuning: the right blocks are found on BERT, Llama, Qwen and MPNet, with the final norm / pooler
after them, and a k the model cannot give is refused."""

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

import peftlab
from tests.conftest import tiny_classifier

SMALL = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**SMALL, num_key_value_heads=2, pad_token_id=0))


def tiny_qwen():
    torch.manual_seed(0)
    return Qwen2ForSequenceClassification(Qwen2Config(**SMALL, num_key_value_heads=2, pad_token_id=0))


def tiny_mpnet():
    torch.manual_seed(0)
    return MPNetForSequenceClassification(MPNetConfig(**SMALL))


def trainable_modules(model) -> set[str]:
    """The module prefixes of the trainable parameters, cut at the block index or the top module."""
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad:
            parts = n.split(".")
            cut = next((i + 2 for i, x in enumerate(parts) if x in ("layer", "layers")), len(parts) - 1)
            names.add(".".join(parts[:cut]))
    return names


def test_bert_trains_the_last_block_the_pooler_and_the_head():
    model = tiny_classifier()  # two blocks
    adapter = peftlab.attach(model, "last_k", k=1)
    assert adapter.targets == ["bert.encoder.layer.1", "bert.pooler"]
    assert trainable_modules(model) == {"bert.encoder.layer.1", "bert.pooler.dense", "classifier"}
    expected = sum(p.numel() for m in (model.bert.encoder.layer[1], model.bert.pooler, model.classifier)
                   for p in m.parameters())  # fmt: skip
    assert adapter.trainable_count() == expected


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen])
def test_llama_and_qwen_train_the_last_blocks_the_final_norm_and_the_head(build):
    model = build()
    adapter = peftlab.attach(model, "last_k", k=2)
    assert adapter.targets == ["model.layers.1", "model.layers.2", "model.norm"]
    assert trainable_modules(model) == {"model.layers.1", "model.layers.2", "model.norm", "score"}
    assert not model.model.embed_tokens.weight.requires_grad


def test_mpnet_keeps_the_shared_relative_position_bias_frozen():
    model = tiny_mpnet()
    adapter = peftlab.attach(model, "last_k", k=1)
    assert adapter.targets == ["mpnet.encoder.layer.2"]
    assert not model.mpnet.encoder.relative_attention_bias.weight.requires_grad
    assert trainable_modules(model) == {"mpnet.encoder.layer.2", "classifier.dense", "classifier.out_proj"}


def test_only_the_last_k_blocks_change_in_training():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "last_k", k=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.1)
    ids = torch.randint(5, 60, (4, 9))
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in moved)
    assert any(n.startswith("bert.encoder.layer.1.") for n in moved)


@pytest.mark.parametrize("k, message", [(3, "^k: the model has 2 blocks .*at most 2, got 3"), (0, "^k: expected")])
def test_a_k_the_model_cannot_give_is_refused(k, message):
    with pytest.raises(peftlab.InputError, match=message):
        peftlab.attach(tiny_classifier(), "last_k", k=k)


def test_a_model_without_blocks_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(peftlab.InputError, match="^k: found no transformer blocks"):
        peftlab.attach(model, "last_k", trainable_modules=[])
