"""Weighted LoRA merge with SVD re-compression: the merged update against the explicit weighted sum."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.compose.library import read_library, read_lora
from peftlab.compose.merge import merge_loras, merged_attachment
from peftlab.errors import InputError

from .conftest import tiny_classifier
from .test_compose_multi import inputs, trained_lora


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return [
        trained_lora(root / "a", 1, r=2),
        trained_lora(root / "b", 2, r=4, alpha=3.0, rslora=True),
        trained_lora(root / "c", 3, r=3, init="pissa"),
    ]


def deltas(folder) -> dict[str, torch.Tensor]:
    """Each adapted module's update, from the adapter loaded into a model (the LoRA layer's own delta_weight)."""
    attachment = peftlab.load_adapter(tiny_classifier(), folder)
    return {name: layer.delta_weight().detach() for name, layer in attachment.layers().items()}


@torch.no_grad()
def test_one_adapter_at_full_rank_reproduces_it(folders, tmp_path):
    modules = read_library(folders[:1])
    merged = merge_loras(modules, [1.0], rank=2)
    assert merged.total_error < 1e-6
    attachment = merged_attachment(tiny_classifier(), modules, merged, head=0)
    attachment.save(tmp_path / "merged")
    again = peftlab.load_adapter(tiny_classifier(), tmp_path / "merged")
    original = peftlab.load_adapter(tiny_classifier(), folders[0])
    ids, mask = inputs()
    torch.testing.assert_close(
        again.model(input_ids=ids, attention_mask=mask).logits,
        original.model(input_ids=ids, attention_mask=mask).logits,
        atol=1e-5,
        rtol=1e-5,
    )
    peftlab.export_hf(again, tmp_path / "hf", task_type="SEQ_CLS")  # an ordinary LoRA adapter


@torch.no_grad()
def test_weighted_sum_within_the_reported_svd_error(folders):
    modules = read_library(folders)
    weights = [0.5, -1.5, 2.0]
    merged = merge_loras(modules, weights, rank=3)
    reference = [deltas(f) for f in folders]
    tails, totals = 0.0, 0.0
    for name, (down, up) in merged.factors.items():
        target = sum(w * d[name] for w, d in zip(weights, reference, strict=True)).double()  # (out, in)
        error = torch.linalg.matrix_norm(target - (up @ down).double()) / torch.linalg.matrix_norm(target)
        s = torch.linalg.svdvals(target)
        best = (s[3:] ** 2).sum().sqrt() / (s**2).sum().sqrt()  # Eckart-Young: the best rank-3 error
        assert error.item() == pytest.approx(merged.errors[name], abs=1e-5)
        assert error.item() == pytest.approx(best.item(), abs=1e-5)
        tails, totals = tails + (s[3:] ** 2).sum().item(), totals + (s**2).sum().item()
    assert 0 < merged.total_error == pytest.approx((tails / totals) ** 0.5, abs=1e-5)


@torch.no_grad()
def test_error_is_zero_when_the_rank_covers_the_sum(folders):
    modules = read_library(folders)
    weights = [1.0, 0.25, -0.5]
    merged = merge_loras(modules, weights, rank=2 + 4 + 6)  # PiSSA enters with rank 2r = 6
    assert merged.total_error < 1e-6 and max(merged.errors.values()) < 1e-6
    reference = [deltas(f) for f in folders]
    attachment = merged_attachment(tiny_classifier(), modules, merged, head=None)
    assert attachment.trainable_modules == []
    for name, layer in attachment.layers().items():
        target = sum(w * d[name] for w, d in zip(weights, reference, strict=True))
        torch.testing.assert_close(layer.delta_weight(), target, atol=1e-5, rtol=1e-5)


def test_errors_name_what_is_wrong(folders, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    peftlab.attach(other, "lora", r=2).save(tmp_path / "other")
    with pytest.raises(InputError, match="different base model"):
        read_library([folders[0], tmp_path / "other"])
    peftlab.attach(tiny_classifier(), "ia3").save(tmp_path / "ia3")
    with pytest.raises(InputError, match="cannot be composed"):
        read_lora(tmp_path / "ia3")
    modules = read_library(folders[:2])
    with pytest.raises(InputError, match="weights"):
        merge_loras(modules, [1.0], rank=2)
    with pytest.raises(InputError, match="rank"):
        merge_loras(modules, [1.0, 1.0], rank=0)
