"""Weight-only quantization (int8 per channel, int4 per group) of a loaded model; see linear.py."""

from .linear import MODES, QuantizedLinear, quantize_model

__all__ = ["MODES", "QuantizedLinear", "quantize_model"]
