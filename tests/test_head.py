"""The linear probe: only the task head trains, and a model without a head is refused."""

import pytest

import peftlab
from tests.conftest import tiny_classifier


def test_only_the_head_trains():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    assert set(adapter.state()) == trainable and adapter.targets == []
    assert adapter.trainable_count() == model.classifier.weight.numel() + model.classifier.bias.numel()


def test_a_model_without_a_head_is_refused():
    with pytest.raises(peftlab.InputError, match="^head: the model has no task head"):
        peftlab.attach(tiny_classifier(), "head", trainable_modules=[])
