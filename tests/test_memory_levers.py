"""The memory levers of training keep the numbers: the chunked, target-only loss equals the loss over full logits
(value and gradients) and never saves full-vocabulary logits for backward; a frozen base stored in bf16 or fp16
trains as the fp32 one does, with fp32 master copies of what trains, and resumes exactly."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

import peftlab
from peftlab.bench.assets import tiny_llama_config
from peftlab.bench.measure import saved_activation_bytes
from peftlab.core.adapter_file import WEIGHTS_FILE, read_tensors
from peftlab.core.precision import STORAGE, keep_trainable_fp32
from peftlab.data.lm import IGNORE, LMEncoded, _pack, model_inputs
from peftlab.models import load_classifier
from peftlab.run import RunOptions, build_model, prepare_data, rebuild
from peftlab.train.lm_task import token_losses
from peftlab.train.loop import ClassificationTask, autocast_for, enable_gradient_checkpointing
from tests.short_fit import crash_after_checkpoint

VOCAB = 5000


def llama(vocab: int = VOCAB, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab, **overrides))


def batch(rows: int = 3, length: int = 24, vocab: int = VOCAB, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded rows whose second half is the target (a reply after a prompt), as SFT batches are."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE)
    for r in range(rows):
        real = length - 3 * r  # rows of different lengths, padded at the end
        ids[r, real:], mask[r, real:] = 0, 0
        labels[r, real // 2 : real] = ids[r, real // 2 : real]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def full_logit_loss(model, b) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    targets = b["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method, options", [("lora", {"r": 4}), ("prompt_tuning", {"num_virtual_tokens": 3}),
                                             ("prefix_tuning", {"num_virtual_tokens": 3, "encoder_hidden": 16}),
                                             ("full", {})])  # fmt: skip
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_the_chunked_loss_equals_the_full_logit_loss_and_its_gradients(method, options, chunk):
    b = batch()
    reference = peftlab.attach(llama(), method, **options)
    expected, expected_count = full_logit_loss(reference.model, b)
    expected.backward()
    chunked = peftlab.attach(llama(), method, **options)
    loss, count = token_losses(chunked.model, b, chunk=chunk)
    loss.backward()
    assert count == expected_count
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    want, got = trainable_grads(reference.model), trainable_grads(chunked.model)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert type(chunked.model.get_output_embeddings()) is not torch.nn.Identity  # the output layer is back


def test_no_full_vocabulary_logits_are_saved_for_backward():
    """Saved activations of the chunked loss stay far below one fp32 logit per (position, vocabulary entry)."""
    b = batch(rows=4, length=64)
    model = peftlab.attach(llama(), "lora", r=4).model
    full, chunked = {}, {}
    with saved_activation_bytes(model, full):
        full_logit_loss(model, b)[0].backward()
    with saved_activation_bytes(model, chunked):
        token_losses(model, b, chunk=16)[0].backward()
    logit_bytes = 4 * 64 * VOCAB * 4  # one fp32 logit per position and vocabulary entry
    assert full["activations"] - chunked["activations"] > 0.9 * logit_bytes  # what the reference saves on top
    assert chunked["activations"] < logit_bytes / 2  # the model's own activations only


def test_soft_capped_logits_take_the_full_logit_path():
    """Gemma-style soft-capping is applied after the output layer: the chunked path would skip it."""
    model = llama()
    model.config.final_logit_softcapping = 30.0
    b = batch()
    with torch.no_grad():
        loss, _ = token_losses(model, b, chunk=4)
        expected, _ = full_logit_loss(model, b)
    torch.testing.assert_close(loss, expected)


# --- the frozen base in bf16 / fp16 -----------------------------------------------------------------------------


def train_run(cli, model_dir, data, out, *extra):
    args = ["train", "--model", model_dir, "--data", data, "--out", out, "--epochs", "2", "--batch-size", "16"]
    code, _, err = cli(*args, "--lr", "0.01", "--max-length", "32", "--r", "4", *extra)
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_precision_base_trains_like_fp32_with_fp32_masters(cli, tiny_model_dir, tiny_csv, tmp_path, dtype):
    reference = train_run(cli, tiny_model_dir, tiny_csv, tmp_path / "fp32")
    half = train_run(cli, tiny_model_dir, tiny_csv, tmp_path / dtype, "--dtype", dtype)
    config = json.loads((tmp_path / dtype / "config.json").read_text())
    assert config["dtype"] == dtype and config["precision"] == dtype  # the forward runs in the base's dtype
    ours = read_tensors(tmp_path / dtype / "adapter" / WEIGHTS_FILE)
    theirs = read_tensors(tmp_path / "fp32" / "adapter" / WEIGHTS_FILE)
    assert all(t.dtype == torch.float32 for t in ours.values())  # the adapter and head trained as fp32 masters
    assert ours.keys() == theirs.keys()
    # The same training up to half-precision rounding in the forward pass, which Adam's normalised steps carry into
    # different weights: compare what the runs learned, not the weights.
    assert abs(half["metrics"]["test"]["accuracy"] - reference["metrics"]["test"]["accuracy"]) <= 0.1
    losses = [entry["train_loss"] for entry in half["history"]]
    assert losses[-1] < losses[0]
    _, _, _, _, rebuilt = rebuild(tmp_path / dtype)  # the run folder reads back with the base in its dtype
    frozen = {p.dtype for p in rebuilt.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in rebuilt.model.parameters() if p.requires_grad}
    assert frozen == {STORAGE[dtype]} and trained == {torch.float32}
    code, out, _ = cli("eval", tmp_path / dtype)
    assert code == 0 and f"{half['metrics']['test']['accuracy']:.4f}" in out


GRADIENT_TOLERANCE = {"bf16": 0.25, "fp16": 0.05}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_half_precision_base_gives_the_fp32_outputs_and_gradients_up_to_rounding(tiny_model_dir, tiny_csv, dtype):
    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    prepared = prepare_data(options, quiet=True)
    b = prepared.splits["train"].batch(range(16), torch.device("cpu"))
    results = {}
    for storage in ("fp32", dtype):
        model = build_model(dataclasses.replace(options, dtype=storage), prepared, 0)
        adapter = peftlab.attach(model, "lora", r=4, init="gaussian")  # A and B both non-zero: gradients in both
        with torch.no_grad():
            for layer in adapter.layers().values():
                layer.lora_B.normal_(0, 0.1)
        keep_trainable_fp32(model, adapter.initial)
        with autocast_for(storage, torch.device("cpu"))():
            loss = ClassificationTask(2).loss(model, b)
        loss.backward()
        results[storage] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (loss32, grads32), (loss16, grads16) = results["fp32"], results[dtype]
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32
        # bf16 keeps 8 significant bits, fp16 11: relative gradient error of a few percent, more for bf16
        assert (grads16[name] - grad).norm() <= GRADIENT_TOLERANCE[dtype] * grad.norm() + 1e-4, name


def test_half_precision_storage_halves_the_frozen_weights(tiny_model_dir):
    sizes = {}
    for dtype in ("fp32", "bf16"):
        model = load_classifier(tiny_model_dir, ["neg", "pos"], dtype=STORAGE[dtype])
        adapter = peftlab.attach(model, "lora", r=4)
        keep_trainable_fp32(model, adapter.initial)
        sizes[dtype] = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())
    assert sizes["bf16"] * 2 == sizes["fp32"]


def test_an_fp16_run_resumes_with_its_gradient_scale(cli, tiny_model_dir, tiny_csv, tmp_path):
    extra = ("--dtype", "fp16", "--checkpoint-every", "5", "--seed", "3")
    train_run(cli, tiny_model_dir, tiny_csv, tmp_path / "a", *extra)
    # the CLI turns the interruption into exit status 130 and an "interrupted" line
    with crash_after_checkpoint(5), pytest.raises(AssertionError, match="interrupted"):
        train_run(cli, tiny_model_dir, tiny_csv, tmp_path / "b", *extra)
    trainer = json.loads((tmp_path / "b" / "checkpoint" / "trainer.json").read_text())
    assert trainer["grad_scaler"]["scale"] > 0
    code, _, err = cli("train", "--resume", tmp_path / "b")
    assert code == 0, err
    a = read_tensors(tmp_path / "a" / "adapter" / WEIGHTS_FILE)
    b = read_tensors(tmp_path / "b" / "adapter" / WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_precision_that_cannot_run_the_base_is_refused(cli, tiny_model_dir, tiny_csv, tmp_path):
    args = ("train", "--model", tiny_model_dir, "--data", tiny_csv, "--out", tmp_path / "x")
    code, _, err = cli(*args, "--max-length", "32", "--dtype", "fp16", "--precision", "bf16")
    assert code == 2 and err.startswith("error: precision: bf16 autocast cannot run a base stored in fp16")


def test_sft_with_a_bf16_base_trains_evaluates_and_generates(cli, tiny_llama_dir, tmp_path):
    from tests.test_sft import instruction_rows

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(64)))
    out = tmp_path / "run"
    args = ("train", "--task", "sft", "--model", tiny_llama_dir, "--data", data, "--out", out, "--max-length", "48")
    code, _, err = cli(*args, "--dtype", "bf16", "--epochs", "2", "--lr", "0.01", "--eval-generate", "4")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]
    assert "exact_match" in results["metrics"]["test"]  # generation ran on the mixed-storage model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello how are you\n")
    code, text, err = cli("generate", out, "--prompts", prompts)
    assert code == 0 and text.strip(), err


# --- gradient checkpointing --------------------------------------------------------------------------------------

CHECKPOINTED = [
    ("lora", {"r": 4}),
    ("ia3", {}),
    ("houlsby", {"bottleneck": 8}),
    ("prefix_tuning", {"num_virtual_tokens": 3, "encoder_hidden": 16}),
    ("p_tuning_v2", {"num_virtual_tokens": 3}),
    ("prompt_tuning", {"num_virtual_tokens": 3}),
    ("unipelt", {"num_virtual_tokens": 3, "encoder_hidden": 16, "bottleneck": 8, "lora_r": 4}),
    ("full", {}),
]


def loss_and_grads(model, method, options, b, checkpointed):
    adapter = peftlab.attach(model, method, **options)
    with torch.no_grad():  # adapters away from their identity start, so every part has a gradient
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    if checkpointed:
        enable_gradient_checkpointing(adapter.model)
    adapter.model.train()
    stats = {}
    with saved_activation_bytes(adapter.model, stats):
        loss = (token_losses(adapter.model, b)[0] if "labels" in b and b["labels"].dim() == 2 else
                ClassificationTask(2).loss(adapter.model, b))  # fmt: skip
        loss.backward()
    grads = {n: p.grad for n, p in adapter.model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, stats["activations"]


@pytest.mark.parametrize("method, options", CHECKPOINTED)
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_keeps_loss_and_gradients_and_saves_less(kind, method, options, tiny_model_dir):
    if kind == "bert":
        make = lambda: load_classifier(tiny_model_dir, ["neg", "pos"]).train()  # noqa: E731
        g = torch.Generator().manual_seed(0)
        vocab = make().config.vocab_size
        b = {"input_ids": torch.randint(5, vocab, (4, 24), generator=g), "attention_mask": torch.ones(4, 24, dtype=int)}
        b["labels"] = torch.tensor([0, 1, 1, 0])
    else:
        make, b = llama, batch(rows=4, length=24)
    torch.manual_seed(0)
    plain_loss, plain_grads, plain_saved = loss_and_grads(make(), method, options, b, False)
    torch.manual_seed(0)
    loss, grads, saved = loss_and_grads(make(), method, options, b, True)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert saved < plain_saved


def test_a_checkpointed_run_trains_exactly_as_a_plain_one(cli, tiny_model_dir, tiny_csv, tmp_path):
    train_run(cli, tiny_model_dir, tiny_csv, tmp_path / "plain")
    train_run(cli, tiny_model_dir, tiny_csv, tmp_path / "gc", "--gradient-checkpointing")
    a = read_tensors(tmp_path / "plain" / "adapter" / WEIGHTS_FILE)
    b = read_tensors(tmp_path / "gc" / "adapter" / WEIGHTS_FILE)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_model_without_gradient_checkpointing_is_refused():
    with pytest.raises(peftlab.InputError, match="gradient_checkpointing: Sequential does not support"):
        enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- packing without cross-contamination -------------------------------------------------------------------------


def conversations_alone_and_packed(vocab=VOCAB):
    g = torch.Generator().manual_seed(5)
    examples = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (7, 11, 5, 9, 6)]
    labels = [[IGNORE] * (len(e) // 2) + e[len(e) // 2 :] for e in examples]
    plain = LMEncoded(examples, labels, 0, 0)
    packed = encode_packed(examples, labels, max_length=24)
    return plain, packed


def encode_packed(examples, labels, max_length):
    """The examples packed as ``encode_conversations(..., packing=True)`` packs them."""
    ids, labs, segments = _pack(examples, labels, max_length)
    return LMEncoded(ids, labs, 0, 0, segments)


@pytest.mark.parametrize("method, options", [(None, {}), ("lora", {"r": 4}), ("ia3", {}),
                                             ("prefix_tuning", {"num_virtual_tokens": 3, "encoder_hidden": 16}),
                                             ("houlsby", {"bottleneck": 8})])  # fmt: skip
def test_a_packed_row_gives_each_conversation_the_logits_it_has_alone(method, options):
    model = llama().eval()
    if method:
        adapter = peftlab.attach(model, method, **options)
        with torch.no_grad():
            for p in adapter.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        model = adapter.model.eval()
    plain, packed = conversations_alone_and_packed()
    assert len(packed) < len(plain) and packed.segments  # several conversations share a row
    rows = packed.batch(range(len(packed)))
    with torch.no_grad():
        together = model(**model_inputs(rows)).logits  # (rows, T, V)
        start_of = {}
        k = 0
        for r, lengths in enumerate(packed.segments):
            offset = 0
            for n in lengths:
                start_of[k] = (r, offset, n)
                offset, k = offset + n, k + 1
        for i in range(len(plain)):
            alone = model(**model_inputs(plain.batch([i]))).logits[0]  # (n, V)
            r, offset, n = start_of[i]
            torch.testing.assert_close(together[r, offset : offset + n], alone, rtol=1e-4, atol=1e-4)
        loss_packed, count_packed = token_losses(model, rows)
        loss_plain, count_plain = token_losses(model, plain.batch(range(len(plain))))
    assert count_packed == count_plain
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-4, atol=1e-4)


def test_packed_sft_trains_and_soft_prompts_are_refused(cli, tiny_llama_dir, tmp_path):
    from tests.test_sft import instruction_rows

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(64)))
    args = ("train", "--task", "sft", "--model", tiny_llama_dir, "--data", data, "--max-length", "96", "--packing")
    code, _, err = cli(*args, "--out", tmp_path / "run", "--epochs", "2", "--lr", "0.01", "--eval-generate", "0")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]
    code, _, err = cli(*args, "--out", tmp_path / "soft", "--method", "prompt_tuning")
    assert code == 2 and err.startswith("error: packing: prompt_tuning puts its virtual tokens in front of each row")
    assert not (tmp_path / "soft" / "adapter").exists()


def test_the_optimiser_keeps_state_for_the_trainable_parameters_only(tiny_model_dir, tiny_csv):
    from peftlab.core.hooks import TrainingHooks
    from peftlab.train.loop import TrainSettings
    from peftlab.train.step import Step

    options = RunOptions(model=str(tiny_model_dir), data=str(tiny_csv), max_length=32)
    prepared = prepare_data(options, quiet=True)
    adapter = peftlab.attach(build_model(options, prepared, 0), "lora", r=4)
    step = Step(adapter, ClassificationTask(2), TrainSettings(), 1e-3, 10, torch.device("cpu"), TrainingHooks())
    step.take(0, [Step.whole(prepared.splits["train"].batch(range(8)))])
    state = [t for s in step.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert sum(t.numel() for t in state) == 2 * adapter.trainable_count()  # Adam's two moments, nothing frozen


def test_an_adapter_loads_exactly_onto_a_half_precision_base_with_fp32_trainable(tiny_model_dir, tmp_path):
    trained = peftlab.attach(load_classifier(tiny_model_dir, ["neg", "pos"]), "lora", r=4, init="gaussian")
    with torch.no_grad():
        for layer in trained.layers().values():
            layer.lora_B.normal_(0, 0.1)
    trained.save(tmp_path / "adapter")
    half = load_classifier(tiny_model_dir, ["neg", "pos"], dtype=torch.bfloat16)
    loaded = peftlab.load_adapter(half, tmp_path / "adapter", fp32_trainable=True)
    saved = read_tensors(tmp_path / "adapter" / WEIGHTS_FILE)
    state = loaded.state()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], saved[k]) for k in saved)
    assert {p.dtype for p in loaded.model.parameters() if not p.requires_grad} == {torch.bfloat16}
