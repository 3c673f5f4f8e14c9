"""One-row matrix products with the block's elementwise work folded in: the batch-1 decode step (Triton).

At batch 1 a LLaMA block reads each weight once per token, and between its four products it runs small
kernels of its own: the residual add and RMSNorm before q/k/v and before gate/up, SwiGLU before down.
Inside a CUDA graph each costs its launch and a drain of the GPU (on an H200, a 7B step spent ~0.3 ms of
4.5 in them, `docs/benchmarks/scale_study.md`; a step of the 135M default model is mostly such gaps).
Here each product takes its input's elementwise work into its own loop over the input row, which every
program reads anyway:

- RMSNorm: sum_k w_nk (g_k x_k / rms(x)) = (sum_k w_nk g_k x_k) / rms(x), so each program accumulates
  the row's sum of squares beside its products and scales its outputs at the end (no pass before);
- SwiGLU: the row is [gate, up], and silu(gate) * up is formed as it is read;
- the residual add that ends a half of the block: out = residual + product, in the products' epilogue.

A block is then four products, the rotary/cache-write kernel and attention. Each program streams a strip
of BLOCK_N output rows of the weight, as `quant/gemv_triton.py` does (its H100 measurements: as fast as
cuBLAS at one row, with a per-row int8 scale 1.5x faster). Values round as the unfused block rounds them
where it can (the product's output in the activation dtype before the residual add, the SwiGLU output);
the normalised row stays in fp32, so results differ from the unfused block's by rounding only.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..quant.linear import QuantizedLinear

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused block serves every step
    triton = None

NONE, RMSNORM, SWIGLU = 0, 1, 2  # what is folded in before the product


def available(x: torch.Tensor) -> bool:
    """Whether these kernels can run on `x`'s device (Triton's CPU interpreter counts, for tests)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def foldable(linear: nn.Module) -> bool:
    """A layer these kernels read: a plain linear layer or an int8 one (quant/linear.py), without bias."""
    if isinstance(linear, QuantizedLinear):
        return linear.mode == "int8" and linear.bias is None
    return isinstance(linear, nn.Linear) and linear.bias is None


def decode_product(x: torch.Tensor, linear: nn.Module, norm: nn.Module | None = None, swiglu: bool = False,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` applied to one row `x` (any shape holding one row: [..., K], or [..., 2K] with `swiglu`),
    after `norm` (an RMSNorm with `weight` and `eps`) or SwiGLU, plus `residual` if given. Returns a row
    of `linear.out_features` in x's shape."""
    if isinstance(linear, QuantizedLinear):
        weight, scale = linear.qweight, linear.scale
    else:
        weight, scale = linear.weight, None
    N, K = weight.shape
    row = x.reshape(-1)
    if row.shape[0] != (2 * K if swiglu else K):
        raise ValueError(f"decode_product takes one row of {2 * K if swiglu else K} values, got {tuple(x.shape)}")
    out = torch.empty(N, dtype=x.dtype, device=x.device)
    prologue = SWIGLU if swiglu else RMSNORM if norm is not None else NONE
    args = (row.contiguous(), weight, out if scale is None else scale, out if norm is None else norm.weight,
            out if residual is None else residual.reshape(-1), out, N, float(norm.eps) if norm is not None else 0.0,
            K, prologue, scale is not None, residual is not None)
    if os.environ.get("TRITON_INTERPRET") == "1":
        _decode_gemv_kernel[(triton.cdiv(N, 16),)](*args, BLOCK_N=16, BLOCK_K=64)
    else:
        _tuned()[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args)
    return out.view(*x.shape[:-1], N)


if triton is not None:

    @triton.jit
    def _decode_gemv_kernel(x_ptr, w_ptr, scale_ptr, norm_ptr, res_ptr, out_ptr, N, eps, K: tl.constexpr,
                            PROLOGUE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # w: [N, K] (half precision, or int8 with a per-row fp32 scale). K is a compile-time constant: a
        # model has a few widths, and masks on the last block then fold away where BLOCK_K divides it.
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        act = out_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):  # a for loop, so that Triton pipelines the loads across iterations
            kk = k + ks
            k_ok = kk < K
            if PROLOGUE == 2:  # SwiGLU: silu(gate) * up, rounded as the unfused kernel stores it
                gate = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                up = tl.load(x_ptr + K + kk, mask=k_ok, other=0.0).to(tl.float32)
                x = (gate * tl.sigmoid(gate) * up).to(act).to(tl.float32)
            else:
                x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                if PROLOGUE == 1:  # RMSNorm: the gain now, 1 / rms(x) once the whole row has been seen
                    squares += x * x
                    x = x * tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        if PROLOGUE == 1:
            out = out / tl.sqrt(tl.sum(squares, axis=0) / K + eps)
        if HAS_SCALE:
            out = out * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        if HAS_RESIDUAL:  # the product rounds to the activation dtype first, as a separate add would see it
            out = out.to(act).to(tl.float32) + tl.load(res_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, out.to(act), mask=col_ok)


_TUNED = None


def _tuned():
    """The kernel autotuned per shape and variant (block sizes for a strip of rows; built on first use)."""
    global _TUNED
    if _TUNED is None:
        # 18 configs: each shape and variant compiles them all once (Triton caches them on disk after).
        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
                   for n in (4, 8, 16) for k in (128, 256, 512) for w in (4, 8)]
        _TUNED = triton.autotune(configs=configs, key=["N", "K", "PROLOGUE", "HAS_SCALE", "HAS_RESIDUAL"])(
            _decode_gemv_kernel)
    return _TUNED
