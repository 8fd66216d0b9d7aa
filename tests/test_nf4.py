"""NF4 with double quantisation: the code books, the paper's equations checked with reference code, the packed
layout, bits per weight, NF4Linear's forward/backward and memory, and parity with bitsandbytes when installed."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.quant.nf4 import (
    NF4Linear,
    NF4Weight,
    dynamic_levels,
    nf4_levels,
    pack_nibbles,
    quantization_error,
    quantize_nf4,
    unpack_nibbles,
)

# Appendix E of the QLoRA paper (arXiv:2305.14314)
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def weight(shape=(96, 80), seed=0, std=0.05) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def test_nf4_levels_are_the_published_table():
    assert torch.equal(nf4_levels(), torch.tensor(PUBLISHED_NF4))


def test_nf4_levels_are_normal_quantiles_with_an_exact_zero():
    # exact arithmetic: delta = ((1 - 1/30) + (1 - 1/32)) / 2, quantiles in float64
    delta = ((1 - 1 / 30) + (1 - 1 / 32)) / 2
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    positive = [normal.icdf(torch.tensor(0.5 + (delta - 0.5) * i / 8, dtype=torch.float64)) for i in range(1, 9)]
    negative = [-normal.icdf(torch.tensor(0.5 + (delta - 0.5) * i / 7, dtype=torch.float64)) for i in range(1, 8)]
    exact = torch.tensor(sorted([*negative, 0.0, *positive]), dtype=torch.float64) / max(positive)
    torch.testing.assert_close(nf4_levels().double(), exact, rtol=0, atol=3e-7)
    levels = nf4_levels()
    assert levels[7] == 0 and levels[0] == -1 and levels[-1] == 1
    assert (levels[1:] > levels[:-1]).all()


def test_dynamic_code_has_256_ascending_levels_from_tiny_to_one():
    levels = dynamic_levels()
    assert levels.shape == (256,) and (levels[1:] > levels[:-1]).all()
    assert levels[-1] == 1.0 and 0.0 in levels
    assert levels[0].item() == pytest.approx(-(1 - 0.9 / 128))  # the top midpoint of 64 bins of [0.1, 1]
    assert levels[levels > 0].min().item() == pytest.approx(0.55e-6)  # the one midpoint of [0.1, 1], times 1e-6
    assert int((levels < 0).sum()) == 127 and int((levels > 0).sum()) == 128


def reference_blockwise(x: torch.Tensor, levels: torch.Tensor, block: int):
    """The block-wise absmax equations, element by element: nearest level by argmin (first index on ties)."""
    codes, absmax = [], []
    for start in range(0, len(x), block):
        chunk = x[start : start + block]
        c = chunk.abs().max()
        absmax.append(c)
        scaled = chunk / c if c > 0 else chunk
        codes.append((scaled[:, None] - levels[None, :]).abs().argmin(dim=1))
    return torch.cat(codes), torch.stack(absmax)


@pytest.mark.parametrize("shape", [(96, 80), (7, 9)])
def test_quantisation_follows_the_equations(shape):
    w = weight(shape)
    q = quantize_nf4(w, double_quant=False)
    codes, absmax = reference_blockwise(w.reshape(-1), nf4_levels(), 64)
    assert torch.equal(unpack_nibbles(q.codes, w.numel()).long(), codes)
    assert torch.equal(q.absmax, absmax)
    expected = (nf4_levels()[codes].view(-1) * absmax.repeat_interleave(64)[: w.numel()]).view(shape)
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)


def test_double_quantisation_follows_the_equations():
    w = weight((256, 128))  # 512 blocks of 64 -> 2 groups of 256 constants
    q = quantize_nf4(w, double_quant=True)
    _, absmax = reference_blockwise(w.reshape(-1), nf4_levels(), 64)
    mean = absmax.mean()
    codes8, scale = reference_blockwise(absmax - mean, dynamic_levels(), 256)
    assert torch.equal(q.absmax.long(), codes8) and torch.equal(q.absmax_scale, scale) and q.absmax_mean == mean
    assert q.absmax.dtype == torch.uint8 and q.absmax_scale.shape == (2,)
    recovered = dynamic_levels()[codes8] * scale.repeat_interleave(256) + mean
    torch.testing.assert_close(q.block_absmax(), recovered, rtol=0, atol=0)
    # the 8-bit constants are close to the fp32 ones
    assert (q.block_absmax() - absmax).abs().max() < 0.01 * absmax.max()


def test_two_codes_per_byte_first_in_the_high_nibble():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_nibbles(codes, pad_code=7)
    assert packed.tolist() == [0x12, 0xF0, 0x77]
    assert torch.equal(unpack_nibbles(packed, 5), codes)


def test_bits_per_parameter():
    w = weight((384, 384))  # 2304 blocks, 9 groups
    q = quantize_nf4(w)
    expected = 4 + 8 / 64 + 32 * 9 / w.numel() + 32 / w.numel()  # codes, 8-bit absmax, group scales, the mean
    assert q.bits_per_parameter() == pytest.approx(expected)
    assert q.bits_per_parameter() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # ~4.127
    assert quantize_nf4(w, double_quant=False).bits_per_parameter() == 4.5
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == w.numel() // 2


def test_quantisation_error_is_bounded_by_half_the_widest_level_gap():
    w = weight((128, 128))
    q = quantize_nf4(w, double_quant=False)
    gap = (nf4_levels()[1:] - nf4_levels()[:-1]).max() / 2
    bound = (gap * q.absmax).repeat_interleave(64).view(w.shape)
    assert ((q.dequantize() - w).abs() <= bound + 1e-7).all()
    error = quantization_error(w, quantize_nf4(w).dequantize())
    assert 0.05 < error["relative_frobenius"] < 0.1  # about 0.092 for Gaussian weights
    assert error["max_abs"] == pytest.approx(float((quantize_nf4(w).dequantize() - w).abs().max()))


def test_zero_blocks_and_odd_sizes_are_exact_where_they_can_be():
    w = torch.zeros(3, 64)
    w[1] = weight((64,))
    q = quantize_nf4(w)
    assert torch.equal(q.dequantize()[0], torch.zeros(64)) and torch.equal(q.dequantize()[2], torch.zeros(64))
    odd = weight((5, 13))
    assert quantize_nf4(odd).dequantize().shape == (5, 13)


def nf4_layer(bias=True, seed=0) -> tuple[NF4Linear, torch.Tensor]:
    linear = nn.Linear(128, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight((48, 128), seed))
    layer = NF4Linear.from_linear(linear).requires_grad_(False)
    return layer, layer.dequantized_weight()


def test_forward_and_input_gradient_equal_f_linear_with_the_dequantised_weight():
    layer, w = nf4_layer()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, w, layer.bias))
    grad = torch.randn_like(y)
    (ours,) = torch.autograd.grad(y, x, grad)
    (reference,) = torch.autograd.grad(F.linear(x, w, layer.bias), x, grad)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_a_trainable_bias_gets_its_gradient():
    layer, w = nf4_layer()
    layer.bias.requires_grad_(True)
    x = torch.randn(4, 128)
    layer(x).square().sum().backward()
    bias = layer.bias.detach().clone().requires_grad_(True)
    F.linear(x, w, bias).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, bias.grad)


def saved_for_backward(fn) -> list[torch.Tensor]:
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_backward_keeps_no_dense_weight_alive():
    layer, w = nf4_layer()
    x = torch.randn(6, 128, requires_grad=True)

    def dense(tensors):
        return [t for t in tensors if t.is_floating_point() and t.numel() >= w.numel()]

    assert dense(saved_for_backward(lambda: layer(x))) == []
    # the detector works: plain F.linear keeps the (48, 128) weight for the input gradient
    assert dense(saved_for_backward(lambda: F.linear(x, w, layer.bias)))


def test_bf16_autocast_runs_forward_and_backward():
    layer, w = nf4_layer()
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, -1), rtol=2e-2, atol=2e-2)


def test_state_dict_is_that_of_the_equivalent_linear():
    layer, w = nf4_layer()
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], w)
    plain = nn.Linear(128, 48)
    plain.load_state_dict(state)
    x = torch.randn(2, 128)
    assert torch.equal(plain(x), layer(x))


# --- parity with bitsandbytes (only where it is installed; it is never a dependency) --------------------------


@pytest.fixture(scope="module")
def bnb_functional():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f

    return bnb_f


def test_code_books_equal_bitsandbytes(bnb_functional):
    assert torch.equal(nf4_levels(), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_levels(), bnb_functional.create_dynamic_map(signed=True))


# Rows a multiple of the block long: bitsandbytes' CPU dequantisation kernel restarts blocks at every row, which
# differs from its own (flat) quantisation otherwise; odd rows take its generic path, which is flat too.
@pytest.mark.parametrize("shape", [(384, 384), (33, 65)])
def test_nf4_codes_and_dequantisation_equal_bitsandbytes(bnb_functional, shape):
    w = weight(shape, std=0.05)
    ours = quantize_nf4(w, double_quant=False)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(ours.codes, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state))


def test_double_quantisation_equals_bitsandbytes(bnb_functional):
    w = weight((1536, 384), std=0.05)
    ours = quantize_nf4(w)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.codes, packed.view(-1))
    assert torch.equal(ours.absmax_mean, state.offset) and torch.equal(ours.absmax_scale, state.state2.absmax)
    # bitsandbytes' CPU kernel picks the farther of two 8-bit levels at a few near-ties; ours picks the nearer
    differ = (ours.absmax != state.absmax).nonzero().view(-1)
    assert len(differ) <= 0.005 * len(ours.absmax)
    levels = dynamic_levels()
    _, absmax = reference_blockwise(w.reshape(-1), nf4_levels(), 64)
    target = (absmax[differ] - state.offset) / state.state2.absmax[differ // 256]  # what the 8-bit code stands for
    ours_gap = (levels[ours.absmax[differ].long()] - target).abs()
    theirs_gap = (levels[state.absmax[differ].long()] - target).abs()
    assert (ours_gap <= theirs_gap).all()
    # either side dequantises the other's storage exactly as the other does
    theirs_here = NF4Weight(
        packed.view(-1), state.absmax, state.state2.absmax, state.offset, tuple(w.shape), w.dtype, 64, 256
    )
    assert torch.equal(theirs_here.dequantize(), bnb_functional.dequantize_4bit(packed, state))
    state.absmax = ours.absmax
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(ours.codes.view(-1, 1), state))


def test_bitsandbytes_fast_path_computes_the_same_layer(bnb_functional):
    layer, w = nf4_layer()
    bnb = pytest.importorskip("bitsandbytes")
    x = torch.randn(3, 128, requires_grad=True)
    ours = layer(x)
    theirs = layer._bitsandbytes_forward(bnb, x)  # the CUDA path, run on the CPU here
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(g_theirs, g_ours, rtol=1e-5, atol=1e-5)
