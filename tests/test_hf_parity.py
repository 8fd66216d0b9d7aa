"""Parity with Hugging Face PEFT: the same LoRA weights give the same outputs in both libraries, both ways."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftlab
from peftlab.errors import InputError
from tests.conftest import tiny_classifier
from tests.test_lora import TOKENS, randomise_B


def peft_logits(model, inputs=TOKENS):
    with torch.no_grad():
        return model(input_ids=inputs).logits


@pytest.mark.parametrize(
    "options",
    [
        {"r": 4, "alpha": 8, "targets": ["query", "value"]},
        {"r": 4, "alpha": 16, "rslora": True, "targets": ["all-linear"]},
        {
            "r": 4,
            "alpha": 8,
            "targets": ["query", "value", "dense"],
            "rank_pattern": {"layer.1.*": 2},
            "alpha_pattern": {"value": 3.0},
        },
    ],
)
def test_peftlab_adapter_loads_in_peft_with_the_same_outputs(tmp_path, options):
    model = tiny_classifier()
    adapter = peftlab.attach(model, "lora", **options)
    randomise_B(adapter)
    with torch.no_grad():
        model.classifier.weight.mul_(-2)
    expected = peft_logits(model)
    peftlab.export_hf(adapter, tmp_path / "hf", task_type="SEQ_CLS")
    theirs = PeftModel.from_pretrained(tiny_classifier(), tmp_path / "hf").eval()
    torch.testing.assert_close(peft_logits(theirs), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False),
        LoraConfig(
            r=8,
            lora_alpha=4,
            target_modules=["query", "key", "dense"],
            use_rslora=True,
            rank_pattern={"attention.output.dense": 2},
            alpha_pattern={"key": 7},
            task_type="SEQ_CLS",
            init_lora_weights=False,
        ),
    ],
)
def test_peft_adapter_loads_here_with_the_same_outputs(tmp_path, config):
    theirs = get_peft_model(tiny_classifier(), config)
    with torch.no_grad():  # a trained head too
        for name, p in theirs.named_parameters():
            if "classifier" in name and p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.eval()
    expected = peft_logits(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = peftlab.import_hf(tiny_classifier(), tmp_path / "hf")
    torch.testing.assert_close(peft_logits(ours.model), expected, rtol=0, atol=1e-6)
    assert ours.trainable_modules == ["classifier"]
    # and it round-trips through peftlab's own format
    ours.save(tmp_path / "ours")
    again = peftlab.load_adapter(tiny_classifier(), tmp_path / "ours")
    torch.testing.assert_close(peft_logits(again.model), expected, rtol=0, atol=1e-6)


def test_unsupported_peft_options_are_named(tmp_path):
    theirs = get_peft_model(tiny_classifier(), LoraConfig(r=2, target_modules=["query"], layers_to_transform=[0]))
    theirs.save_pretrained(tmp_path / "partial")
    with pytest.raises(InputError, match="layers_to_transform is set"):
        peftlab.import_hf(tiny_classifier(), tmp_path / "partial")


def test_unsupported_peft_kinds_are_named(tmp_path):
    (tmp_path / "loha").mkdir()
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(InputError, match="PEFT adapter kind 'LOHA' is not supported .supported: .*LORA"):
        peftlab.import_hf(tiny_classifier(), tmp_path / "loha")


def test_pickle_adapters_are_never_loaded(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match="pickle files are never loaded"):
        peftlab.import_hf(tiny_classifier(), folder)


def test_non_lora_methods_cannot_be_exported(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "full")
    with pytest.raises(InputError, match="'full' cannot be written in the Hugging Face PEFT format"):
        peftlab.export_hf(adapter, tmp_path / "x")
