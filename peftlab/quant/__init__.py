"""Quantised base layers: NF4 weights with double quantisation (see ``peftlab.quant.nf4``)."""

from .nf4 import NF4Linear, NF4Weight, dynamic_levels, nf4_levels, quantization_error, quantize_nf4

__all__ = ["NF4Linear", "NF4Weight", "dynamic_levels", "nf4_levels", "quantization_error", "quantize_nf4"]
