"""Ladder Side-Tuning: the forward pass is the ladder equation (checked against a few lines of reference code on
a tiny BERT and a tiny Llama, with every block and with a dropped one), the backward pass never enters the backbone
(no tensor saved for backward inside a backbone block, dropped blocks included; activation memory below LoRA's and
the frozen floor's, and lower again with layer dropping), gradient checkpointing changes nothing, it learns (random
or pruned start, all blocks or fewer), the pruned start copies exactly the slices the documented magnitude score
selects, it saves, loads and unloads, greedy generation with the tiny Llama equals the argmax of full recomputation
at every step, packed rows stay apart, bad options are refused in one line, and the CLI trains, generates and
refuses to merge. Hugging Face PEFT has no LST, so there is no parity test."""

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

import peftlab
from peftlab.bench.assets import tiny_llama_config
from peftlab.bench.measure import FloorStep, TrainStep
from peftlab.cli.options import Parser, add_fields, cli_values
from peftlab.core.hooks import TrainingHooks
from peftlab.errors import InputError, PeftlabError
from peftlab.methods.lst import LadderBlock, LSTConfig, SideBlock
from peftlab.train.loop import ClassificationTask, TrainSettings, enable_gradient_checkpointing
from tests.conftest import tiny_classifier

VOCAB = 64
TOKENS = torch.tensor([[2, 7, 12, 30, 41, 3, 0], [2, 9, 17, 25, 3, 0, 0], [5, 8, 13, 21, 34, 55, 6]])
MASK = (TOKENS != 0).long()
LABELS = torch.tensor([0, 1, 1])


def tiny_llama(seed: int = 0, causal_lm: bool = False):
    torch.manual_seed(seed)
    config = tiny_llama_config(VOCAB, num_labels=2)
    return (LlamaForCausalLM if causal_lm else LlamaForSequenceClassification)(config).eval()


def model_of(kind: str, seed: int = 0):
    return tiny_classifier(seed) if kind == "bert" else tiny_llama(seed)


def randomise(adapter, seed: int = 0, std: float = 0.3) -> None:
    """Every LST tensor drawn at random (the zero up-projection and gates included), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers().values():
            for name, p in layer.adapter_parameters().items():
                scale = 1.0 if name.endswith("norm.weight") else 0.0  # LayerNorm scales near 1
                p.copy_(scale + torch.randn(p.shape, generator=g) * std)


def layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias)


def reference_side_block(block: SideBlock, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A pre-LayerNorm transformer block, written out: attention over the ``allowed`` keys, then a GELU FFN."""
    B, T, C = x.shape
    heads = block.attn.heads
    a = layer_norm(block.attn_norm, x)
    q, k, v = (a @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, c)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(C // heads)).masked_fill(~allowed[:, None], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    x = x + y @ block.attn.out.weight.T + block.attn.out.bias
    f = layer_norm(block.ffn_norm, x)
    return x + F.gelu(f @ block.ffn_in.weight.T + block.ffn_in.bias) @ block.ffn_out.weight.T + block.ffn_out.bias


@pytest.mark.parametrize(
    "kind, padded, side_layers",
    [
        ("bert", True, None),
        ("bert", False, None),
        ("llama", True, None),
        ("llama", False, None),
        # block 1 (the last) dropped: x_1 = x_0 passes it unchanged and still reaches h_L through U
        ("bert", True, [0]),
        ("llama", True, [0]),
    ],
)
def test_the_forward_pass_is_the_ladder_equation(kind, padded, side_layers):
    tokens, mask = (TOKENS, MASK) if padded else (TOKENS[2:], MASK[2:])  # the last row has no padding
    adapter = peftlab.attach(model_of(kind), "lst", reduction_factor=4, side_layers=side_layers)
    randomise(adapter)
    ladders = list(adapter.layers().values())
    T = tokens.shape[1]
    allowed = mask.bool()[:, None, :].expand(-1, T, -1)  # (B, T, T): every query sees the real keys
    if kind == "llama":
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    allowed = allowed | torch.eye(T, dtype=torch.bool)

    # The frozen model, its last block's output replaced by h_L + U LN(x_L) computed from the captured states.
    reference = model_of(kind)
    blocks = reference.bert.encoder.layer if kind == "bert" else reference.model.layers
    states = []  # e, h_1 .. h_L
    blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))

    def ladder(module, args, output):
        states.append(output)
        if len(states) < len(blocks) + 1:
            return None
        x = states[0] @ ladders[0].embed_down.weight.T + ladders[0].embed_down.bias  # x_0 = D_0 e
        for layer, h in zip(ladders, states[1:], strict=True):
            if layer.side is None:  # a dropped block: x_i = x_{i-1}
                continue
            mu = torch.sigmoid(layer.alpha / 0.1)
            x = reference_side_block(
                layer.side, mu * x + (1 - mu) * (h @ layer.down.weight.T + layer.down.bias), allowed
            )
        last = ladders[-1]
        return output + layer_norm(last.final_norm, x) @ last.up.weight.T + last.up.bias

    for block in blocks:
        block.register_forward_hook(ladder)
    with torch.no_grad():
        expected = reference(input_ids=tokens, attention_mask=mask).logits
        got = adapter.model(input_ids=tokens, attention_mask=mask).logits
        plain = model_of(kind)(input_ids=tokens, attention_mask=mask).logits
    assert ladders[0].state.causal == (kind == "llama")
    assert not torch.allclose(got, plain, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side_layers", [None, [1]], ids=["all-blocks", "block-0-dropped"])
@pytest.mark.parametrize("embeddings_require_grad", [False, True], ids=["plain", "embeddings-require-grad"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_backward_pass_never_enters_the_backbone(kind, embeddings_require_grad, side_layers):
    """No tensor is saved for backward while a backbone block computes (under LoRA, plenty are), not even when the
    input embeddings require a gradient (as the floor of the benchmark makes them) or the block keeps no side block,
    and no backbone parameter gets a gradient."""

    def saved_inside_blocks(adapter) -> int:
        blocks = adapter.model.bert.encoder.layer if kind == "bert" else adapter.model.model.layers
        bases = [block.base if isinstance(block, LadderBlock) else block for block in blocks]
        inside, saved = [False], [0]
        for block in bases:
            block.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
            block.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))
        if embeddings_require_grad:
            adapter.model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_())

        def pack(t):
            saved[0] += inside[0]
            return t

        adapter.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = adapter.model(input_ids=TOKENS, attention_mask=MASK, labels=LABELS).loss
        loss.backward()
        return saved[0]

    lst = peftlab.attach(model_of(kind), "lst", reduction_factor=4, side_layers=side_layers)
    randomise(lst)
    assert saved_inside_blocks(lst) == 0
    own = {id(p) for layer in lst.layers().values() for p in layer.adapter_parameters().values()}
    heads = tuple(f"{h}." for h in lst.trainable_modules)
    for name, p in lst.model.named_parameters():
        if id(p) not in own and not name.startswith(heads):
            assert p.grad is None, name
    assert all(p.grad is not None for layer in lst.layers().values() for p in layer.adapter_parameters().values())
    assert saved_inside_blocks(peftlab.attach(model_of(kind), "lora", r=4)) > 0  # the probe does see saved tensors


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_gradient_checkpointing_changes_nothing(kind):
    def loss_and_grads(checkpointed: bool):
        adapter = peftlab.attach(model_of(kind), "lst", reduction_factor=4, dropout=0.0)
        randomise(adapter)
        if checkpointed:
            enable_gradient_checkpointing(adapter.model)
        adapter.model.train()
        loss = adapter.model(input_ids=TOKENS, attention_mask=MASK, labels=LABELS).loss
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in adapter.state().items()}

    (plain, plain_grads), (checkpointed, checkpointed_grads) = loss_and_grads(False), loss_and_grads(True)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[key], grad, rtol=0, atol=0)


def memory(kind: str, method: str | None, batch: dict, **options) -> dict[str, int]:
    """The memory split of one training step, measured as the benchmark does (``peftlab.bench.measure``)."""
    model = model_of(kind)
    task, settings = ClassificationTask(2), TrainSettings(warmup=0)
    if method is None:
        return FloorStep(model, task, settings, torch.device("cpu")).memory(batch)
    adapter = peftlab.attach(model, method, **options)
    return TrainStep(adapter, task, settings, 1e-3, TrainingHooks(), torch.device("cpu"), 10).memory(batch)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_activations_saved_for_backward_are_below_lora_and_the_frozen_floor(kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 32), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 2}
    lst = memory(kind, "lst", batch)  # tiny BERT: 251 kB; LoRA 886 kB; the floor 577 kB (Llama: 317, 1088, 769)
    lora = memory(kind, "lora", batch, r=4)
    floor = memory(kind, None, batch)
    assert lst["activations"] < 0.5 * floor["activations"] < 0.5 * lora["activations"]


@pytest.mark.parametrize(
    "options, fall",
    [
        ({}, 0.5),
        ({"side_layers": [1]}, 0.5),
        # The tiny BERT's weights are drawn with std 0.02, far below PyTorch's default init of the side blocks, so a
        # side network copied from them starts near the identity and moves slower (0.69 -> 0.50 in 15 steps).
        ({"init": "pruned"}, 0.8),
    ],
    ids=["random", "dropping", "pruned"],
)
def test_it_learns_and_moves_the_gates_and_the_side_network(options, fall):
    torch.manual_seed(0)
    adapter = peftlab.attach(tiny_classifier(), "lst", reduction_factor=4, dropout=0.0, **options)
    start = {k: v.detach().clone() for k, v in adapter.state().items()}
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    adapter.model.train()
    losses = []
    for _ in range(15):
        loss = adapter.model(input_ids=TOKENS, attention_mask=MASK, labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < fall * losses[0]
    state = adapter.state()
    for key in start:
        if key.startswith("classifier."):
            continue
        assert not torch.equal(state[key], start[key]), f"{key} did not move"
    for layer in adapter.layers().values():
        assert layer.side is None or layer.alpha.item() != 0.0


@pytest.mark.parametrize("options", [{}, {"init": "pruned", "side_layers": [1]}], ids=["defaults", "pruned-dropping"])
def test_save_and_load_round_trip_and_unload_restores_the_plain_model(tmp_path, options):
    adapter = peftlab.attach(tiny_llama(causal_lm=True), "lst", reduction_factor=4, **options)
    randomise(adapter)
    with torch.no_grad():
        expected = adapter.model(input_ids=TOKENS, attention_mask=MASK).logits
    adapter.save(tmp_path / "lst")
    saved = json.loads((tmp_path / "lst" / "adapter.json").read_text())["config"]
    assert {k: saved[k] for k in ("init", "side_layers")} == {"init": "random", "side_layers": None} | options
    fresh = tiny_llama(seed=1, causal_lm=True)
    fresh.load_state_dict(tiny_llama(causal_lm=True).state_dict())
    loaded = peftlab.load_adapter(fresh, tmp_path / "lst")
    assert [layer.side is not None for layer in loaded.layers().values()] == [
        layer.side is not None for layer in adapter.layers().values()
    ]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=TOKENS, attention_mask=MASK).logits, expected, rtol=0, atol=0)
    assert loaded.model.generation_config.use_cache is False
    plain = loaded.unload()
    assert plain.generation_config.use_cache is True
    assert not plain.base_model._forward_pre_hooks and not plain.base_model._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=TOKENS, attention_mask=MASK).logits,
            tiny_llama(causal_lm=True)(input_ids=TOKENS, attention_mask=MASK).logits,
        )


@pytest.mark.parametrize("options", [{}, {"init": "pruned", "side_layers": [0]}], ids=["defaults", "pruned-dropping"])
def test_greedy_generation_equals_the_argmax_of_full_recomputation_at_every_step(options):
    adapter = peftlab.attach(tiny_llama(causal_lm=True), "lst", reduction_factor=4, **options)
    randomise(adapter, std=0.5)
    model = adapter.model
    prompts = torch.tensor([[0, 0, 5, 9, 14], [3, 8, 21, 13, 40]])  # the first row left-padded, as generate pads
    mask = (prompts != 0).long()
    with torch.no_grad():
        out = model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompts.shape[1] + 6
        for step in range(prompts.shape[1], out.shape[1]):
            seen = out[:, :step]
            seen_mask = torch.cat([mask, torch.ones(2, step - prompts.shape[1], dtype=torch.long)], dim=1)
            positions = (seen_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seen, attention_mask=seen_mask, position_ids=positions, use_cache=False).logits
            assert torch.equal(logits[:, -1].argmax(-1), out[:, step]), f"step {step}"
        with pytest.raises(PeftlabError, match="^lst: the side network keeps no KV cache") as error:
            model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=3, use_cache=True, pad_token_id=0)
    assert "\n" not in str(error.value)


def test_packed_rows_attend_within_their_own_example():
    """Packed rows (no mask, positions restarting at 0) give each example the logits it has alone."""
    adapter = peftlab.attach(tiny_llama(causal_lm=True), "lst", reduction_factor=4)
    randomise(adapter)
    first, second = torch.tensor([[5, 9, 14, 22]]), torch.tensor([[3, 8, 21]])
    packed = torch.cat([first, second], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        together = adapter.model(input_ids=packed, position_ids=positions, attention_mask=None, use_cache=False).logits
        alone = [adapter.model(input_ids=x, use_cache=False).logits for x in (first, second)]
    torch.testing.assert_close(together, torch.cat(alone, dim=1), rtol=0, atol=1e-5)


def test_sizes_follow_the_reduction_factor_and_the_backbone():
    adapter = peftlab.attach(tiny_classifier(), "lst")  # hidden 32, 4 heads, FFN 64: side 4 wide, 1 head, FFN 8
    side = adapter.layers()["bert.encoder.layer.0"].side
    assert (side.attn.qkv.in_features, side.attn.heads, side.ffn_in.out_features) == (4, 1, 8)
    adapter = peftlab.attach(tiny_classifier(), "lst", reduction_factor=2)  # 4 heads / 2: two heads of 8
    assert adapter.layers()["bert.encoder.layer.0"].side.attn.heads == 2
    adapter = peftlab.attach(tiny_classifier(), "lst", reduction_factor=2, side_heads=2)
    layers = list(adapter.layers().values())
    assert (layers[0].side.attn.heads, layers[0].down.out_features) == (2, 16)
    assert all(isinstance(layer, LadderBlock) for layer in layers)
    assert layers[0].embed_down is not None and layers[1].embed_down is None
    assert layers[0].up is None and torch.count_nonzero(layers[1].up.weight) == 0


def largest(scores: list[float], k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores``, in increasing order (written apart from the method's own code)."""
    return torch.tensor(sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:k]))


def entries(linear, rows, cols) -> float:
    return float(linear.weight[rows][:, cols].abs().sum())


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("r, n_heads", [(2, 2), (4, 2)])  # side heads of 8 (the backbone's width) or of 4
def test_pruned_init_copies_the_slices_the_magnitude_score_selects(kind, r, n_heads):
    """Every side block is its backbone block cut to the kept hidden dims (the input embedding's columns of largest
    L1 norm), its n_heads heads of largest |W| over their q, k, v rows and out columns (the tiny Llama groups 2 query
    heads per key/value head: a kept query head brings the k, v rows of the head it reads), within each kept head
    its s query/key dims of largest |W| over their q and k rows and its s value dims of largest |W| over their v rows
    and out columns (all 8 when the side heads are as wide as the backbone's), and its 64 / r FFN units of largest |W|
    over their input row and output column (Llama: up_proj, down_proj); each side norm holds the kept dims of the
    norm whose output the copied sublayer reads; the ladders select the kept dims; the output is unchanged."""
    model = model_of(kind)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the tiny models' norms start at weight 1, bias 0: make a wrong copy visible
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    plain = copy.deepcopy(model)
    adapter = peftlab.attach(model, "lst", reduction_factor=r, side_heads=n_heads, init="pruned")
    width, dims = 32 // r, 32 // r // n_heads  # the side width, each side head's width
    layers = list(adapter.layers().values())
    blocks = [layer.base for layer in layers]
    keep = largest(model.get_input_embeddings().weight.abs().sum(0).tolist(), width)
    assert not torch.equal(keep, torch.arange(width))  # not trivially the first dims
    if kind == "bert":  # post-norm: attention reads the previous block's output norm (block 0: the embeddings')
        parts = [(b.attention.self.query, b.attention.self.key, b.attention.self.value, b.attention.output.dense,
                  b.intermediate.dense, b.output.dense) for b in blocks]  # fmt: skip
        attn_norms = [model.bert.embeddings.LayerNorm, blocks[0].output.LayerNorm]
        ffn_norms = [b.attention.output.LayerNorm for b in blocks]
        final_norm, group = blocks[-1].output.LayerNorm, 1
    else:  # pre-norm: each sublayer's own norm, and the body's final norm
        parts = [(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj, b.self_attn.o_proj, b.mlp.up_proj,
                  b.mlp.down_proj) for b in blocks]  # fmt: skip
        attn_norms = [b.input_layernorm for b in blocks]
        ffn_norms = [b.post_attention_layernorm for b in blocks]
        final_norm, group = model.model.norm, 2

    def head(h: int) -> list[int]:
        return list(range(8 * h, 8 * h + 8))

    def same_norm(norm, source) -> bool:
        bias = source.bias[keep] if getattr(source, "bias", None) is not None else torch.zeros(width)
        return torch.equal(norm.weight, source.weight[keep]) and torch.equal(norm.bias, bias)

    for i, layer in enumerate(layers):
        q, k, v, o, up, down = parts[i]
        owned = [entries(q, head(h), keep) + entries(k, head(h // group), keep) + entries(v, head(h // group), keep)
                 + entries(o, keep, head(h)) for h in range(4)]  # fmt: skip
        heads = largest(owned, n_heads).tolist()
        qk = [largest([entries(q, [8 * h + j], keep) + entries(k, [8 * (h // group) + j], keep) for j in range(8)],
                      dims).tolist() for h in heads]  # fmt: skip
        vo = [largest([entries(v, [8 * (h // group) + j], keep) + entries(o, keep, [8 * h + j]) for j in range(8)],
                      dims).tolist() for h in heads]  # fmt: skip
        q_rows = [8 * h + j for h, js in zip(heads, qk, strict=True) for j in js]
        k_rows = [8 * (h // group) + j for h, js in zip(heads, qk, strict=True) for j in js]
        v_rows = [8 * (h // group) + j for h, js in zip(heads, vo, strict=True) for j in js]
        o_columns = [8 * h + j for h, js in zip(heads, vo, strict=True) for j in js]
        if dims == 8:  # whole heads
            assert q_rows == [row for h in heads for row in head(h)] and o_columns == q_rows
        units = largest([entries(up, [u], keep) + entries(down, keep, [u]) for u in range(64)], 64 // r)
        side = layer.side
        qkv = torch.cat([q.weight[q_rows][:, keep], k.weight[k_rows][:, keep], v.weight[v_rows][:, keep]])
        assert torch.equal(side.attn.qkv.weight, qkv)
        assert torch.equal(side.attn.out.weight, o.weight[keep][:, o_columns])
        assert torch.equal(side.ffn_in.weight, up.weight[units][:, keep])
        assert torch.equal(side.ffn_out.weight, down.weight[keep][:, units])
        if kind == "bert":
            assert torch.equal(side.attn.qkv.bias, torch.cat([q.bias[q_rows], k.bias[k_rows], v.bias[v_rows]]))
            assert torch.equal(side.attn.out.bias, o.bias[keep])
            assert torch.equal(side.ffn_in.bias, up.bias[units]) and torch.equal(side.ffn_out.bias, down.bias[keep])
        else:  # Llama's projections have no biases
            assert not side.attn.qkv.bias.any() and not side.ffn_in.bias.any() and not side.ffn_out.bias.any()
        assert same_norm(side.attn_norm, attn_norms[i]) and same_norm(side.ffn_norm, ffn_norms[i])
    assert same_norm(layers[-1].final_norm, final_norm)
    selection = torch.zeros(width, 32)
    selection[torch.arange(width), keep] = 1
    for ladder in (layers[0].embed_down, layers[0].down, layers[1].down):
        assert torch.equal(ladder.weight, selection) and not ladder.bias.any()
    assert not layers[-1].up.weight.any() and not layers[-1].up.bias.any()
    with torch.no_grad():  # identity at init: U = 0
        torch.testing.assert_close(
            adapter.model(input_ids=TOKENS, attention_mask=MASK).logits,
            plain(input_ids=TOKENS, attention_mask=MASK).logits,
            rtol=0,
            atol=0,
        )


def test_pruned_init_refuses_a_block_layout_it_does_not_know():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, num_labels=2, bos_token_id=0, eos_token_id=0)
    model = GPT2ForSequenceClassification(config)
    with pytest.raises(InputError, match=r"^init=pruned: cannot find the attention and feed-forward projections and "
                                         r"norms in GPT2Block \(knows BERT .*\); use init=random$"):  # fmt: skip
        peftlab.attach(model, "lst", reduction_factor=4, init="pruned")
    assert not any(isinstance(m, LadderBlock) for m in model.modules())  # refused before any block was wrapped


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_layer_dropping_shrinks_the_side_network_its_parameters_and_the_saved_activations(kind):
    every = peftlab.attach(model_of(kind), "lst", reduction_factor=4)
    dropped = peftlab.attach(model_of(kind), "lst", reduction_factor=4, side_layers=[1])
    assert [layer.side is not None for layer in every.layers().values()] == [True, True]
    assert [layer.side is not None for layer in dropped.layers().values()] == [False, True]
    first = every.layers()[next(iter(every.layers()))]
    block_0 = sum(p.numel() for m in (first.side, first.down) for p in m.parameters()) + first.alpha.numel()

    def trainable(adapter) -> int:
        return sum(p.numel() for p in adapter.trainable_parameters())

    assert trainable(every) - trainable(dropped) == block_0
    assert dropped.layers()[next(iter(dropped.layers()))].embed_down is not None  # x_0 = D_0 e still starts there
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 32), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 2}
    # tiny BERT: 251 kB with both blocks, 148 kB with block 0 dropped (Llama: 317, 213)
    saved = {
        n: memory(kind, "lst", batch, side_layers=layers)["activations"] for n, layers in (("all", None), ("one", [1]))
    }
    assert saved["all"] - saved["one"] >= 8 * 32 * 32 * 4  # at least h_0 (B, T, d) in fp32, which no ladder reads now


def test_the_cli_takes_init_and_side_layers():
    parser = Parser(prog="train")
    add_fields(parser, LSTConfig)
    namespace = parser.parse_args(["--init", "pruned", "--side-layers", "0", "2"])
    assert cli_values(namespace, [LSTConfig]) == {"init": "pruned", "side_layers": [0, 2]}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"reduction_factor": 0}, "reduction_factor: expected an integer >= 1, got 0"),
        ({"reduction_factor": 64}, "reduction_factor: the hidden size is 32, so it can be at most 32, got 64"),
        ({"side_heads": 0}, "side_heads: expected an integer >= 1, got 0"),
        ({"side_heads": 3}, "side_heads: must divide the side width 32 / 8 = 4, got 3"),
        ({"gate_temperature": 0.0}, "gate_temperature: expected a finite number > 0, got 0.0"),
        ({"dropout": 1.0}, r"dropout: expected a number in \[0, 1\), got 1.0"),
        ({"init": "magnitude"}, "lst options: init: expected one of random, pruned, got 'magnitude'"),
        (
            {"init": "pruned", "reduction_factor": 2, "side_heads": 1},  # one head 16 wide
            re.escape(
                "side_heads: init=pruned prunes backbone heads (8 wide), so side heads can be at most 8 wide: "
                "expected at least 2 heads for a side width of 16, got 1"
            ),
        ),
        (
            {"side_layers": [2]},
            re.escape("side_layers: expected block indices in 0..1 (the model has 2 blocks), got [2]"),
        ),
        (
            {"side_layers": []},
            re.escape("side_layers: expected a non-empty list of distinct block indices >= 0, got []"),
        ),
        (
            {"side_layers": [1, 1]},
            re.escape("side_layers: expected a non-empty list of distinct block indices >= 0, got [1, 1]"),
        ),
        (
            {"side_layers": [-1]},
            re.escape("side_layers: expected a non-empty list of distinct block indices >= 0, got [-1]"),
        ),
        ({"side_layers": ["x"]}, "lst options: side_layers: expected an integer, got 'x'"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(InputError, match=f"^{message}$"):
        peftlab.attach(tiny_classifier(), "lst", **options)


def test_cli_trains_sft_on_a_tiny_llama_generates_and_refuses_to_merge(cli, tiny_llama_dir, tmp_path):
    from tests.test_sft import instruction_rows

    code, out, _ = cli("methods", "lst")
    assert code == 0 and "--reduction-factor" in out and "--gate-temperature" in out and "arXiv:2206.06522" in out
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(32)))
    run = tmp_path / "run"
    code, _, err = cli("train", "--task", "sft", "--model", tiny_llama_dir, "--data", data, "--out", run,
                       "--method", "lst", "--reduction-factor", "4", "--max-length", "48",
                       "--epochs", "2", "--eval-generate", "4")  # fmt: skip
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["lr"] == 3e-3
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]
    assert "exact_match" in results["metrics"]["test"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello how are you\n")
    code, text, err = cli("generate", run, "--prompts", prompts)
    assert code == 0 and text.strip(), err
    code, _, err = cli("merge", run, "--out", tmp_path / "merged")
    assert code == 2 and err == "error: method 'lst' has no weight form and cannot be merged\n"
