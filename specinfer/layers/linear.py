"""Linear layers whose decode-sized products on the GPU go through our matrix-vector kernel.

A decode step multiplies each weight matrix by one row (a few for small trees). cuBLAS serves such
products with kernels that stream the weights well below the memory bandwidth; our Triton kernel
(`quant/gemv_triton.py`, shared with int8 weights) streams each weight once with pipelined loads.
Larger products (prefill, big trees, big batches) stay with cuBLAS, where they are compute-bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GemvLinear(nn.Linear):
    """`nn.Linear` sharing the parameters of the layer it replaces; same outputs up to rounding."""

    max_rows = 4  # quant/gemv_triton.MAX_ROWS, without importing Triton on CPU-only installs

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GemvLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == self.weight.dtype \
                and x.numel() <= self.max_rows * self.in_features and not torch.is_grad_enabled():
            return self._gemv(x)
        return F.linear(x, self.weight, self.bias)

    @torch.compiler.disable  # an autotuned Triton kernel: compiled code calls it as it is
    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        from ..quant.gemv_triton import gemv

        out = gemv(x.reshape(-1, self.in_features).contiguous(), self.weight).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def use_gemv(model: nn.Module) -> nn.Module:
    """Replace every full-precision `nn.Linear` of `model` (LM head included) by a `GemvLinear`, in place."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, GemvLinear.from_linear(module))
    return model
