"""Kernel fusion for small-batch steps: each transformer block through `torch.compile`.

At batch 1 a block of a 135M model, or even of a 7B one, runs dozens of tiny elementwise kernels
(norms, rotary embedding, SwiGLU, residuals) around its matrix products, and at ~2 us each they cost as
much as reading the weights. Inductor fuses them into a few Triton kernels. Attention over the KV cache
stays eager (`cached_attention` is excluded: its cache writes must land in place), so each block
compiles into two graphs around it; CUDA graphs then replay the fused kernels as before. The blocks of
one model share their code, so one compilation serves them all (and the early-exit drafts that reuse
them). Compilation happens on the first passes of each shape, which the engine's warm-up absorbs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpecInferError


def compile_blocks(model: nn.Module) -> nn.Module:
    """Compile every block of `model` in place (idempotent). Not for tensor-parallel or offloaded models:
    their collectives and weight-swapping hooks run between the fused parts."""
    if getattr(model, "tp", None) is not None or getattr(model, "streamer", None) is not None:
        raise SpecInferError("compiling is not supported with tensor parallelism or offloading")
    # Every (batch, tokens) bucket and every model shape in the process is one more specialisation of the
    # shared block code; past dynamo's default limit of 8 it would silently fall back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.layers:
        if not getattr(block, "compiled", False):
            block.forward = torch.compile(block.forward, dynamic=None)
            block.compiled = True
    return model
