"""4-bit NormalFloat (NF4) weights with double quantisation, in plain PyTorch.

QLoRA (Dettmers, Pagnoni, Holtzman and Zettlemoyer, 2023, https://arxiv.org/abs/2305.14314) stores a frozen
weight matrix W in 4 bits per entry and dequantises it on the fly. As implemented here:

Block-wise absmax NF4 (block of B = 64 consecutive entries of the flattened W)::

    c_b   = max_{i in b} |W_i|                        one fp32 absmax constant per block
    q_i   = argmin_k |W_i / c_b - nf4[k]|             a 4-bit code (nearest level; a tie goes to the lower one)
    W'_i  = nf4[q_i] * c_b                            the dequantised weight

Two codes are packed per byte, the first of each pair in the high nibble (the layout bitsandbytes uses, so packed
weights are interchangeable). A last, partial block has its own absmax over the entries it has.

The NF4 code book ``nf4`` holds 16 levels in [-1, 1] placed at quantiles of N(0, 1), so that each level is about
equally likely for normally distributed weights, with an exact zero: 8 positive levels at
``Phi^-1(p)`` for p evenly spaced from 1/2 (excluded) to ``delta``, 7 negative levels at ``-Phi^-1(p)`` for p
evenly spaced from 1/2 (excluded) to ``delta``, and 0, all divided by ``Phi^-1(delta)``. ``Phi^-1(1)`` is
infinite, so the outermost quantile is taken half a bin short of 1, averaged over the 15- and 16-bin spacings:
``delta = ((1 - 1/30) + (1 - 1/32)) / 2 = 0.96770833``. Computed as the published table was (delta written as
0.9677083, the probability grid and the final division in float32, ``Phi^-1`` in float64) the levels equal the
paper's table (Appendix E) bit for bit; in exact arithmetic they differ from it by at most 3e-7.

Double quantisation of the absmax constants (block of 256 constants)::

    m     = mean(c)                                   one fp32 number per weight matrix
    d_g   = max_{b in g} |c_b - m|                    one fp32 scale per group g of 256 constants
    k_b   = argmin_j |(c_b - m) / d_g - dyn8[j]|      an 8-bit code per constant
    c'_b  = dyn8[k_b] * d_g + m

``dyn8`` is the signed 8-bit dynamic (tree) code of Dettmers 2016 (https://arxiv.org/abs/1511.04561), the
"8-bit float" of the paper: for each decimal exponent e = 0..6, 2^e magnitudes at the midpoints of 2^e equal bins
of [0.1, 1], times 10^(e - 6), with both signs (254 values), plus 0 and +1. It is dense near zero and keeps about
two significant digits everywhere, so small centred constants survive. Subtracting the mean first centres the
(all positive) constants, so the symmetric code's negative half is used.

Stored bits per weight: 4 (code) + 8/64 (absmax code) + 32/(64*256) (group scale) + 32/n (the mean) =
4.127 for large n, against 4 + 32/64 = 4.5 without double quantisation. The two code books are shared constants.

``NF4Linear`` is a frozen linear layer holding such a weight and its bias; its forward dequantises and multiplies
inside an autograd function whose backward dequantises again, so no dense weight is kept alive for the backward
pass. With bitsandbytes installed and the input on a CUDA device, bitsandbytes' fused 4-bit kernels run instead
(the layouts are identical).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256
NF4_ZERO_CODE = 7  # the index of the level 0.0


@functools.cache
def _nf4_levels() -> torch.Tensor:
    """The NF4 code book, built as the module docstring says (the published table, bit for bit)."""
    delta = 0.9677083  # ((1 - 1/30) + (1 - 1/32)) / 2, as the published table wrote it
    positive = torch.special.ndtri(torch.linspace(0.5, delta, 9).double())[1:]  # 8 levels; Phi^-1(1/2) = 0 dropped
    negative = -torch.special.ndtri(torch.linspace(0.5, delta, 8).double())[1:]  # 7 levels
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values.float()
    return levels / levels.max()  # (16,), ascending, -1 ... 0 ... 1


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact zero (fp32)."""
    return _nf4_levels().clone()


@functools.cache
def _dynamic_levels() -> torch.Tensor:
    """The signed 8-bit dynamic code: 0, +1 and, per decimal exponent, 2^e magnitudes of both signs."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1)  # 2^e equal bins of [0.1, 1]
        magnitudes = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()  # float32 arithmetic throughout
        values += magnitudes + [-m for m in magnitudes]
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


def dynamic_levels() -> torch.Tensor:
    """The 256 levels of the signed 8-bit dynamic code, ascending, in [-1, 1] (fp32)."""
    return _dynamic_levels().clone()


@functools.cache
def _on_device(which: str, device: torch.device) -> torch.Tensor:
    """A code book on ``device`` (cached); ``nf4_pairs`` maps a packed byte to its two levels, (256, 2)."""
    if which == "nf4":
        return _nf4_levels().to(device)
    if which == "dynamic":
        return _dynamic_levels().to(device)
    levels = _nf4_levels()
    return torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1).to(device)  # byte -> (hi, lo)


def quantize_blocks(x: torch.Tensor, levels: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantisation of a flat tensor onto ascending ``levels`` in [-1, 1].

    Returns the codes, (n,) uint8 indices into ``levels``, and the absmax constant of each block, (blocks,) fp32.
    """
    n = x.numel()
    blocks = F.pad(x.float(), (0, -n % block_size)).view(-1, block_size)  # (blocks, block); zeros leave absmax alone
    absmax = blocks.abs().amax(dim=1)  # (blocks,)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]; an all-zero block: 0
    midpoints = (levels[1:] + levels[:-1]) / 2  # x <= midpoint k goes to level k: nearest, ties to the lower
    codes = torch.bucketize(scaled.reshape(-1)[:n], midpoints.to(x.device))
    return codes.to(torch.uint8), absmax


def dequantize_blocks(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """``values`` (n,), the looked-up levels, times their block's absmax: (n,) fp32."""
    n = values.numel()
    blocks = F.pad(values, (0, -n % block_size)).view(-1, block_size)  # (blocks, block)
    return (blocks * absmax[:, None]).reshape(-1)[:n]


def pack_nibbles(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """(n,) 4-bit codes -> (ceil(n/2),) uint8 bytes, the first code of each pair in the high nibble (an odd count
    is padded with ``pad_code``)."""
    codes = F.pad(codes, (0, codes.numel() % 2), value=pad_code)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: (n,) uint8 codes."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


@dataclass
class NF4Weight:
    """A weight matrix in NF4: packed codes and the (optionally double-quantised) absmax constants.

    Without double quantisation ``absmax`` is (blocks,) fp32 and the ``absmax_*`` fields are None; with it,
    ``absmax`` holds (blocks,) uint8 codes of the dynamic 8-bit code, ``absmax_scale`` (groups,) fp32 and
    ``absmax_mean`` () fp32.
    """

    codes: torch.Tensor  # (ceil(n/2),) uint8, two 4-bit codes per byte
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_mean: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the weight it stands for (what dequantise returns)
    block_size: int
    absmax_block_size: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def storage(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a layer registers as buffers)."""
        names = ("codes", "absmax", "absmax_scale", "absmax_mean")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage().values())

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / self.numel

    def block_absmax(self) -> torch.Tensor:
        """The absmax constant of every block, (blocks,) fp32, dequantised if double-quantised."""
        if not self.double_quant:
            return self.absmax
        dynamic = _on_device("dynamic", self.absmax.device)
        centred = dequantize_blocks(dynamic[self.absmax.long()], self.absmax_scale, self.absmax_block_size)
        return centred + self.absmax_mean

    def dequantize(self) -> torch.Tensor:
        """The weight W' this stands for, of ``shape`` and ``dtype``."""
        pairs = _on_device("nf4_pairs", self.codes.device)
        levels = pairs[self.codes.long()].reshape(-1)[: self.numel]  # (n,) fp32, each code's level
        return dequantize_blocks(levels, self.block_absmax(), self.block_size).view(self.shape).to(self.dtype)


def quantize_nf4(
    weight: torch.Tensor,
    block_size: int = NF4_BLOCK_SIZE,
    double_quant: bool = True,
    absmax_block_size: int = ABSMAX_BLOCK_SIZE,
) -> NF4Weight:
    """Quantise ``weight`` to NF4 in blocks of ``block_size``; with ``double_quant`` the absmax constants are
    quantised again to 8 bits in blocks of ``absmax_block_size``, after subtracting their mean."""
    weight = weight.detach()
    codes, absmax = quantize_blocks(weight.reshape(-1), _on_device("nf4", weight.device), block_size)
    packed = pack_nibbles(codes, pad_code=NF4_ZERO_CODE)
    scale = mean = None
    if double_quant:
        mean = absmax.mean()
        absmax, scale = quantize_blocks(absmax - mean, _on_device("dynamic", weight.device), absmax_block_size)
    shape = tuple(weight.shape)
    return NF4Weight(packed, absmax, scale, mean, shape, weight.dtype, block_size, absmax_block_size)


@torch.no_grad()
def quantization_error(weight: torch.Tensor, dequantized: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error ||W - W'||_F / ||W||_F and the largest absolute error max |W - W'|."""
    weight, diff = weight.float(), dequantized.float() - weight.float()
    norm = torch.linalg.vector_norm(weight)
    return {
        "relative_frobenius": float(torch.linalg.vector_norm(diff) / norm) if norm > 0 else 0.0,
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
    }


class _NF4Matmul(torch.autograd.Function):
    """``y = x W'^T + b`` with W' dequantised in forward and again in backward; only the packed weight is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight: NF4Weight) -> torch.Tensor:
        ctx.weight = weight  # references the layer's packed storage; no dense weight outlives this call
        ctx.input_dtype = x.dtype
        ctx.has_bias = bias is not None
        return F.linear(x, weight.dequantize().to(x.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.weight.dequantize().to(grad_out.dtype)  # (out, in)
            grad_x = (grad_out @ w).to(ctx.input_dtype)  # (..., in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, grad_bias, None


def _bitsandbytes():
    """bitsandbytes if it is installed (never required), else None."""
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: ``y = x W'^T + b`` with ``W' = dequantize(codes)``.

    Its state dict is that of the ``nn.Linear`` it stands for (``weight`` dequantised, ``bias``), so a model
    holding NF4 layers saves as a plain model that ``transformers`` loads and that gives the same outputs.
    """

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-d weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.layout = {k: getattr(weight, k) for k in ("shape", "dtype", "block_size", "absmax_block_size")}
        for name, tensor in weight.storage().items():
            self.register_buffer(name, tensor, persistent=False)
        self.double_quant = weight.double_quant
        self.bias = bias
        self.error: dict[str, float] | None = None  # quantisation error, when built from a dense weight

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = NF4_BLOCK_SIZE,
        double_quant: bool = True,
        absmax_block_size: int = ABSMAX_BLOCK_SIZE,
    ) -> NF4Linear:
        return cls.from_weight(linear.weight, linear.bias, block_size, double_quant, absmax_block_size)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: nn.Parameter | None,
        block_size: int = NF4_BLOCK_SIZE,
        double_quant: bool = True,
        absmax_block_size: int = ABSMAX_BLOCK_SIZE,
    ) -> NF4Linear:
        """Quantise a dense ``weight`` (out, in) and record the quantisation error."""
        layer = cls(quantize_nf4(weight, block_size, double_quant, absmax_block_size), bias)
        layer.error = quantization_error(weight, layer.dequantized_weight())
        return layer

    @property
    def weight_nf4(self) -> NF4Weight:
        return NF4Weight(
            self.codes,
            self.absmax,
            getattr(self, "absmax_scale", None),
            getattr(self, "absmax_mean", None),
            **self.layout,
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the dense weight this layer stands for (and computes in)."""
        return self.layout["dtype"]

    def quantization_settings(self) -> dict:
        return {
            "block_size": self.layout["block_size"],
            "double_quant": self.double_quant,
            "absmax_block_size": self.layout["absmax_block_size"],
        }

    def dequantized_weight(self) -> torch.Tensor:
        """The dense weight W' (out, in) this layer computes with (a new tensor)."""
        return self.weight_nf4.dequantize()

    def packed_parameter_count(self) -> int:
        """The weights held in the packed buffers (peftlab's accounting counts them as parameters)."""
        return self.in_features * self.out_features

    def nbytes(self) -> int:
        """Bytes of the stored weight (codes and constants; the bias is not counted)."""
        return self.weight_nf4.nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb_layout = not self.double_quant or self.layout["absmax_block_size"] == ABSMAX_BLOCK_SIZE
        if x.is_cuda and bnb_layout and (bnb := _bitsandbytes()) is not None:
            return self._bitsandbytes_forward(bnb, x)
        return _NF4Matmul.apply(x, self.bias, self.weight_nf4)

    def _bitsandbytes_forward(self, bnb, x: torch.Tensor) -> torch.Tensor:
        """The same product through bitsandbytes' 4-bit kernels (same packed layout and code books)."""
        from bitsandbytes.functional import QuantState

        nested = None
        if self.double_quant:
            nested = QuantState(
                absmax=self.absmax_scale,
                code=_on_device("dynamic", x.device),
                blocksize=self.layout["absmax_block_size"],
                dtype=torch.float32,
            )
        state = QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.layout["shape"]),
            code=_on_device("nf4", x.device),
            blocksize=self.layout["block_size"],
            quant_type="nf4",
            dtype=self.layout["dtype"],
            offset=getattr(self, "absmax_mean", None),
            state2=nested,
        )
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.codes.view(-1, 1).t(), state, bias=bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        destination[prefix + "weight"] = self.dequantized_weight()

    def extra_repr(self) -> str:
        settings = self.quantization_settings()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={settings['block_size']}, double_quant={settings['double_quant']}"
        )
