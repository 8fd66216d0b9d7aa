"""GGUF export: the adapter file read back with gguf's reader (keys, names, shapes, the update it encodes), the
merged model file, the refusals, and (``real``) llama.cpp itself running the packaged SmolLM2 with our adapter."""

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import peftlab
from peftlab.core.gguf_lora import BaseIdentity, gguf_lora, permute, write_gguf_lora
from peftlab.core.gguf_merge import write_merged_gguf
from peftlab.errors import InputError
from tests.conftest import tiny_classifier


def randomise(attachment, seed=0):
    """Non-zero B (and fresh A), so the update is not the zero of a fresh LoRA."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in attachment.layers().values():
            layer.lora_A.normal_(0, 0.1, generator=g)
            layer.lora_B.normal_(0, 0.1, generator=g)


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def llama_name(module):
    """model.layers.1.self_attn.q_proj -> blk.1.attn_q.weight (llama.cpp's names)."""
    parts = module.split(".")
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    short |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    return f"blk.{parts[2]}.{short[parts[-1]]}.weight"


def test_adapter_file_holds_llamas_names_shapes_alpha_and_our_update(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    att = peftlab.attach(model, "lora", r=4, alpha=8, rslora=True, alpha_pattern={"*.v_proj": 3.0})
    randomise(att)
    out = tmp_path / "adapter.gguf"
    write_gguf_lora(att, out, BaseIdentity("tiny-llama", "ab" * 32))
    fields, tensors = read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == pytest.approx(8 * 2.0)  # rsLoRA: alpha / sqrt(4) = (8 * 2) / 4
    assert fields["general.base_model.count"] == 1 and fields["general.base_model.0.name"] == "tiny-llama"
    assert fields["peftlab.base.sha256"] == "ab" * 32 and fields["peftlab.method"] == "lora"
    layers = att.layers()
    expected = {llama_name(m) + s for m in layers for s in (".lora_a", ".lora_b")}
    assert set(tensors) == expected
    config = model.config
    for module, layer in layers.items():
        name = llama_name(module)
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        out_f, in_f = layer.base.weight.shape
        assert list(a.shape) == [in_f, 4] and list(b.shape) == [4, out_f]  # GGUF order: ne0 first
        assert a.tensor_type == gguf.GGMLQuantizationType.F32
        # what llama.cpp adds to the GGUF weight: (alpha / r) b @ a, with r read from lora_a
        delta = fields["adapter.lora.alpha"] / 4 * (np.asarray(b.data) @ np.asarray(a.data))
        ours = layer.delta_weight().detach().numpy()
        if name.endswith("attn_q.weight"):
            ours = permute(ours, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            ours = permute(ours, config.num_key_value_heads)
        np.testing.assert_allclose(delta, ours, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(a.data), layer.lora_A.detach().numpy())  # A itself, unscaled


def test_permute_matches_the_rotary_pairing():
    """Hugging Face rotates pairs (j, j + d/2) of each head; GGUF Llama weights hold them side by side."""
    w = np.arange(2 * 8).reshape(2 * 8, 1)  # 2 heads of dim 8
    assert permute(w, 2)[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def tiny_qwen():
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def test_qwen2_adapter_keeps_the_row_order_and_can_be_f16(tmp_path):
    model = tiny_qwen()
    att = peftlab.attach(model, "lora", r=2, alpha=4, targets=["*q_proj", "*k_proj", "*down_proj"])
    randomise(att)
    out = tmp_path / "q.gguf"
    write_gguf_lora(att, out, BaseIdentity("tiny-qwen"), dtype="f16")
    fields, tensors = read(out)
    assert fields["general.architecture"] == "qwen2" and fields["adapter.lora.alpha"] == pytest.approx(4.0)
    assert "peftlab.base.sha256" not in fields
    b = tensors["blk.1.attn_k.weight.lora_b"]
    assert b.tensor_type == gguf.GGMLQuantizationType.F16
    layer = att.layers()["model.layers.1.self_attn.k_proj"]
    np.testing.assert_allclose(np.asarray(b.data, dtype=np.float32), layer.lora_B.detach().numpy(), atol=2e-3)


def write_base(model, path, arch="llama", shrink=None):
    """A GGUF model file of ``model``'s weights as llama.cpp names them (only what the tests read)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny base")
    for key, w in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name in writer.tensors[0]:
            continue
        w = w.numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            w = permute(w, heads)
        if shrink and name == shrink:
            w = w[:-1]
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merged_file_is_the_base_plus_the_update_and_a_wrong_base_is_refused(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base = write_base(model, tmp_path / "base.gguf")
    wrong = write_base(model, tmp_path / "wrong.gguf", shrink="blk.1.attn_v.weight")
    att = peftlab.attach(model, "lora", r=4, alpha=8, targets=["*q_proj", "*v_proj", "*up_proj"])
    randomise(att)
    lora = gguf_lora(att)
    out = tmp_path / "merged.gguf"
    assert write_merged_gguf(lora, base, out, "f32", "lora adapter") == 3 * model.config.num_hidden_layers
    fields, merged = read(out)
    _, original = read(base)
    assert fields["general.name"] == "tiny base + lora adapter" and set(merged) == set(original)
    for name, t in original.items():
        expected = np.asarray(t.data) + (lora.delta(name) if name in lora.factors else 0)
        np.testing.assert_allclose(np.asarray(merged[name].data), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="blk.1.attn_v.weight.*trained on another model"):
        write_gguf_lora(att, tmp_path / "x.gguf", BaseIdentity("tiny"), base_file=wrong)
    qwen_base = write_base(tiny_qwen(), tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(InputError, match="a 'qwen2' model; the adapter is for a 'llama' model"):
        write_merged_gguf(lora, qwen_base, tmp_path / "y.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_what_gguf_lora_cannot_hold_is_refused(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with pytest.raises(InputError, match="'dora' is not a plain LoRA"):
        gguf_lora(peftlab.attach(model, "dora", r=2))
    with pytest.raises(InputError, match="model is 'bert'.*Llama- and Qwen2-style"):
        gguf_lora(peftlab.attach(tiny_classifier(), "lora", r=2))


SFT = ["--task", "sft", "--r", "4", "--max-steps", "3", "--batch-size", "4", "--lr", "0.01", "--max-length", "32",
       "--eval-generate", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_gguf_run(tiny_llama_dir, tmp_path_factory):
    from tests.conftest import train_tiny_run
    from tests.test_sft import instruction_rows

    data = tmp_path_factory.mktemp("gguf-data") / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(40)))
    return train_tiny_run(tiny_llama_dir, data, tmp_path_factory.mktemp("gguf-runs") / "lora", *SFT)


def test_cli_writes_the_adapter_and_refuses_merging_without_a_gguf_base(sft_gguf_run, cli, tmp_path):
    code, out, err = cli("export", sft_gguf_run, "--format", "gguf")
    assert code == 0, err
    assert "wrote a llama.cpp LoRA adapter (llama, 14 tensors, f32)" in out
    fields, tensors = read(sft_gguf_run / "adapter.gguf")
    assert fields["adapter.type"] == "lora" and len(tensors) == 2 * 14  # 2 layers x 7 projections
    code, _, err = cli("export", sft_gguf_run, "--format", "gguf")
    assert code == 2 and "already exists" in err
    code, _, err = cli("export", sft_gguf_run, "--format", "gguf", "--merged", "--out", tmp_path / "m.gguf")
    assert code == 2 and "was not built from a GGUF file; name a GGUF of it with --base FILE" in err
    assert err.count("\n") == 1


def test_cli_refuses_a_classifier_run(cli, tiny_model_dir, tiny_csv, tmp_path):
    from tests.conftest import train_tiny_run

    run = train_tiny_run(tiny_model_dir, tiny_csv, tmp_path / "cls", "--max-steps", "1", "--max-length", "32")
    code, _, err = cli("export", run, "--format", "gguf", "--out", tmp_path / "a.gguf")
    assert code == 2 and "error:" in err and "Llama- and Qwen2-style decoders" in err
    assert not (tmp_path / "a.gguf").exists()


PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]


@pytest.mark.real
def test_llama_cpp_runs_our_adapter_and_merged_model_like_peftlab(tmp_path, cli, tiny_llama_dir, capsys):
    """SmolLM2-135M: a LoRA trained a few steps, exported; llama.cpp (4-bit base + adapter, and the merged GGUF)
    continues each prompt greedily with the same tokens as peftlab's model, and refuses an adapter of another model."""
    from peftlab.assets.source import source_gguf
    from peftlab.run import rebuild
    from tests.llama_cpp import Llama, Unavailable
    from tests.test_sft import instruction_rows

    try:
        from tests.llama_cpp import load

        load()
    except Unavailable as e:
        pytest.skip(f"llama.cpp: {e}")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(16)))
    run = tmp_path / "run"
    targets = ["*q_proj", "*k_proj", "*v_proj", "*o_proj", "*up_proj"]
    options = ["--task", "sft", "--r", "8", "--max-steps", "4", "--batch-size", "4", "--lr", "0.005"]
    options += ["--max-length", "48", "--eval-generate", "0", "--targets", *targets]
    code, _, err = cli("train", "--model", "smollm2-135m", "--data", data, "--out", run, *options)
    assert code == 0, err
    base = source_gguf("smollm2-135m")
    code, _, err = cli("export", run, "--format", "gguf", "--base", base, "--out", tmp_path / "a.gguf")
    assert code == 0, err
    code, _, err = cli("export", run, "--format", "gguf", "--merged", "--out", tmp_path / "m.gguf")
    assert code == 0, err
    _, _, _, prepared, attachment = rebuild(run)
    model, tokenizer = attachment.model.eval(), prepared.tokenizer
    n = 8
    report = []
    with_lora, merged, plain = Llama(base, tmp_path / "a.gguf"), Llama(tmp_path / "m.gguf"), Llama(base)
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
            ours = out[0, len(ids) :].tolist()
            with torch.no_grad():
                ref = model(out).logits[0, len(ids) - 1 : -1].numpy()  # (n, vocab) along our continuation
            seq = out[0].tolist()
            got = {}
            for label, llm in (("lora", with_lora), ("merged", merged), ("base", plain)):
                logits = llm.logits(seq)[len(ids) - 1 : -1]
                tokens, _ = llm.greedy(ids, n)
                agree = int((logits.argmax(-1) == ref.argmax(-1)).sum())  # teacher-forced along our tokens
                got[label] = (tokens, float(np.abs(logits - ref).max()), agree)
            report.append((prompt, ours, got))
    finally:
        for llm in (with_lora, merged, plain):
            llm.close()
    with capsys.disabled():
        for prompt, ours, got in report:
            print(
                f"\n{prompt!r}: peftlab {ours}; "
                + "; ".join(f"{k} {t} max|dlogit| {d:.3f} argmax {a}/{n}" for k, (t, d, a) in got.items())
            )
    # The merged GGUF holds the adapted weights in f32: the same greedy tokens. The 4-bit base + adapter quantises
    # the activations of the base matmuls (q8) too, so a near-tie may flip: most steps agree, logits stay close.
    for _, ours, got in report:
        assert got["merged"][0] == ours and got["merged"][1] < 1.5
        assert got["lora"][1] < 1.5
    assert sum(got["lora"][2] for _, _, got in report) >= 0.85 * n * len(PROMPTS)
    assert any(got["base"][1] > 2 * got["lora"][1] for _, _, got in report)  # the adapter is what llama.cpp applied
    # an adapter of another model (the tiny Llama's shapes) is refused by llama.cpp, and by --base before writing
    tiny = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    att = peftlab.attach(tiny, "lora", r=2)
    write_gguf_lora(att, tmp_path / "tiny.gguf", BaseIdentity("tiny"))
    with pytest.raises(RuntimeError, match="refused the adapter"):
        Llama(base, tmp_path / "tiny.gguf")
    with pytest.raises(InputError, match="trained on another model"):
        write_gguf_lora(att, tmp_path / "tiny2.gguf", BaseIdentity("tiny"), base_file=base)
