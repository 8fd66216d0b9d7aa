"""Child-Tuning_F and Child-Tuning_D against the paper's equations, written out here with plain torch."""

import pytest
import torch

import peftlab
from peftlab.core.hooks import TrainContext, pretrained_parameters
from peftlab.methods.gradient_masks import top_share_masks
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import ClassificationTask, TrainSettings, make_hooks
from tests.conftest import tiny_classifier
from tests.short_fit import run_fit


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    return options, prepare_data(options, quiet=True)


def test_child_tuning_f_masks_and_rescales_each_gradient_with_a_fresh_bernoulli_draw():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "child_tuning_f", p_f=0.3)
    assert adapter.trainable_count() == sum(p.numel() for p in model.parameters())  # every entry may change
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(7)
    hooks = make_hooks(adapter, TrainSettings())
    torch.manual_seed(8)  # the global RNG plays no part: the draws depend on the seed taken at construction and step
    hooks.after_backward(0)
    # reference: g <- g * M / p_F, M ~ Bernoulli(p_F) drawn parameter by parameter from the step's generator
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    kept = total = 0
    for name, p in model.named_parameters():
        if name.startswith("classifier."):
            assert torch.equal(p.grad, grads[name])  # the head is not masked
            continue
        mask = torch.bernoulli(torch.full_like(p, 0.3), generator=generator)
        torch.testing.assert_close(p.grad, grads[name] * mask / 0.3)
        kept += int(mask.sum())
        total += mask.numel()
    assert 0.28 < kept / total < 0.32
    weight = model.bert.embeddings.word_embeddings.weight
    first = weight.grad != 0
    weight.grad = grads["bert.embeddings.word_embeddings.weight"].clone()
    hooks.after_backward(1)
    assert not torch.equal(weight.grad != 0, first)  # the next step draws a new mask


def test_child_tuning_f_resumes_bit_for_bit(prepared, tmp_path):
    options, data = prepared
    straight = peftlab.attach(build_model(options, data, 0), "child_tuning_f")
    run_fit(straight, data, tmp_path / "a", steps=4)
    interrupted = peftlab.attach(build_model(options, data, 0), "child_tuning_f")
    run_fit(interrupted, data, tmp_path / "b", steps=2)
    torch.manual_seed(999)  # a different RNG state now: the checkpoint must restore it
    resumed = peftlab.attach(build_model(options, data, 0), "child_tuning_f")
    run_fit(resumed, data, tmp_path / "b", steps=4, resume=True)
    for k, v in straight.state().items():
        assert torch.equal(resumed.state()[k], v), k


def reference_fisher(model, params, examples):
    """F_i = mean over examples of (d log p(y|x) / d theta_i)^2, one example at a time."""
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()
    for batch in examples:
        model.zero_grad(set_to_none=True)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        log_p = torch.log_softmax(model(**inputs).logits, -1)[0, batch["labels"][0]]
        (-log_p).backward()
        for k, p in params.items():
            fisher[k] += p.grad**2 / len(examples)
    model.zero_grad(set_to_none=True)
    return fisher


def test_child_tuning_d_selects_the_top_p_d_share_by_empirical_fisher(prepared):
    options, data = prepared
    adapter = peftlab.attach(build_model(options, data, 0), "child_tuning_d", p_d=0.2, fisher_examples=10)
    train = data.splits["train"]
    examples = [train.batch([i]) for i in range(10)]
    ctx = TrainContext(
        adapter,
        lambda batch: ClassificationTask(2).loss(adapter.model, batch),
        lambda n, batch_size: iter(examples[:n]),
        1,
        None,
        torch.device("cpu"),
    )
    make_hooks(adapter, TrainSettings()).prepare(ctx)
    params = pretrained_parameters(adapter)
    fisher = reference_fisher(adapter.model, params, examples)
    assert set(adapter.masks) == set(params)  # every pretrained parameter, and not the head
    everything = torch.cat([f.reshape(-1) for f in fisher.values()])
    keep = round(0.2 * everything.numel())
    threshold = everything.sort(descending=True).values[keep - 1]
    assert sum(int(m.sum()) for m in adapter.masks.values()) == keep
    for k, mask in adapter.masks.items():
        # one global threshold; entries within float rounding of it may go either way
        assert torch.all(fisher[k][mask] >= threshold * (1 - 1e-4)), k
        assert torch.all(fisher[k][~mask] <= threshold * (1 + 1e-4)), k
    head = sum(p.numel() for p in adapter.model.classifier.parameters())
    assert adapter.trainable_count() == keep + head


def test_the_global_threshold_may_leave_a_tensor_without_entries():
    scores = {"a": torch.tensor([1.0, 5.0, 3.0]), "b": torch.tensor([[4.0, 2.0], [0.0, 0.5]])}
    masks = top_share_masks(scores, 3 / 7)
    assert masks["a"].tolist() == [False, True, True] and masks["b"].tolist() == [[True, False], [False, False]]
    masks = top_share_masks(scores, 2 / 7)
    assert masks["a"].tolist() == [False, True, False] and masks["b"].tolist() == [[True, False], [False, False]]
    assert not top_share_masks({"a": torch.tensor([9.0]), "b": torch.tensor([1.0, 2.0])}, 0.3)["b"].any()


@pytest.mark.parametrize("options, message", [({"p_d": 0}, "^p_d: expected"), ({"fisher_examples": 0}, "^fisher_")])
def test_child_tuning_d_options_are_checked(options, message):
    with pytest.raises(peftlab.InputError, match=message):
        peftlab.attach(tiny_classifier(), "child_tuning_d", **options)


@pytest.mark.parametrize("p_f", [0, 1.5])
def test_child_tuning_f_p_f_is_a_probability(p_f):
    with pytest.raises(peftlab.InputError, match="^p_f: expected a probability in"):
        peftlab.attach(tiny_classifier(), "child_tuning_f", p_f=p_f)
