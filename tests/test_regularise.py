"""L2-SP and EWC: the penalty's gradient is the paper's, it keeps a run near theta_0, it resumes exactly, and it
refuses a method with nothing to regularise."""

import pytest
import torch

import peftlab
from peftlab.core.hooks import TrainContext, pretrained_parameters
from peftlab.run import RunOptions, build_model, prepare_data
from peftlab.train.loop import ClassificationTask, TrainSettings, make_hooks
from peftlab.train.regularise import EWC, L2SP
from tests.conftest import tiny_classifier
from tests.short_fit import run_fit


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tiny_csv):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    return options, prepare_data(options, quiet=True)


def perturb(adapter):
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        adapter.model.zero_grad(set_to_none=True)


def test_l2sp_gradient_is_2_lambda_times_the_distance_to_pretrained():
    torch.manual_seed(0)
    adapter = peftlab.attach(tiny_classifier(), "full")
    perturb(adapter)
    hooks = L2SP(adapter, 0.3)
    hooks.penalty().backward()
    params = pretrained_parameters(adapter)
    assert params and not any(k.startswith("classifier.") for k in params)  # the new head has no theta_0
    for name, p in params.items():
        torch.testing.assert_close(p.grad, 2 * 0.3 * (p.detach() - adapter.initial[name]))
    assert adapter.model.classifier.weight.grad is None
    expected = sum(((p.detach() - adapter.initial[k]) ** 2).sum() for k, p in params.items()) * 0.3
    torch.testing.assert_close(hooks.penalty().detach(), expected)


def test_ewc_gradient_is_2_lambda_fisher_times_the_distance(prepared):
    options, data = prepared
    adapter = peftlab.attach(build_model(options, data, 0), "full")
    train = data.splits["train"]

    def batches(examples, batch_size):
        for i in range(examples):
            yield train.batch([i])

    def loss(batch):
        return ClassificationTask(2).loss(adapter.model, batch)

    hooks = EWC(adapter, 50.0, examples=6)
    hooks.prepare(TrainContext(adapter, loss, batches, 1, None, torch.device("cpu")))
    params = pretrained_parameters(adapter)
    # the reference Fisher: mean over the 6 examples of the squared gradient of -log p(y | x)
    reference = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(6):
        adapter.model.zero_grad(set_to_none=True)
        loss(train.batch([i])).backward()
        for k, p in params.items():
            reference[k] += p.grad**2 / 6
    for k in params:
        torch.testing.assert_close(hooks.fisher[k], reference[k], rtol=1e-5, atol=1e-12)
    perturb(adapter)
    hooks.penalty().backward()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, 2 * 50.0 * reference[name] * (p.detach() - adapter.initial[name]))


def squared_distance(adapter):
    return sum(((p.detach() - adapter.initial[k]) ** 2).sum() for k, p in pretrained_parameters(adapter).items())


def test_a_run_with_l2sp_stays_closer_to_the_pretrained_weights(prepared, tmp_path):
    options, data = prepared
    free = peftlab.attach(build_model(options, data, 0), "full")
    run_fit(free, data, tmp_path / "free", steps=8)
    held = peftlab.attach(build_model(options, data, 0), "full")
    run_fit(held, data, tmp_path / "held", steps=8, l2sp=1.0)
    assert squared_distance(held) < 0.5 * squared_distance(free)


def test_ewc_resumes_bit_for_bit_with_its_fisher_from_the_checkpoint(prepared, tmp_path):
    options, data = prepared
    straight = peftlab.attach(build_model(options, data, 0), "bitfit")
    run_fit(straight, data, tmp_path / "a", steps=4, ewc=100.0, ewc_examples=8)
    interrupted = peftlab.attach(build_model(options, data, 0), "bitfit")
    run_fit(interrupted, data, tmp_path / "b", steps=2, ewc=100.0, ewc_examples=8)
    resumed = peftlab.attach(build_model(options, data, 0), "bitfit")
    run_fit(resumed, data, tmp_path / "b", steps=4, resume=True, ewc=100.0, ewc_examples=8)
    for k, v in straight.state().items():
        assert torch.equal(resumed.state()[k], v), k


@pytest.mark.parametrize("method", ["lora", "head"])
@pytest.mark.parametrize("flag", ["l2sp", "ewc"])
def test_a_method_without_pretrained_parameters_has_nothing_to_regularise(method, flag):
    adapter = peftlab.attach(tiny_classifier(), method)
    with pytest.raises(peftlab.InputError, match=f"^{flag}: method '{method}' trains no pretrained parameter"):
        make_hooks(adapter, TrainSettings(**{flag: 0.1}))


def test_regularisers_combine_with_a_methods_own_hooks():
    adapter = peftlab.attach(tiny_classifier(), "child_tuning_f")
    hooks = make_hooks(adapter, TrainSettings(l2sp=0.1, ewc=1.0))
    assert [type(h).__name__ for h in hooks.hooks] == ["BernoulliGradientMask", "L2SP", "EWC"]


@pytest.mark.parametrize("field", ["l2sp", "ewc"])
def test_a_negative_strength_is_refused(field):
    with pytest.raises(peftlab.InputError, match=f"^{field}: expected a number >= 0"):
        TrainSettings(**{field: -1.0})


def test_the_cli_takes_the_regularisers_and_refuses_them_without_pretrained_parameters(
    tiny_model_dir, tiny_csv, cli, tmp_path
):
    common = ["--model", tiny_model_dir, "--data", tiny_csv, "--max-length", "32", "--max-steps", "3"]
    code, _, err = cli("train", *common, "--method", "lora", "--l2sp", "0.1", "--out", tmp_path / "lora")
    assert code == 2 and err.startswith("error: l2sp: method 'lora' trains no pretrained parameter")
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli(
        "train", *common, "--method", "bitfit", "--l2sp", "0.1", "--ewc", "10", "--ewc-examples", "8",
        "--out", tmp_path / "bitfit",
    )  # fmt: skip
    assert code == 0, err
    import json

    results = json.loads((tmp_path / "bitfit" / "results.json").read_text())
    assert set(results["method_report"]) == {"l2sp", "ewc"}
    assert results["method_report"]["ewc"]["fisher_max"] > 0
    assert results["method_report"]["ewc"]["fisher_examples_used"] == 8
