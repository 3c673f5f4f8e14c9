"""Products over a few rows with the block's elementwise work folded in: verification and drafting (Triton).

The batch-1 decode step folds each RMSNorm, SwiGLU and residual add into the matrix product beside it
(decode_gemv.py). A pass over a token tree (the LLM verifying 2 to 128 tokens, an SSM expanding a level)
runs the same block on a few rows, and there each of those steps is still a kernel of its own: compiled,
a LLaMA block is about nine kernels (add + norm, q/k/v, rotary and cache write, attention, o, add + norm,
gate/up, SwiGLU, down). On a small model every kernel is latency-bound, so a pass costs about its count
of kernels (`docs/benchmarks/step_profile_gpu.md`: a 64-node step of the default model is 552 kernels).
Here the block is six: the same folds as decode_gemv's, on tiles of rows through `tl.dot`:

- RMSNorm: (g x / rms(x)) W^T = ((g x) W^T) / rms(x) per row, so the product takes g x as it loads the
  rows, sums each row's squares beside it, and scales its outputs at the end;
- SwiGLU: gate and up rows of the same units interleaved in a program's strip, silu(gate) * up written;
- the residual add: out = residual + product, in the epilogue.

Rounding differs from the unfused block's (there the normalised row rounds to the activation dtype
before the gain; here g x rounds before the product and 1 / rms is applied to the fp32 sums), by
rounding only. Plain weights without bias; quantized layers keep their own kernels.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused block serves every pass
    triton = None

MAX_ROWS = 128  # longer passes (prefills) keep the compiled halves: these tiles are sized for few rows


def foldable(linear: nn.Module) -> bool:
    """A plain linear layer without bias (what the kernel reads; fp32 ones too, computed in fp32)."""
    return isinstance(linear, nn.Linear) and linear.bias is None and linear.weight.dtype in (
        torch.float16, torch.bfloat16, torch.float32)


def rows_product(x: torch.Tensor, linear: nn.Linear, norm: nn.Module | None = None, gated: bool = False,
                 residual: torch.Tensor | None = None, heads: bool = False) -> torch.Tensor:
    """`linear` applied to the rows of `x` ([..., K], at most MAX_ROWS of them) after `norm` (an RMSNorm
    with `weight` and `eps`), plus `residual` if given (x's rows' shape with `linear.out_features`).
    `gated`: linear's rows are [gate; up] and the result is silu(gate) * up, half as wide. `heads`: x is
    attention's output [B, H, T, D], read in place as the rows [B * T, H * D] (no copy kernel); the
    result is then [B, T, out]."""
    N, K = linear.out_features, linear.in_features
    if heads:
        B, H, T, D = x.shape
        if H * D != K or x.stride(-1) != 1:
            raise ValueError(f"rows_product takes heads [B, H, T, D] with H * D = {K}, got {tuple(x.shape)}")
        rows, lead, strides = x, (B, T), (x.stride(0), x.stride(2), x.stride(1))
    else:
        T, D = 1, K
        rows, lead = x.reshape(-1, K).contiguous(), x.shape[:-1]
        strides = (K, 0, 0)
    M = math.prod(lead)
    if x.shape[-1] != D or M > MAX_ROWS:
        raise ValueError(f"rows_product takes up to {MAX_ROWS} rows of {K} values, got {tuple(x.shape)}")
    if gated and (N % 2 or residual is not None):
        raise ValueError("a gated product needs as many gate rows as up rows, and no residual")
    width = N // 2 if gated else N
    out = torch.empty(M, width, dtype=x.dtype, device=x.device)
    unread = out  # a placeholder for the pointers a variant does not read
    res = unread if residual is None else residual.reshape(M, width).contiguous()
    args = (rows, linear.weight, unread if norm is None else norm.weight, res, out, M, T, *strides, N,
            float(norm.eps) if norm is not None else 0.0, K, D, norm is not None, gated, residual is not None)
    if os.environ.get("TRITON_INTERPRET") == "1":  # tests: one small tile shape
        _rows_product_kernel[(triton.cdiv(M, 16), triton.cdiv(N, 32))](*args, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    else:
        _tuned()[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](*args)
    return out.view(*lead, width)


if triton is not None:

    @triton.jit
    def _rows_product_kernel(x_ptr, w_ptr, norm_ptr, res_ptr, out_ptr, M, T, stride_b, stride_t, stride_h,
                             N: tl.constexpr, eps, K: tl.constexpr, D: tl.constexpr, NORM: tl.constexpr,
                             GATED: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # x: row r = (b, t) = (r // T, r % T), column k = (h, d) = (k // D, k % D) at
        # b stride_b + t stride_t + h stride_h + d (plain rows: T 1, D K); out [M, N or N / 2] in the
        # activation dtype; w [N, K]. A program: BLOCK_M rows by a strip of BLOCK_N weight rows (gated:
        # BLOCK_N / 2 units, gate row u at 2i, up row N / 2 + u at 2i + 1).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        row_at = (rows // T).to(tl.int64) * stride_b + (rows % T) * stride_t
        strip = tl.arange(0, BLOCK_N)
        if GATED:
            units = tl.program_id(1) * (BLOCK_N // 2) + strip // 2
            cols = units + (strip % 2) * (N // 2)
            col_ok = units < N // 2
        else:
            cols = tl.program_id(1) * BLOCK_N + strip
            col_ok = cols < N
        act = out_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a = tl.load(x_ptr + row_at[:, None] + ((kk // D) * stride_h + kk % D)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if NORM:
                squares += tl.sum(a * a, axis=1)
                a = a * tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            b = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if b.dtype == tl.float32:  # fp32 layers compute in fp32 (no tf32)
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(b.dtype), tl.trans(b), acc)
        if NORM:
            acc = acc / tl.sqrt(squares / K + eps)[:, None]
        if GATED:  # gate and up round to the activation dtype first, as the unfused block stores them
            gate, up = tl.split(tl.reshape(acc.to(act).to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))
            units = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            ok = row_ok[:, None] & (units < N // 2)[None, :]
            tl.store(out_ptr + rows[:, None] * (N // 2) + units[None, :], (gate * tl.sigmoid(gate) * up).to(act),
                     mask=ok)
        else:
            ok = row_ok[:, None] & col_ok[None, :]
            out = acc
            if HAS_RESIDUAL:  # the product rounds to the activation dtype first, as a separate add would see it
                out = out.to(act).to(tl.float32) + tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=ok,
                                                           other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(act), mask=ok)


_TUNED = []


def _tuned():
    """The kernel autotuned per shape (built on first use, which is eager: CUDA graphs warm up first)."""
    if not _TUNED:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
                   for m, n, k, w in ((16, 32, 64, 2), (16, 64, 64, 4), (16, 64, 128, 4), (32, 64, 64, 4),
                                      (64, 64, 64, 4), (64, 32, 64, 4), (16, 128, 64, 4), (32, 128, 64, 4))]
        if os.environ.get("SPECINFER_QUICK_AUTOTUNE") == "1":
            configs = [configs[0], configs[-1]]
        _TUNED.append(triton.autotune(configs=configs, key=["M", "N", "K", "NORM", "GATED", "HAS_RESIDUAL"])(
            _rows_product_kernel))
    return _TUNED[0]
