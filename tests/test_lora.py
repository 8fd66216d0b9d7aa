"""LoRA invariants and the paper's equation, checked directly."""

import math

import pytest
import torch
from torch import nn

import peftlab
from peftlab.errors import InputError
from peftlab.methods.lora import LoraLinear
from tests.conftest import tiny_classifier

TOKENS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))


def randomise_B(attachment, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in attachment.layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_adapter_leaves_outputs_unchanged(init):
    model = tiny_classifier()
    before = model(TOKENS).logits
    peftlab.attach(model, "lora", r=4, init=init)
    assert torch.equal(model(TOKENS).logits, before)


@pytest.mark.parametrize("rslora", [False, True])
def test_layer_computes_the_lora_equation(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoraLinear(base, r=3, alpha=6.0, rslora=rslora)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)
    s = 6.0 / math.sqrt(3) if rslora else 6.0 / 3
    expected = x @ base.weight.T + base.bias + s * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), s * layer.lora_B @ layer.lora_A)


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(512, 512), r=16, alpha=16, init="gaussian")
    assert abs(layer.lora_A.std().item() - 1 / 16) < 0.005
    assert torch.count_nonzero(layer.lora_B) == 0


def test_merged_equals_unmerged_and_unmerge_restores_the_base():
    model = tiny_classifier()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = peftlab.attach(model, "lora", r=4, targets=["all-linear"])
    randomise_B(adapter)
    unmerged = model(TOKENS).logits
    adapter.merge()
    torch.testing.assert_close(model(TOKENS).logits, unmerged, rtol=0, atol=1e-5)
    adapter.unmerge()
    torch.testing.assert_close(model(TOKENS).logits, unmerged, rtol=0, atol=1e-6)
    for name, layer in adapter.layers().items():
        torch.testing.assert_close(layer.base.weight, original[f"{name}.weight"], rtol=0, atol=1e-6)


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", r=4, targets=["query", "value"])
    randomise_B(adapter)
    expected = model(TOKENS).logits
    adapter.merge()
    plain = adapter.unload()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert type(plain.bert.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(plain(TOKENS).logits, expected, rtol=0, atol=1e-5)


def test_merging_twice_or_unmerging_unmerged_is_refused():
    adapter = peftlab.attach(tiny_classifier(), "lora", r=2)
    with pytest.raises(peftlab.PeftlabError):
        adapter.unmerge()
    adapter.merge()
    with pytest.raises(peftlab.PeftlabError):
        adapter.merge()


def test_only_lora_and_the_head_train():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", r=4, targets=["query", "value"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{t}.lora_{ab}" for t in adapter.targets for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    model.train()
    loss = model(TOKENS, labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in expected), name


def test_rank_and_alpha_patterns_apply_per_module():
    model = tiny_classifier()
    adapter = peftlab.attach(
        model,
        "lora",
        r=4,
        alpha=8,
        targets=["query", "value"],
        rank_pattern={"layer.1.*": 2},
        alpha_pattern={"value": 1},
    )
    layers = adapter.layers()
    assert layers["bert.encoder.layer.0.attention.self.query"].r == 4
    assert layers["bert.encoder.layer.1.attention.self.query"].r == 2
    assert layers["bert.encoder.layer.0.attention.self.value"].scaling == pytest.approx(1 / 4)
    assert layers["bert.encoder.layer.1.attention.self.value"].scaling == pytest.approx(1 / 2)


def test_rank_larger_than_the_layer_allows_is_an_error():
    with pytest.raises(InputError, match="rank 40 is larger than layer .* allows .*at most 32"):
        peftlab.attach(tiny_classifier(), "lora", r=40, targets=["query"])


@pytest.mark.parametrize(
    "options, field",
    [({"r": 0}, "r"), ({"alpha": -1.0}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"init": "xavier"}, "init")],
)
def test_bad_hyperparameters_name_the_field(options, field):
    with pytest.raises(InputError, match=field):
        peftlab.attach(tiny_classifier(), "lora", **options)


def test_dropout_only_acts_in_training_mode():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 16), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_attaching_twice_is_refused():
    model = tiny_classifier()
    peftlab.attach(model, "lora", r=2)
    with pytest.raises(InputError, match="already carries"):
        peftlab.attach(model, "lora", r=2)


def test_wrappers_read_missing_attributes_from_their_base():
    model = tiny_classifier()
    peftlab.attach(model, "lora", r=2, targets=["query"])
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, LoraLinear)
    assert query.in_features == 32 and query.weight is query.base.weight
    with pytest.raises(AttributeError):
        query.no_such_attribute  # noqa: B018


def test_base_names_look_through_nested_wrappers():
    from peftlab.core.adapter_file import base_name

    wrappers = {"a.self": None, "a.self.base.query": None}
    assert base_name("a.self.base.query.base.weight", wrappers) == "a.self.query.weight"
    assert base_name("a.self.base.query.lora_A", wrappers) == "a.self.query.lora_A"
    assert base_name("a.self.base.key.weight", wrappers) == "a.self.key.weight"
    assert base_name("b.base.weight", wrappers) == "b.base.weight"  # not a wrapper: a real module called base
    assert base_name("base.weight", {"": None}) == "weight"
