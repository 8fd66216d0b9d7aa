"""Mixed-batch multi-adapter inference: every row equals its adapter run alone (or the base for -1)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.compose.multi import MultiLoraLinear, MultiLoraModel
from peftlab.errors import InputError

from .conftest import tiny_classifier


def trained_lora(path, seed: int, num_labels: int = 2, **options):
    """A LoRA adapter with random (non-zero) factors and head, saved to ``path``."""
    attachment = peftlab.attach(tiny_classifier(num_labels=num_labels), "lora", **options)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in attachment.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    attachment.save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    return [
        trained_lora(root / "a", 1, r=2),
        trained_lora(root / "b", 2, r=4, alpha=3.0, rslora=True),
        trained_lora(root / "c", 3, r=3, init="pissa", targets=["query", "value", "dense"]),
    ]


def inputs(rows: int = 7, length: int = 9):
    torch.manual_seed(0)
    ids = torch.randint(5, 64, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1 % rows, 6:] = 0
    mask[4 % rows, 3:] = 0
    return ids, mask


@torch.no_grad()
def reference(folders, ids, mask, adapter_ids):
    """Each row through a fresh model carrying only its own adapter (or none)."""
    outputs = []
    for row, a in enumerate(adapter_ids):
        model = tiny_classifier()
        if a >= 0:
            peftlab.load_adapter(model, folders[a])
        outputs.append(model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits)
    return torch.cat(outputs)


@torch.no_grad()
def test_mixed_batch_equals_each_adapter_alone(folders):
    served = MultiLoraModel.from_folders(tiny_classifier(), folders)
    ids, mask = inputs()
    adapter_ids = [0, 2, -1, 1, 1, -1, 0]
    got = served(input_ids=ids, attention_mask=mask, adapter_ids=adapter_ids).logits
    torch.testing.assert_close(got, reference(folders, ids, mask, adapter_ids), atol=1e-5, rtol=1e-5)
    # names work as ids; different ranks (2, 4, 2r = 6 for PiSSA) are padded to a common 6
    by_name = served(input_ids=ids, attention_mask=mask, adapter_ids=["a", "c", None, "b", "b", None, "a"]).logits
    torch.testing.assert_close(by_name, got)
    layer = served.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, MultiLoraLinear) and layer.down.shape == (4, 32, 6)
    assert not layer.down[3].any() and not layer.up[3].any()  # the "none" slot


@torch.no_grad()
def test_no_ids_is_the_base_and_unload_restores_it(folders):
    base = tiny_classifier()
    ids, mask = inputs()
    expected = base(input_ids=ids, attention_mask=mask).logits
    served = MultiLoraModel.from_folders(tiny_classifier(), folders)
    torch.testing.assert_close(served(input_ids=ids, attention_mask=mask).logits, expected)
    torch.testing.assert_close(served(input_ids=ids, attention_mask=mask, adapter_ids=[-1] * 7).logits, expected)
    plain = served.unload()
    assert not any(isinstance(m, MultiLoraLinear) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, expected)


@torch.no_grad()
def test_bodies_only_for_different_label_sets(folders, tmp_path):
    three = trained_lora(tmp_path / "three", 4, num_labels=3, r=2)
    with pytest.raises(InputError, match="heads=False"):
        MultiLoraModel.from_folders(tiny_classifier(), [folders[0], three])
    served = MultiLoraModel.from_folders(tiny_classifier(), [folders[0], three], heads=False)
    ids, mask = inputs(2)
    got = served(input_ids=ids, attention_mask=mask, adapter_ids=[1, 0]).logits
    # row 0: the 3-class adapter's body under the model's own 2-class head
    body = peftlab.load_adapter(tiny_classifier(num_labels=3), three).model.bert
    expected = tiny_classifier().classifier(body(input_ids=ids[:1], attention_mask=mask[:1]).pooler_output)
    torch.testing.assert_close(got[:1], expected, atol=1e-5, rtol=1e-5)


def test_bad_ids_and_bases(folders, tmp_path):
    served = MultiLoraModel.from_folders(tiny_classifier(), folders)
    ids, mask = inputs(2)
    with pytest.raises(InputError, match="adapter_ids"):
        served(input_ids=ids, attention_mask=mask, adapter_ids=[0, 3])
    with pytest.raises(InputError, match="adapter_ids"):
        served(input_ids=ids, attention_mask=mask, adapter_ids=[0])
    with pytest.raises(InputError, match="no adapter named"):
        served(input_ids=ids, attention_mask=mask, adapter_ids=["a", "zzz"])
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
    )
    with pytest.raises(InputError, match="body"):
        MultiLoraModel.from_folders(other, folders)


@torch.no_grad()
def test_decoder_generation_per_row(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    def llama():
        return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()

    folders = []
    for i, r in enumerate((2, 4)):
        attachment = peftlab.attach(llama(), "lora", r=r, targets=["q_proj", "v_proj", "down_proj"])
        torch.manual_seed(i)
        with torch.no_grad():
            for p in attachment.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.5)
        folders.append(attachment.save(tmp_path / f"l{i}"))
    served = MultiLoraModel.from_folders(llama(), folders)
    prompt = torch.randint(5, 40, (3, 6))
    with served.rows([1, -1, 0]):
        got = served.model.generate(prompt, max_new_tokens=5, do_sample=False)
    for row, a in enumerate([1, -1, 0]):
        model = llama()
        if a >= 0:
            peftlab.load_adapter(model, folders[a])
        alone = model.generate(prompt[row : row + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(got[row : row + 1], alone)
    logits = served(input_ids=prompt, adapter_ids=[1, -1, 0]).logits
    model = llama()
    peftlab.load_adapter(model, folders[1])
    torch.testing.assert_close(logits[:1], model(input_ids=prompt[:1]).logits, atol=1e-5, rtol=1e-5)
