"""AdapterFusion: the fusion attention against a few lines of reference code, stage-one folders read and checked (same
base, same method, no trained LayerNorms), a self-contained fusion file, frozen members, AdapterDrop, the attention
report, and both stages through the CLI. Hugging Face PEFT has no AdapterFusion, so there is no parity test."""

import json
import shutil

import pytest
import torch

import peftlab
from peftlab.errors import InputError
from peftlab.methods.adapter_drop import set_drop
from peftlab.methods.adapter_fusion import FusionConfig, FusionHooks, FusionLayer
from tests.conftest import tiny_classifier
from tests.fusion_members import stage_one
from tests.test_bottleneck_adapters import TOKENS, logits, reference

FFN = [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]


def make(num_labels):
    return tiny_classifier(num_labels=num_labels)


@pytest.fixture()
def members(tmp_path):
    """Three stage-one pfeiffer adapters on heads of 2, 3 and 5 labels."""
    return stage_one(tmp_path / "stage-one", make)


def fused(layer: FusionLayer, h: torch.Tensor) -> torch.Tensor:
    """The fusion at one token, written out: h + sum_n softmax_n((Q h) . (K d_n)) V d_n with d_n = A_n(h)."""
    deltas = [reference(m, h) for m in layer.members]  # each (d,)
    q = layer.query @ h
    s = torch.softmax(torch.stack([q @ (layer.key @ d) for d in deltas]), dim=0)
    return h + sum(s[n] * (layer.value @ deltas[n]) for n in range(len(deltas)))


def test_fusion_layer_is_attention_over_the_adapters_outputs(members):
    adapter = peftlab.attach(tiny_classifier(), "adapter_fusion", adapters=members)
    assert adapter.targets == FFN
    layer = adapter.layers()[FFN[1]]
    with torch.no_grad():
        for p in (layer.query, layer.key, layer.value):
            p.normal_(0, 0.2)
    x = torch.randn(3, 64)  # the FFN's inner activation; layer.base(x) is h, the adapters' input
    out, h = layer(x), layer.base(x)
    for t in range(3):
        torch.testing.assert_close(out[t], fused(layer, h[t]))


def test_a_fresh_fusion_starts_near_the_mean_of_the_adapters(members):
    adapter = peftlab.attach(tiny_classifier(), "adapter_fusion", adapters=members)
    layer = adapter.layers()[FFN[0]]
    assert torch.equal(layer.value, torch.eye(32)) and layer.query.std() < 0.03 and layer.key.std() < 0.03
    with torch.no_grad():
        layer.query.zero_()  # every score 0: a uniform softmax, so h + the mean of the adapters' outputs
    x = torch.randn(4, 64)
    h = layer.base(x)
    torch.testing.assert_close(layer(x), h + sum(reference(m, h) for m in layer.members) / 3)


def test_members_are_copied_frozen_and_the_fusion_file_is_self_contained(members, tmp_path):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "adapter_fusion", adapters=members)
    assert adapter.config.members == ["task0:pfeiffer:4:relu", "task1:pfeiffer:4:relu", "task2:pfeiffer:4:relu"]
    first = peftlab.load_adapter(make(2), members[0]).layers()[FFN[0]].adapter
    copied = adapter.layers()[FFN[0]].members[0]
    for name, value in first.tensors().items():
        assert torch.equal(getattr(copied, name), value) and not getattr(copied, name).requires_grad
    counts = peftlab.parameter_counts(adapter)
    assert counts["trainable"] == 2 * 3 * 32 * 32 + 32 * 2 + 2  # Q, K, V per layer and the head; members frozen
    expected = logits(model)
    adapter.save(tmp_path / "fusion")
    shutil.rmtree(tmp_path / "stage-one")
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "fusion")
    torch.testing.assert_close(logits(loaded.model), expected, rtol=0, atol=0)


def test_houlsby_members_fuse_at_both_places(tmp_path):
    paths = stage_one(tmp_path, make, labels=(2, 4), method="houlsby")
    adapter = peftlab.attach(tiny_classifier(), "adapter_fusion", adapters=paths)
    assert len(adapter.targets) == 4 and "bert.encoder.layer.0.attention.output.dense" in adapter.targets


def test_stage_one_folders_are_checked(members, tmp_path):
    def refused(paths, message):
        with pytest.raises(InputError, match=message):
            peftlab.attach(tiny_classifier(), "adapter_fusion", adapters=paths)

    refused(members[:1], r"adapters: expected two or more stage-one adapter folders")
    refused([members[0], str(tmp_path / "nowhere")], r"nowhere: adapter folder not found")
    wide = stage_one(tmp_path / "wide", lambda n: tiny_classifier(num_labels=n, vocab_size=80), labels=(2,))
    embeddings = r"'bert.embeddings.word_embeddings.weight' is \(64, 32\) here but \(80, 32\) there"
    refused([members[0], *wide], r"wide/task0 was trained on a different base model: parameter " + embeddings)
    houlsby = stage_one(tmp_path / "h", make, labels=(2,), method="houlsby")
    refused([members[0], *houlsby], r"holds a 'houlsby' adapter but the first holds 'pfeiffer'")
    lora = peftlab.attach(make(2), "lora", r=2).save(tmp_path / "lora")
    refused([members[0], str(lora)], r"holds a 'lora' adapter; fusion combines pfeiffer or houlsby")
    norms = stage_one(tmp_path / "n", make, labels=(2,), train_layernorms=True)
    refused([members[0], *norms], r"trained the LayerNorms")


def test_members_without_their_folders_wait_for_the_saved_tensors(members):
    config = FusionConfig(adapters=["gone-a", "gone-b", "gone-c"], members=["a:pfeiffer:4:relu"] * 3)
    adapter = peftlab.attach(tiny_classifier(), "adapter_fusion", config)
    with pytest.raises(InputError, match="the frozen adapters' tensors were never loaded"):
        logits(adapter.model)
    with pytest.raises(InputError, match="members: expected entries NAME:METHOD:SIZE:ACTIVATION"):
        FusionConfig(members=["a-pfeiffer-4", "b:pfeiffer:4:relu"])


def test_training_moves_only_the_fusion_and_the_head(members):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "adapter_fusion", adapters=members)
    before = {k: v.detach().clone() for k, v in adapter.state().items()}
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(input_ids=TOKENS).logits, torch.tensor([0, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in adapter.state().items():
        moved = not torch.equal(value, before[key])
        assert moved == (".members." not in key), key


def test_drop_layers_and_the_attention_report(members):
    model = tiny_classifier()
    plain = logits(model)
    adapter = peftlab.attach(model, "adapter_fusion", adapters=members)
    set_drop(adapter, 2)
    torch.testing.assert_close(logits(model), plain, rtol=0, atol=0)
    set_drop(adapter, 0)
    report = FusionHooks(adapter, adapter.config).report(lambda: logits(model))
    assert report["members"] == ["task0", "task1", "task2"]
    for layer in FFN:
        weights = report["mean_attention"][layer]
        assert list(weights) == ["task0", "task1", "task2"] and abs(sum(weights.values()) - 1) < 1e-3


def test_both_stages_through_the_cli(tiny_model_dir, tiny_csv, cli, tmp_path):
    fast = ["--model", tiny_model_dir, "--data", tiny_csv, "--max-steps", "3", "--batch-size", "8", "--max-length",
            "32", "--lr", "0.01"]  # fmt: skip
    for name in ("one", "two"):
        code, _, err = cli("train", *fast, "--method", "pfeiffer", "--bottleneck", "4", "--out", tmp_path / name)
        assert code == 0, err
    run = tmp_path / "fusion"
    code, _, err = cli("train", *fast, "--method", "adapter_fusion", "--out", run, "--adapters", tmp_path / "one",
                       tmp_path / "two")  # fmt: skip
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["method_report"]["members"] == ["reviews", "reviews_2"]  # named after the runs' data
    config = json.loads((run / "adapter" / "adapter.json").read_text())["config"]
    assert config["members"] == ["reviews:pfeiffer:4:relu", "reviews_2:pfeiffer:4:relu"]
    shutil.rmtree(tmp_path / "one")
    code, out, err = cli("eval", run, "--json")
    assert code == 0, err
    assert json.loads(out)["test"]["accuracy"] == results["metrics"]["test"]["accuracy"]
