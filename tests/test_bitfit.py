"""BitFit: exactly the chosen bias terms train; the paper's subset; clear errors for patterns and bias-free models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

import peftlab
from tests.conftest import tiny_classifier

SMALL = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_every_bias_and_the_head_train_by_default():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "bitfit")
    # reference: in these Hugging Face models every bias is a parameter called "bias"
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith("classifier.")}
    assert len(biases) == 2 * 8 + 2  # 8 per block (q, k, v, attention out, 2 LayerNorms, FFN in, out) + emb LN + pooler
    assert trainable(model) == biases | {"classifier.weight", "classifier.bias"}
    assert adapter.trainable_count() == sum(p.numel() for n, p in model.named_parameters() if n in trainable(model))


def test_the_papers_subset_query_and_first_ffn_layer():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "bitfit", biases=["query", "intermediate.dense"])
    modules = ("attention.self.query", "intermediate.dense")
    expected = {f"bert.encoder.layer.{i}.{m}.bias" for i in (0, 1) for m in modules}
    assert trainable(model) - {"classifier.weight", "classifier.bias"} == expected
    assert adapter.targets == [n[: -len(".bias")] for n in sorted(expected)]


def test_a_pattern_selects_the_biases_inside_the_modules_it_matches():
    model = tiny_classifier()
    peftlab.attach(model, "bitfit", biases=["layer.1.attention"])
    body = trainable(model) - {"classifier.weight", "classifier.bias"}
    assert body == {
        f"bert.encoder.layer.1.attention.{m}.bias" for m in ("self.query", "self.key", "self.value", "output.dense")
    } | {"bert.encoder.layer.1.attention.output.LayerNorm.bias"}


def test_only_biases_change_in_training():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "bitfit")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=0.1)
    ids = torch.randint(5, 60, (4, 9))
    torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.endswith(".bias") or n.startswith("classifier.") for n in moved)
    assert "bert.encoder.layer.0.attention.self.query.bias" in moved


def test_a_misspelt_pattern_names_the_closest_modules_with_a_bias():
    message = "^biases: pattern 'qurey' selects no bias; closest module names: query"
    with pytest.raises(peftlab.InputError, match=message):
        peftlab.attach(tiny_classifier(), "bitfit", biases=["qurey"])


def test_a_pattern_over_modules_without_bias_is_refused():
    with pytest.raises(peftlab.InputError, match="^biases: pattern 'word_embeddings' selects no bias"):
        peftlab.attach(tiny_classifier(), "bitfit", biases=["word_embeddings"])


def test_a_model_without_biases_is_refused_and_qwen_trains_its_qkv_biases():
    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(LlamaConfig(**SMALL, num_key_value_heads=2, pad_token_id=0))
    with pytest.raises(peftlab.InputError, match="^biases: LlamaForSequenceClassification has no bias terms"):
        peftlab.attach(llama, "bitfit")
    qwen = Qwen2ForSequenceClassification(Qwen2Config(**SMALL, num_key_value_heads=2, pad_token_id=0))
    peftlab.attach(qwen, "bitfit")
    assert trainable(qwen) == {f"model.layers.{i}.self_attn.{m}_proj.bias" for i in (0, 1) for m in "qkv"} | {
        "score.weight"
    }
