"""P-tuning v1: the prompt encoder's equations, parity with Hugging Face PEFT's PromptEncoder (LSTM and MLP), the
position of the prompt, and the encoder folded into the virtual tokens when the adapter is saved."""

import json

import pytest
import torch
from peft import PeftModel, PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file

import peftlab
from peftlab.errors import InputError
from peftlab.methods.p_tuning import PromptEncoder
from tests.conftest import tiny_classifier
from tests.test_attention import tiny_llama
from tests.test_prompt_tuning import randomise, tokens

M = 4
PROMPT = "bert.embeddings.word_embeddings.prompt"


def soft_prompt(adapter):
    (layer,) = adapter.layers().values()
    return layer


def test_encoders_compute_the_papers_equations():
    torch.manual_seed(0)
    mlp = PromptEncoder(M, 8, "mlp", 6)
    (w1, b1), (w2, b2), (w3, b3) = [(mlp.head[i].weight, mlp.head[i].bias) for i in (0, 2, 4)]
    u = mlp.inputs
    expected = (torch.relu(torch.relu(u @ w1.T + b1) @ w2.T + b2)) @ w3.T + b3  # h_i = W3 relu(W2 relu(W1 u_i))
    torch.testing.assert_close(mlp(), expected)
    lstm = PromptEncoder(M, 8, "lstm", 4)
    reference = torch.nn.LSTM(8, 4, num_layers=2, bidirectional=True, batch_first=True)
    reference.load_state_dict(lstm.lstm.state_dict())
    states = reference(lstm.inputs.unsqueeze(0))[0][0]  # (m, 2h): forward and backward states side by side
    torch.testing.assert_close(lstm(), lstm.head(states))
    assert lstm.head[0].in_features == 8 and lstm.head[2].out_features == 8  # Linear(2h, 2h), ReLU, Linear(2h, d)


@pytest.mark.parametrize(
    ("make", "task_type", "kind"), [(tiny_classifier, "SEQ_CLS", "LSTM"), (tiny_llama, "CAUSAL_LM", "MLP")]
)
def test_the_encoder_trains_as_peft_prompt_encoder_does(make, task_type, kind):
    config = PromptEncoderConfig(
        task_type=task_type, num_virtual_tokens=M, encoder_hidden_size=16, encoder_reparameterization_type=kind
    )
    theirs = get_peft_model(make(), config)
    randomise(theirs)
    theirs.eval()
    ids, mask = tokens()
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    ours = peftlab.attach(
        make(), "p_tuning", num_virtual_tokens=M, encoder=kind.lower(), encoder_hidden=16, position="front"
    )
    encoder, peft_encoder = soft_prompt(ours).encoder, theirs.prompt_encoder["default"]
    with torch.no_grad():
        encoder.inputs.copy_(peft_encoder.embedding.weight)
        encoder.head.load_state_dict(peft_encoder.mlp_head.state_dict())
        if kind == "LSTM":
            encoder.lstm.load_state_dict(peft_encoder.lstm_head.state_dict())
            ours.model.classifier.load_state_dict(theirs.base_model.classifier.modules_to_save["default"].state_dict())
    got = ours.model.eval()(ids, attention_mask=mask).logits
    if got.dim() == 3:  # PEFT's LM logits include the virtual tokens; compare the real, unpadded positions
        expected, keep = expected[:, M:], mask.bool()
        got, expected = got[keep], expected[keep]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_saved_adapter_holds_the_virtual_tokens_not_the_encoder(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "p_tuning", num_virtual_tokens=M, encoder_hidden=8)
    randomise(adapter.model)
    ids, mask = tokens()
    expected = adapter.model.eval()(ids, attention_mask=mask).logits
    trained = peftlab.parameter_counts(adapter)
    adapter.save(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert sorted(saved) == ["bert.embeddings.word_embeddings.prompt", "classifier.bias", "classifier.weight"]
    assert saved[PROMPT].shape == (M, 32)
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["config"]["encoder"] == "none" and meta["trained_as"]["encoder"] == "lstm"
    loaded = peftlab.load_adapter(tiny_classifier(), tmp_path / "adapter")
    assert soft_prompt(loaded).encoder is None
    torch.testing.assert_close(loaded.model.eval()(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
    counts = peftlab.parameter_counts(loaded)
    assert counts["adapter"] == M * 32 < trained["adapter"]
    assert counts["changed"] == M * 32 + 66  # the tokens and the head (2 x 32 + 2)
    # folding in place gives the same form, and changes nothing in the outputs
    assert adapter.fold() and not adapter.fold()
    assert peftlab.parameter_counts(adapter) == counts
    torch.testing.assert_close(adapter.model(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
    # keep_encoder saves the encoder itself
    kept = peftlab.attach(tiny_classifier(), "p_tuning", num_virtual_tokens=M, encoder="mlp", keep_encoder=True)
    kept.save(tmp_path / "kept")
    assert "bert.embeddings.word_embeddings.encoder.head.0.weight" in load_file(tmp_path / "kept/adapter.safetensors")


def test_position_after_the_first_token_keeps_cls_first():
    model = tiny_classifier()
    virtual = torch.tensor([7, 8, 9])
    ids, mask = tokens()
    for position, at in (("after-first", 1), ("auto", 1), ("front", 0), ("3", 3), ("9", 6)):  # 6 tokens: at the end
        literal = torch.cat([ids[:, :at], virtual.expand(2, -1), ids[:, at:]], 1)
        literal_mask = torch.cat([mask[:, :at], torch.ones(2, 3, dtype=torch.long), mask[:, at:]], 1)
        with torch.no_grad():
            expected = model(literal, attention_mask=literal_mask).logits
        adapter = peftlab.attach(model, "p_tuning", num_virtual_tokens=3, encoder="none", position=position)
        with torch.no_grad():
            soft_prompt(adapter).prompt.copy_(model.get_input_embeddings().weight[virtual])
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)
        model = adapter.unload()


def test_decoders_take_the_prompt_in_front():
    assert soft_prompt(peftlab.attach(tiny_llama(), "p_tuning", num_virtual_tokens=M)).at == 0
    with pytest.raises(InputError, match="position: LlamaForCausalLM is a decoder and takes its prompt in front"):
        peftlab.attach(tiny_llama(), "p_tuning", position="after-first")
    with pytest.raises(InputError, match="position: expected front, after-first, auto or a token index"):
        peftlab.attach(tiny_classifier(), "p_tuning", position="middle")


@pytest.mark.parametrize(
    ("make", "task_type", "kind"), [(tiny_classifier, "SEQ_CLS", "LSTM"), (tiny_llama, "CAUSAL_LM", "MLP")]
)
def test_peft_p_tuning_loads_here_and_back_with_the_same_outputs(tmp_path, make, task_type, kind):
    config = PromptEncoderConfig(
        task_type=task_type, num_virtual_tokens=M, encoder_hidden_size=16, encoder_reparameterization_type=kind
    )
    theirs = get_peft_model(make(), config)
    randomise(theirs)
    theirs.eval()
    ids, mask = tokens()
    expected = theirs(input_ids=ids, attention_mask=mask).logits
    expected = expected[:, M:] if expected.dim() == 3 else expected
    keep = mask.bool() if expected.dim() == 3 else slice(None)
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT too saves the encoder's output
    ours = peftlab.import_hf(make(), tmp_path / "theirs")
    assert ours.method.name == "p_tuning" and ours.config.encoder == "none"
    got = ours.model.eval()(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=1e-6)
    peftlab.export_hf(ours, tmp_path / "ours", task_type=task_type)
    back = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    again = back(input_ids=ids, attention_mask=mask).logits
    again = again[:, M:] if again.dim() == 3 else again
    torch.testing.assert_close(again[keep], expected[keep], rtol=0, atol=1e-6)


def test_peft_export_needs_the_prompt_in_front(tmp_path):
    adapter = peftlab.attach(tiny_classifier(), "p_tuning", num_virtual_tokens=M)  # auto: after [CLS]
    with pytest.raises(InputError, match="position: PEFT's P-tuning puts the prompt in front"):
        peftlab.export_hf(adapter, tmp_path / "hf")
