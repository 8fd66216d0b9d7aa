"""--group-by-length: each step draws examples of similar length; the epoch is still a permutation, every step but
the last is full, and an interrupted run resumes bit for bit."""

from __future__ import annotations

import random

import pytest
import torch

from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.data.batches import length_grouped
from peftlab.methods.lora import LoraConfig
from peftlab.run import run_training
from peftlab.train.loop import TrainSettings
from tests.short_fit import crash_after_checkpoint
from tests.test_train import options


def padded_tokens(order, lengths, per_step):
    steps = [order[k : k + per_step] for k in range(0, len(order), per_step)]
    return sum(len(s) * max(lengths[i] for i in s) for s in steps)


def test_length_grouped_is_a_permutation_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(3, 64) for _ in range(1000)]
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    grouped = length_grouped(order, lengths, 32, torch.Generator().manual_seed(2), window_steps=8)
    assert sorted(grouped) == list(range(1000))
    assert grouped == length_grouped(order, lengths, 32, torch.Generator().manual_seed(2), window_steps=8)
    assert grouped[-8:] == sorted(order[-(1000 % 256) :], key=lambda i: lengths[i])[-8:]  # the short step stays last
    assert padded_tokens(grouped, lengths, 32) < 0.75 * padded_tokens(order, lengths, 32)


def test_a_length_grouped_run_resumes_bit_for_bit(tiny_model_dir, tiny_csv, tmp_path):
    settings = TrainSettings(epochs=2, batch_size=16, lr=1e-2, checkpoint_every=5, seed=3, group_by_length=True)
    config = LoraConfig(r=4)
    reference = run_training(options(tiny_model_dir, tiny_csv, tmp_path / "a"), settings, config, show_progress=False)
    with pytest.raises(KeyboardInterrupt), crash_after_checkpoint(5):
        run_training(options(tiny_model_dir, tiny_csv, tmp_path / "b"), settings, config, show_progress=False)
    resumed = run_training(
        options(tiny_model_dir, tiny_csv, tmp_path / "b"), settings, config, resume=True, show_progress=False
    )
    a = read_tensors(tmp_path / "a" / "adapter" / WEIGHTS_FILE)
    b = read_tensors(tmp_path / "b" / "adapter" / WEIGHTS_FILE)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["metrics"] == reference["metrics"]
