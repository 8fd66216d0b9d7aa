"""Parameter accounting: trainable, changed, rank of the difference, bytes on disk."""

import torch

import peftlab
from peftlab.core.accounting import folder_bytes
from tests.conftest import tiny_classifier
from tests.test_lora import randomise_B

HEAD = 2 * 32 + 2  # classifier weight + bias of the tiny model


def test_fresh_lora_trains_its_matrices_and_the_head_but_changes_nothing():
    adapter = peftlab.attach(tiny_classifier(), "lora", r=4, targets=["query", "value"])
    counts = peftlab.parameter_counts(adapter)
    lora = 4 * (4 * 32 + 32 * 4)  # four 32x32 layers, A (4, 32) and B (32, 4)
    assert counts["adapter"] == lora
    assert counts["trainable"] == lora + HEAD
    assert counts["changed"] == 0
    assert counts["total"] == counts["base"] + counts["adapter"]


def test_a_trained_lora_changes_every_entry_of_its_matrices_at_rank_r():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", r=3, targets=["query", "value"])
    randomise_B(adapter)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    assert peftlab.changed_parameters(adapter) == 4 * 32 * 32 + 2
    assert set(peftlab.delta_ranks(adapter).values()) == {3}


def test_changed_counts_agree_after_merging():
    adapter = peftlab.attach(tiny_classifier(), "lora", r=2, targets=["query"])
    randomise_B(adapter)
    before = peftlab.changed_parameters(adapter), peftlab.delta_ranks(adapter)
    adapter.merge()
    assert (peftlab.changed_parameters(adapter), peftlab.delta_ranks(adapter)) == before


def test_full_fine_tuning_counts_exactly_the_entries_it_moved():
    model = tiny_classifier()
    adapter = peftlab.attach(model, "full")
    counts = peftlab.parameter_counts(adapter)
    assert counts["trainable"] == counts["total"] == counts["base"]
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[3, 5] += 1.0
        model.bert.encoder.layer[1].attention.self.key.weight[:, 0] += 1.0
    assert peftlab.changed_parameters(adapter) == 1 + 32
    ranks = peftlab.delta_ranks(adapter)
    assert ranks["bert.encoder.layer.0.output.dense.weight"] == 1
    assert ranks["bert.encoder.layer.1.attention.self.key.weight"] == 1
    assert "classifier.weight" not in ranks  # the new head is not a pretrained matrix


def test_folder_bytes_is_the_size_on_disk(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "lora", r=2)
    path = adapter.save(tmp_path / "a")
    assert folder_bytes(path) == sum(f.stat().st_size for f in path.iterdir())
