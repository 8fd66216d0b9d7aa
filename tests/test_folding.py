"""Core extensions the soft prompts need: a method's training-only reparameterisation folded away on save
(``Method.fold``, ``Attachment.fold``), ``AdapterLayer.on_unload``, and virtual tokens trimmed from token outputs."""

import json

import torch
from safetensors.torch import load_file

import peftlab
from peftlab.core.virtual_tokens import insert_virtual_tokens
from tests.conftest import tiny_classifier

FAST = ["--epochs", "2", "--batch-size", "16", "--max-length", "32", "--num-virtual-tokens", "4"]


def test_a_run_trains_through_the_mlp_saves_the_prefixes_and_resumes(tiny_model_dir, tiny_csv, cli, tmp_path):
    run = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--data", tiny_csv, "--method", "prefix_tuning", "--encoder-hidden", "16"]
    code, _, err = cli("train", *args, "--out", run, *FAST)
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    mlp = 4 * 32 + (32 * 16 + 16) + (16 * 2 * 2 * 32 + 2 * 2 * 32)  # inputs, hidden, out (2 layers x K, V x 32)
    prefixes, head = 2 * 2 * 4 * 32, 32 * 2 + 2
    params = results["params"]
    assert params["trainable"] == mlp + head  # what the optimiser updated
    assert params["adapter"] == prefixes and params["changed"] == prefixes + head  # what the run leaves
    assert results["adapter_bytes"] < 20_000
    assert not any(".mlp." in k for k in load_file(run / "adapter" / "adapter.safetensors"))
    checkpoint = load_file(run / "checkpoint" / "state.safetensors")
    assert "model.bert.encoder.layer.0.attention.self.mlp.inputs" in checkpoint  # an exact resume needs the MLP
    config = json.loads((run / "config.json").read_text())
    assert config["projection"] is True  # the run's own configuration, not the folded one
    code, _, err = cli("train", "--resume", run)
    assert code == 0, err
    again = json.loads((run / "results.json").read_text())
    assert again["metrics"]["test"] == results["metrics"]["test"] and again["params"] == params


def test_methods_without_fold_save_what_they_train(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "lora", r=2)
    assert adapter.saved_form() == (adapter.config, adapter.state())
    assert not adapter.fold()
    adapter.save(tmp_path / "a")
    assert "trained_as" not in json.loads((tmp_path / "a" / "adapter.json").read_text())


def test_unload_calls_on_unload_before_putting_the_base_back():
    adapter = peftlab.attach(tiny_classifier(), "p_tuning_v2", num_virtual_tokens=2)
    seen = []
    for name, layer in adapter.layers().items():
        original = layer.on_unload
        layer.on_unload = lambda n=name, w=layer, f=original: (seen.append(adapter.model.get_submodule(n) is w), f())
    adapter.unload()
    assert seen == [True, True] and not adapter.layers()
    assert adapter.model.config._attn_implementation != "peftlab"


def test_trimmed_outputs_line_up_with_the_callers_tokens():
    from transformers import BertForTokenClassification

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=3)).eval()
    ids = torch.randint(5, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    virtual = torch.tensor([7, 8])
    literal = torch.cat([ids[:, :1], virtual.expand(2, -1), ids[:, 1:]], 1)
    expected = model(literal, output_hidden_states=True)
    table = model.get_input_embeddings()
    handle = insert_virtual_tokens(model, lambda b: table(virtual).expand(b, -1, -1), 2, at=1, trim_outputs=True)
    out = model(ids, output_hidden_states=True)
    keep = [0, 3, 4, 5, 6, 7]  # the caller's tokens in the widened sequence
    torch.testing.assert_close(out.logits, expected.logits[:, keep], rtol=0, atol=1e-6)
    assert len(out.hidden_states) == len(expected.hidden_states)
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs[:, keep], rtol=0, atol=1e-5)
    handle.remove()
    assert model(ids).logits.shape == (2, 6, 3)
