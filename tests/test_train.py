"""The shared training loop: it learns, accumulates gradients exactly, resumes bit for bit, stops on NaN."""

import pytest
import torch

from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.core.attach import attach
from peftlab.errors import PeftlabError
from peftlab.methods.lora import LoraConfig
from peftlab.run import RunOptions, build_model, prepare_data, run_training
from peftlab.train.loop import ClassificationTask, TrainSettings, fit
from tests.short_fit import crash_after_checkpoint


def options(tiny_model_dir, tiny_csv, out, **kw):
    return RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), out=str(out), max_length=32, **kw)


def test_lora_learns_the_tiny_task(tiny_model_dir, tiny_csv, tmp_path):
    settings = TrainSettings(epochs=4, batch_size=16, lr=1e-2, seed=0)
    results = run_training(
        options(tiny_model_dir, tiny_csv, tmp_path / "run"), settings, LoraConfig(r=4), show_progress=False
    )
    losses = [h["train_loss"] for h in results["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert results["metrics"]["test"]["accuracy"] >= 0.9
    assert results["metrics"]["validation"] == max(
        (h["validation"] for h in results["history"]), key=lambda m: m["accuracy"]
    )


def _one_step(tiny_model_dir, tiny_csv, tmp_path, batch_size, grad_accum):
    opts = options(tiny_model_dir, tiny_csv, tmp_path)
    prepared = prepare_data(opts, quiet=True)
    model = build_model(opts, prepared, 0)
    adapter = attach(model, "lora", LoraConfig(r=4))
    with torch.no_grad():
        for layer in adapter.layers().values():
            layer.lora_B.normal_()
    settings = TrainSettings(max_steps=1, batch_size=batch_size, grad_accum=grad_accum, warmup=0, lr=1e-2)
    fit(
        adapter,
        ClassificationTask(2),
        prepared.splits["train"],
        prepared.splits["validation"],
        settings,
        1e-2,
        tmp_path / f"ckpt-{batch_size}",
        lambda m, s: None,
        torch.device("cpu"),
        show_progress=False,
    )
    return {k: v.detach().clone() for k, v in adapter.state().items()}


def test_gradient_accumulation_equals_the_large_batch(tiny_model_dir, tiny_csv, tmp_path):
    big = _one_step(tiny_model_dir, tiny_csv, tmp_path, batch_size=8, grad_accum=1)
    accumulated = _one_step(tiny_model_dir, tiny_csv, tmp_path, batch_size=4, grad_accum=2)
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)


def test_an_interrupted_run_resumes_bit_for_bit(tiny_model_dir, tiny_csv, tmp_path):
    settings = TrainSettings(epochs=2, batch_size=16, lr=1e-2, checkpoint_every=5, seed=3)
    reference = run_training(
        options(tiny_model_dir, tiny_csv, tmp_path / "a"), settings, LoraConfig(r=4, dropout=0.1), show_progress=False
    )

    with pytest.raises(KeyboardInterrupt), crash_after_checkpoint(15):
        run_training(
            options(tiny_model_dir, tiny_csv, tmp_path / "b"),
            settings,
            LoraConfig(r=4, dropout=0.1),
            show_progress=False,
        )
    resumed = run_training(
        options(tiny_model_dir, tiny_csv, tmp_path / "b"),
        settings,
        LoraConfig(r=4, dropout=0.1),
        resume=True,
        show_progress=False,
    )
    a = read_tensors(tmp_path / "a" / "adapter" / WEIGHTS_FILE)
    b = read_tensors(tmp_path / "b" / "adapter" / WEIGHTS_FILE)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["steps"] == reference["steps"]


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = ClassificationTask.loss

    def loss_turning_nan(self, model, batch):
        calls["n"] += 1
        value = real_loss(self, model, batch)
        return value * float("nan") if calls["n"] > 6 else value

    monkeypatch.setattr(ClassificationTask, "loss", loss_turning_nan)
    settings = TrainSettings(epochs=2, batch_size=16, lr=1e-2, checkpoint_every=3)
    with pytest.raises(PeftlabError, match="training diverged at step 7: loss is nan; the last good checkpoint"):
        run_training(
            options(tiny_model_dir, tiny_csv, tmp_path / "run"), settings, LoraConfig(r=4), show_progress=False
        )
    assert (tmp_path / "run" / "checkpoint" / "trainer.json").exists()
    assert '"step": 6' in (tmp_path / "run" / "checkpoint" / "trainer.json").read_text()


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("lr", -1.0), ("batch_size", 0), ("grad_accum", 0), ("warmup", 1.5), ("max_grad_norm", -1.0)],
)
def test_bad_training_settings_name_the_field(field, value):
    with pytest.raises(PeftlabError, match=field):
        TrainSettings(**{field: value})


def test_bf16_autocast_trains(tiny_model_dir, tiny_csv, tmp_path):
    settings = TrainSettings(epochs=1, batch_size=16, lr=1e-2, precision="bf16")
    results = run_training(
        options(tiny_model_dir, tiny_csv, tmp_path / "bf16"), settings, LoraConfig(r=4), show_progress=False
    )
    assert results["steps"] == 12 and results["metrics"]["test"]["examples"] == 24


def test_compiled_training_takes_the_same_steps(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    """--compile trains through a torch.compile wrapper (here the aot_eager backend: no C++ toolchain needed) and
    takes the same steps as eager training; the adapter is saved from the plain model."""
    real_compile, compiled = torch.compile, []

    def compile_for_test(model):
        compiled.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_for_test)
    runs = {}
    for flag in (False, True):
        settings = TrainSettings(epochs=1, batch_size=16, lr=1e-2, compile=flag)
        runs[flag] = run_training(
            options(tiny_model_dir, tiny_csv, tmp_path / str(flag)), settings, LoraConfig(r=4), show_progress=False
        )
    assert len(compiled) == 1
    eager, fused = ([h["train_loss"] for h in runs[flag]["history"]] for flag in (False, True))
    assert eager == pytest.approx(fused, rel=1e-5)
    saved = {flag: read_tensors(tmp_path / str(flag) / "adapter" / WEIGHTS_FILE) for flag in (False, True)}
    assert saved[True].keys() == saved[False].keys()
    for key in saved[False]:
        torch.testing.assert_close(saved[True][key], saved[False][key], rtol=1e-4, atol=1e-5)
