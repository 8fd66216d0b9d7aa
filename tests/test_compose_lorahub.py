"""LoRAHub: the weighted combination of LoRA bodies, the ridge head's leave-one-out error, the gradient-free search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftlab.compose.library import read_library
from peftlab.compose.lorahub import (
    LoraHub,
    accuracy,
    one_plus_one_es,
    ridge_loo_error,
    ridge_predict,
    search,
    standardise,
)
from peftlab.compose.merge import merge_loras, merged_attachment
from peftlab.data.batches import encode
from peftlab.data.classification import Example

from .conftest import sentences, tiny_classifier
from .test_compose_multi import inputs, trained_lora


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return read_library([trained_lora(root / "a", 1, r=2), trained_lora(root / "b", 2, num_labels=3, r=3)])


@torch.no_grad()
def test_combined_bodies_equal_the_weighted_merge(modules):
    weights = [0.7, -1.2]
    hub = LoraHub(tiny_classifier(), modules)
    hub.weights = torch.tensor(weights)
    merged = merged_attachment(tiny_classifier(), modules, merge_loras(modules, weights, rank=5), head=None)
    ids, mask = inputs()
    torch.testing.assert_close(
        hub.model(input_ids=ids, attention_mask=mask).logits,
        merged.model(input_ids=ids, attention_mask=mask).logits,
        atol=1e-5,
        rtol=1e-5,
    )
    hub.weights = torch.zeros(2)  # w = 0 is the base model
    torch.testing.assert_close(
        hub.model(input_ids=ids, attention_mask=mask).logits,
        tiny_classifier()(input_ids=ids, attention_mask=mask).logits,
    )


def test_leave_one_out_error_is_the_refit_error():
    torch.manual_seed(0)
    x, labels = torch.randn(12, 5), [0, 1, 2] * 4
    fast = ridge_loo_error(x, labels, 3, ridge=0.1)
    slow = []
    for i in range(12):
        keep = [j for j in range(12) if j != i]
        # the same model fitted without row i: features standardised on all rows, as ridge_loo_error does
        (xs,) = standardise(x.double())
        k = xs[keep] @ xs[keep].T + 1.0
        lam = 0.1 * (xs @ xs.T + 1.0).diagonal().mean()
        y = torch.nn.functional.one_hot(torch.tensor([labels[j] for j in keep]), 3).double()
        dual = torch.linalg.solve(k + lam * torch.eye(11, dtype=k.dtype), y)
        scores = (xs[i] @ xs[keep].T + 1.0) @ dual
        slow.append(float(((torch.nn.functional.one_hot(torch.tensor(labels[i]), 3) - scores) ** 2).sum()))
    assert fast == pytest.approx(float(np.mean(slow)), rel=1e-6)
    separable = torch.tensor([[float(c == j) * 5 for j in range(3)] for c in labels]) + 0.01 * torch.randn(12, 3)
    assert (ridge_predict(separable, labels, 3, separable, 0.1) == torch.tensor(labels)).all()


def test_one_plus_one_es_finds_a_minimum_within_bounds():
    target = np.array([0.8, -0.5, 0.0])
    result = one_plus_one_es(lambda w: float(((w - target) ** 2).sum()), 3, budget=200, seed=1)
    assert np.allclose(result.weights, target, atol=0.05)
    assert all(a >= b for a, b in zip(result.history, result.history[1:], strict=False))
    again = one_plus_one_es(lambda w: float(((w - target) ** 2).sum()), 3, budget=200, seed=1)
    assert again.weights == result.weights  # seeded
    clipped = one_plus_one_es(lambda w: float(-w.sum()), 2, budget=100, seed=0)
    assert max(abs(v) for v in clipped.weights) <= 1.5


def test_the_search_starts_from_the_best_start_and_never_ends_worse():
    """A start better than 0 (a single module, e_i) is where the search begins: with a budget of only the starts
    the result is the best start, and a longer search never ends above it."""
    objective = lambda w: float(((w - np.array([0.0, 1.0, 0.0])) ** 2).sum()) + 0.01  # noqa: E731
    starts = list(np.eye(3))
    only = one_plus_one_es(objective, 3, budget=4, seed=0, starts=starts)
    assert only.weights == [0.0, 1.0, 0.0] and len(only.history) == 4
    longer = one_plus_one_es(objective, 3, budget=30, seed=0, starts=starts)
    assert longer.objective <= objective(np.eye(3)[1]) and len(longer.history) == 30


def test_search_improves_on_zero_shot(modules, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = sentences(40, seed=3)
    encoded = encode([Example(t, int(label == "pos")) for t, label in rows], tokenizer, 16)
    hub = LoraHub(tiny_classifier(), modules)
    k = list(range(16))
    result = search(hub, encoded, k, classes=2, budget=12, seed=0)
    assert len(result.weights) == 2 and result.history[-1] <= result.history[0]
    assert all(abs(w) <= 1.5 for w in result.weights)
    score = accuracy(hub, result.weights, encoded, k, encoded, range(16, 40), 2)
    assert 0.0 <= score <= 1.0
