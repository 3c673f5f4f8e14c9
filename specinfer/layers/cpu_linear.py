"""CPU linear layers with their weights prepacked for oneDNN.

A CPU engine's passes are a chain of products of 1 to a few dozen rows whose weights stream from memory.
PyTorch's `F.linear` hands each one to its BLAS with the weight as it lies, to be blocked anew on every
call; oneDNN can block the weight once (`torch.ops.mkldnn._reorder_linear_weight`) and multiply by the
blocked copy (`_linear_pointwise`, the kernels that Inductor's CPU freezing uses). The default model's
passes on a 2-core AMD EPYC (Zen 4), 200 cached tokens (`python benchmarks/cpu_linear.py`,
docs/benchmarks/cpu_linear_cpu.md):

| tokens in the pass | fp32 plain | fp32 packed | bf16 plain | bf16 packed |
|---:|---:|---:|---:|---:|
| 1 | 54.7 ms | 36.6 ms | 33.9 ms | 27.3 ms |
| 2 | 91.2 | 40.5 | 32.8 | 27.5 |
| 4 | 77.6 | 44.0 | 35.1 | 25.3 |
| 21 | 103.2 | 69.1 | 50.0 | 39.4 |

(fp32's slow 2- and 3-row products, which an earlier engine padded to 4 rows, are gone too.) A packed
product differs from the plain one by rounding only. The packed copy replaces the weight, so memory does
not grow, except where the weight is shared with another module (a head tied to the embedding keeps the
embedding's table besides its packed copy).
"""

from __future__ import annotations

import torch
from torch import nn

_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build packs linear weights of `dtype` for oneDNN on the CPU."""
    return (dtype in _PACKED_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] blocked for oneDNN (an opaque tensor that only `packed_product` reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` from `pack_weight(weight)`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An `nn.Linear` (`pack_linears` turns layers into it) that multiplies by its packed weight. The
    `weight` parameter is dropped where nothing else holds it."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_product(x if x.is_contiguous() else x.contiguous(), self.packed, self.bias)


def pack_linears(models: list[nn.Module]) -> None:
    """Turn the plain linear layers of `models` (inference on a CPU; not quantized layers or other
    subclasses) into `PackedLinear`s, in place. Layers the models share are packed once. The weight is
    kept where another module holds it too (a tied head) and for LM heads, whose weight later models may
    share (`load_model(shared_from=...)`, as boost-tuning's SSMs do); other layers keep only the packed copy."""
    modules = {id(m): (name, m) for model in models for name, m in model.named_modules()}
    holders: dict[int, int] = {}
    for _, module in modules.values():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    for name, module in modules.values():
        if type(module) is not nn.Linear or module.weight.dtype not in _PACKED_DTYPES:
            continue
        module.packed = pack_weight(module.weight)
        if module.bias is not None:
            module.bias.requires_grad_(False)
        keep = holders[id(module.weight)] > 1 or name.rsplit(".", 1)[-1] == "lm_head"
        module.__class__ = PackedLinear
        if not keep:
            del module.weight  # the packed copy is the only one
