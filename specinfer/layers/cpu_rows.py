"""Products of two or three rows on a CPU, computed as four (fp32 models: in bf16, oneDNN's products
of 1 to 4 rows cost alike, and padding would only add work).

On a CPU the small trees the adaptive engine drafts are verified in passes of two to four tokens, and
the SSM's tree levels are as narrow. With PyTorch's MKL on a 2-core AMD EPYC, the default model's 2- and
3-token passes took 98 and 122 ms against 81 ms for 4 tokens and 56 ms for one (fp32,
`benchmarks/cpu_rows.py`); with every 2- and 3-row product padded to 4 rows of which the last are zeros,
they take 84 ms. Timing single products does not show it (a layer timed alone has its
weights in cache, where 2 rows are as fast as 4): the slow path is the one that streams weights from
memory, as a pass does. Where the BLAS is fast at 2 rows, 4 rows cost about as much, since reading the
weights, not the arithmetic, bounds such products. A padded product differs from the plain one by
rounding only (another summation order inside the BLAS), as products of other row counts do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PADDED_ROWS = 4


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, a product of 2 or 3 rows on a CPU computed as 4 rows."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or not 1 < rows < PADDED_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    padded = torch.cat([flat, flat.new_zeros(PADDED_ROWS - rows, flat.shape[1])])
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


class RowPaddedLinear(nn.Linear):
    """An `nn.Linear` (the same parameters; `pad_small_products` turns layers into it) whose products of
    2 or 3 rows on a CPU run as 4 rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_rows(x, self.weight, self.bias)


def pad_small_products(model: nn.Module) -> nn.Module:
    """Turn `model`'s plain linear layers (not quantized ones, not other subclasses) into
    `RowPaddedLinear`, in place: for models that run on a CPU."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RowPaddedLinear
    return model
