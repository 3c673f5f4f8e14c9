"""Projections that read the same input, fused into one matrix product.

A decode step multiplies every weight matrix by a handful of rows: each product is a memory-bound
kernel of its own, and small ones neither fill the GPU nor amortise their launch. Fusing q/k/v into
one product, and LLaMA's gate/up into another, leaves four products per block instead of seven, each
larger. Done once after loading, sharding and quantizing (quantization is per output row, so fusing
quantized layers gives what quantizing the fused one would). Fused models no longer carry Hugging
Face's parameter names, so models whose weights are to be saved (boost-tuning) stay unfused.
"""

from __future__ import annotations

import torch
from torch import nn


def concat_linears(linears: list[nn.Module]) -> nn.Module:
    """One linear layer whose output is the outputs of `linears`, concatenated (quantized ones too)."""
    from ..quant.linear import QuantizedLinear

    first = linears[0]
    if isinstance(first, QuantizedLinear):
        return QuantizedLinear.concat(linears)
    fused = nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused.requires_grad_(False)


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse every block's input projections in place (idempotent); returns `model`."""
    for module in model.modules():
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()
    return model
