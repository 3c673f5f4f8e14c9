"""Kernel fusion for small-batch steps: each transformer block's halves through `torch.compile`.

At batch 1 a block of a 135M model, or even of a 7B one, runs dozens of tiny elementwise kernels
(norms, rotary embedding, SwiGLU, residuals, the cache write) around its matrix products, and at ~2 us
each they cost as much as reading the weights. Inductor fuses them into a few Triton kernels. Attention
over the KV cache stays out (it has its own kernel), so what is compiled is the two halves around it:
`pre_attention` (the residual add and norm, the q/k/v product, the rotary embedding and the cache write,
which lands in place in the kernel that rotates the keys) and `post_attention` (the output product, the
second residual add and norm, the MLP). The residual add that ends a block is done by the next block's
norm, in one kernel with it. Shapes are dynamic, so one compilation per model width serves every batch
and token count (sizes 1 apart); the blocks of one model share it, and so do the early-exit drafts that
reuse them. CUDA graphs then replay the fused kernels as before.

One-token passes (batch-1 decoding) go further where the blocks allow (`fold_decode`): each product takes
its norm, SwiGLU or residual add into its own kernel (layers/decode_gemv.py), and what is compiled of the
block is the rotary embedding with the cache write (`rotate_and_store`). With `fold_rows`, passes of a
few tokens (tree verification, drafting levels) fold the same way through layers/rows_product.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpecInferError


def compile_blocks(model: nn.Module, fold_decode: bool = True, fold_rows: bool = False) -> nn.Module:
    """Compile every block of `model` in place (idempotent). Not for tensor-parallel or offloaded models:
    their collectives and weight-swapping hooks run between the fused parts. `fold_decode`: one-token
    passes through the folded kernels, on a GPU, where the model and its layers allow; `fold_rows`:
    passes of a few tokens too (layers/rows_product.py; unquantized layers)."""
    if getattr(model, "tp", None) is not None or getattr(model, "streamer", None) is not None:
        raise SpecInferError("compiling is not supported with tensor parallelism or offloading")
    # Each model width, and sizes of 1 (specialised by dynamo), is one more entry for the shared code.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.layers:
        if not getattr(block, "compiled", False):
            block.pre_attention = torch.compile(block.pre_attention, dynamic=True)
            block.post_attention = torch.compile(block.post_attention, dynamic=True)
            if hasattr(block, "rotate_and_store"):
                block.rotate_and_store = torch.compile(block.rotate_and_store, dynamic=True)
            block.compiled = True
    if hasattr(model, "fold_decode"):
        model.fold_decode = fold_decode
    if hasattr(model, "fold_rows"):
        model.fold_rows = fold_rows
    # Around the blocks, once per pass: the rotary angles (a handful of kernels) and the final norm (eight
    # eager kernels, one fused). A drafter runs a pass per tree level, so these count there.
    rotary, norm = getattr(model, "rotary", None), getattr(model, "norm", None)
    if rotary is not None and not getattr(rotary, "compiled", False):
        rotary.cos_sin = torch.compile(rotary.cos_sin, dynamic=True)
        rotary.compiled = True
    if norm is not None and not getattr(norm, "compiled", False):
        norm.forward = torch.compile(norm.forward, dynamic=True)
        norm.compiled = True
    return model
