"""Per-part learning rates: a method's parameter groups reach the optimiser with their scales, keep them through the
schedule and a resume, and are recorded in results.json and shown by ``peftlab methods``."""

import json

import pytest
import torch

import peftlab
from peftlab.core.hooks import TrainingHooks
from peftlab.train.loop import ClassificationTask, TrainSettings
from peftlab.train.step import HEAD_LR_FLOOR, Step
from tests.conftest import tiny_classifier


def step_for(adapter, lr=1e-3, warmup=0.0):
    settings = TrainSettings(warmup=warmup, schedule="linear")
    return Step(adapter, ClassificationTask(2), settings, lr, 10, torch.device("cpu"), TrainingHooks())


def groups_by_pattern(step) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for group in step.optimizer.param_groups:
        out.setdefault(group["name"], []).append(group)
    return out


def test_lora_plus_puts_b_at_its_ratio_of_the_rate_and_a_at_the_rate():
    adapter = peftlab.attach(tiny_classifier(), "lora", r=2, lora_plus_ratio=16.0)
    step = step_for(adapter)
    groups = groups_by_pattern(step)
    b = {id(p) for g in groups["lora_B"] for p in g["params"]}
    named = dict(adapter.model.named_parameters())
    assert b == {id(p) for n, p in named.items() if n.endswith(".lora_B")}
    assert all(g["lr"] == pytest.approx(16e-3) for g in groups["lora_B"])
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups["*"])  # A
    assert all(g["lr"] == pytest.approx(HEAD_LR_FLOOR) for g in groups["classifier.*"])  # the head, new
    a = {id(p) for g in groups["*"] for p in g["params"]}
    head = {id(p) for g in groups["classifier.*"] for p in g["params"]}
    assert {id(p) for n, p in named.items() if n.endswith(".lora_A")} == a
    assert len(b | a | head) == len(b) + len(a) + len(head) == len(adapter.trainable_parameters())


def test_the_scales_survive_the_schedule():
    adapter = peftlab.attach(tiny_classifier(), "lora", r=2, lora_plus_ratio=4.0)
    step = step_for(adapter, warmup=0.5)
    batch = {"input_ids": torch.randint(5, 60, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=int)}
    batch["labels"] = torch.tensor([0, 1, 0, 1])
    for i in range(3):
        step.take(i, [Step.whole(batch)])
        rates = {g["name"]: g["lr"] for g in step.optimizer.param_groups}
        assert rates["lora_B"] == pytest.approx(4 * rates["*"])


def test_the_prefix_mlp_gets_its_own_rate_in_prefix_tuning_mam_and_unipelt():
    for method, options in [
        ("prefix_tuning", {"encoder_hidden": 8, "num_virtual_tokens": 2}),
        ("mam", {"encoder_hidden": 8, "num_virtual_tokens": 2, "bottleneck": 4}),
        ("unipelt", {"encoder_hidden": 8, "num_virtual_tokens": 2, "bottleneck": 4, "lora_r": 2}),
    ]:
        adapter = peftlab.attach(tiny_classifier(), method, mlp_lr_scale=0.1, **options)
        groups = groups_by_pattern(step_for(adapter, lr=2e-3))
        mlp = [p for g in groups["mlp.*"] for p in g["params"]]
        names = {id(p): n for n, p in adapter.model.named_parameters()}
        assert mlp and all(".mlp." in names[id(p)] for p in mlp), method
        assert all(g["lr"] == pytest.approx(2e-4) for g in groups["mlp.*"]), method
        assert all(g["lr"] == pytest.approx(2e-3) for g in groups.get("*", [])), method


def test_without_method_groups_the_optimiser_has_the_head_and_the_rest():
    adapter = peftlab.attach(tiny_classifier(), "lora", r=2)
    groups = step_for(adapter).optimizer.param_groups
    assert [g["name"] for g in groups] == ["classifier.*"] * 2 + ["*"] * 2
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] * 2
    assert [g["lr"] for g in groups] == [HEAD_LR_FLOOR] * 2 + [1e-3] * 2
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])


@pytest.mark.parametrize("method, options", [("lora", {"r": 2}), ("bitfit", {}), ("full", {})])
def test_the_head_learns_at_the_head_rate_and_nothing_else_does(method, options):
    adapter = peftlab.attach(tiny_classifier(), method, **options)
    settings = TrainSettings(warmup=0.0, head_lr=5e-3)
    step = Step(adapter, ClassificationTask(2), settings, 1e-4, 10, torch.device("cpu"), TrainingHooks())
    named = {id(p): n for n, p in adapter.model.named_parameters()}
    for group in step.optimizer.param_groups:
        in_head = {named[id(p)].startswith("classifier.") for p in group["params"]}
        assert in_head <= {group["name"] == "classifier.*"}, method
        assert group["lr"] == pytest.approx(5e-3 if group["name"] == "classifier.*" else 1e-4), method
    assert sum(len(g["params"]) for g in step.optimizer.param_groups) == len(adapter.trainable_parameters())


def test_the_peft_peer_trains_its_head_at_the_head_rate():
    from peft import LoraConfig, get_peft_model

    from peftlab.bench.peer import PeerAttachment

    model = get_peft_model(tiny_classifier(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    peer = PeerAttachment(model, "LORA")
    settings = TrainSettings(warmup=0.0, head_lr=5e-3)
    step = Step(peer, ClassificationTask(2), settings, 1e-4, 10, torch.device("cpu"), TrainingHooks())
    rates = {g["name"]: g["lr"] for g in step.optimizer.param_groups if g["params"]}
    assert rates == {"*.modules_to_save.*": pytest.approx(5e-3), "*": pytest.approx(1e-4)}


def test_a_bad_ratio_is_refused():
    with pytest.raises(peftlab.InputError, match="lora_plus_ratio: expected a positive number"):
        peftlab.attach(tiny_classifier(), "lora", lora_plus_ratio=0.0)


def test_results_record_the_groups_and_methods_shows_them(cli, tiny_model_dir, tiny_csv, tmp_path):
    args = ["train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run", "--max-length", "32"]
    code, _, err = cli(*args, "--max-steps", "4", "--lr", "0.002", "--r", "2", "--lora-plus-ratio", "8")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    recorded = {g["pattern"]: g for g in results["param_groups"]}
    assert recorded["lora_B"]["lr"] == pytest.approx(0.016) and recorded["*"]["lr"] == pytest.approx(0.002)
    assert recorded["classifier.*"]["lr"] == pytest.approx(HEAD_LR_FLOOR)  # the head's floor
    assert sum(g["parameters"] for g in results["param_groups"]) == results["params"]["trainable"]
    code, out, _ = cli("methods", "lora")
    assert code == 0 and "parameter groups" in out and "--lora-plus-ratio" in out


def test_results_record_the_groups_training_used_even_when_the_saved_adapter_is_folded(
    cli, tiny_model_dir, tiny_csv, tmp_path
):
    args = ["train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run", "--max-length", "32"]
    options = ["--method", "prefix_tuning", "--encoder-hidden", "8", "--num-virtual-tokens", "2"]
    code, _, err = cli(*args, *options, "--max-steps", "2", "--lr", "0.01", "--mlp-lr-scale", "0.1")
    assert code == 0, err
    recorded = {g["pattern"]: g for g in json.loads((tmp_path / "run" / "results.json").read_text())["param_groups"]}
    assert recorded["mlp.*"]["lr"] == pytest.approx(0.001)
    assert recorded["classifier.*"]["lr"] == pytest.approx(max(0.01, HEAD_LR_FLOOR))


@pytest.mark.parametrize(
    "method, options, expected",
    [
        ("prompt_tuning", ["--num-virtual-tokens", "2"], "note: prompt tuning learns little on a model of"),
        ("dylora", ["--r", "4", "--frozen"], "note: DyLoRA trains one of its r = 4 rank components per step"),
        ("dylora", ["--r", "4"], None),  # the default trains every component up to the drawn rank
        ("lora", ["--r", "2"], None),
    ],
)
def test_a_method_says_what_to_expect_where_its_paper_warns(cli, tiny_model_dir, tiny_csv, tmp_path, method, options,
                                                              expected):  # fmt: skip
    args = ["train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run", "--max-length", "32"]
    code, _, err = cli(*args, "--method", method, *options, "--max-steps", "8")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    if expected is None:
        assert "note:" not in err and "caution" not in results
    else:
        assert err.count(expected) == 1 and results["caution"] == err.split("note: ", 1)[1].splitlines()[0]


def test_results_record_the_head_rate(cli, tiny_model_dir, tiny_csv, tmp_path):
    args = ["train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "run", "--max-length", "32"]
    code, _, err = cli(*args, "--max-steps", "2", "--lr", "0.001", "--head-lr", "0.005", "--r", "2")
    assert code == 0, err
    recorded = {g["pattern"]: g for g in json.loads((tmp_path / "run" / "results.json").read_text())["param_groups"]}
    assert recorded["classifier.*"]["lr"] == pytest.approx(0.005) and recorded["*"]["lr"] == pytest.approx(0.001)
    code, _, err = cli(*args[:-2], "--out", tmp_path / "bad", "--head-lr", "-1")
    assert code == 2 and "head_lr" in err


def test_the_head_learns_at_least_at_the_floor_and_at_a_higher_run_rate_when_given():
    for lr, expected in [(1e-4, HEAD_LR_FLOOR), (0.05, 0.05)]:
        adapter = peftlab.attach(tiny_classifier(), "lora", r=2)
        rates = {g["name"]: g["lr"] for g in step_for(adapter, lr=lr).optimizer.param_groups}
        assert rates == {"classifier.*": pytest.approx(expected), "*": pytest.approx(lr)}


def test_a_linear_probe_is_all_head_and_learns_at_the_runs_rate():
    adapter = peftlab.attach(tiny_classifier(), "head")
    rates = {g["name"]: g["lr"] for g in step_for(adapter, lr=1e-3).optimizer.param_groups}
    assert rates == {"*": pytest.approx(1e-3)}
