"""Matrix-vector kernels for weight-only int8 and int4 layers: the decode step, one row at a time.

A decode step reads every weight once and does two flops per weight read, so its speed is the speed
at which the packed weights stream. A tile kernel built on `tl.dot` pads a single row to 16 and spends
its registers on an accumulator it mostly wastes; these kernels instead give each program a strip of
output columns, stream the strip's packed bytes once, widen them in registers and reduce along K.
Measured on an H100 (`docs/benchmarks/quant_kernels_h100.md`), the int8 kernel beats the tile kernel for
one row and loses from two rows on (each extra row re-reads the strip), hence `MAX_ROWS`. It also
takes half-precision weights without a scale, which the benchmark uses to compare with cuBLAS.

int4 (asymmetric groups, w = q * scale + minimum): per group g of input columns,
    sum_k w_k x_k = scale_g * sum_k q_k x_k + minimum_g * sum_k x_k,
so the scale and minimum are applied once per group, not per weight. PyTorch's tinygemm is faster
still (about 1.6x at one row on the H100) and serves int4 wherever it takes the layer's shape; this
kernel serves the other shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 1  # more rows go to the tile kernels (int8_triton.py, tinygemm)


def _configs(block_ks: tuple[int, ...]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n in (8, 16, 32) for k in block_ks for w in (4, 8) for s in (2, 4)]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K: tl.constexpr,
                 HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # w: [N, K] in any dtype (int8 with a per-row scale, or the activations' own half precision).
    # K is a compile-time constant: a model has a few widths, and the interpreter needs a plain int here.
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):  # a for loop, so that Triton pipelines the loads across iterations
        kk = k + ks
        x = tl.load(x_ptr + row * K + kk, mask=kk < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=col_ok[:, None] & (kk[None, :] < K), other=0)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    tl.store(out_ptr + row * N + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _int4_gemv_kernel(x_ptr, q_ptr, scale_ptr, min_ptr, out_ptr, N, K: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # q: [N, K / 2] bytes, column 2i in the low nibble and 2i + 1 in the high one; scale, min: [N, K / GROUP].
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    pairs = tl.arange(0, HALF)
    groups = tl.arange(0, GROUPS)
    num_groups = K // GROUP
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        even = k + 2 * pairs
        k_ok = even < K
        x_even = tl.load(x_ptr + row * K + even, mask=k_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + row * K + even + 1, mask=k_ok, other=0.0).to(tl.float32)
        packed = tl.load(q_ptr + cols[:, None] * (K // 2) + (k // 2 + pairs)[None, :],
                         mask=col_ok[:, None] & k_ok[None, :], other=0)
        low = (packed & 0xF).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        qx = tl.sum(tl.reshape(low * x_even[None, :] + high * x_odd[None, :], (BLOCK_N, GROUPS, GROUP // 2)), axis=2)
        x_sum = tl.sum(tl.reshape(x_even + x_odd, (GROUPS, GROUP // 2)), axis=1)
        g = k // GROUP + groups
        g_ok = col_ok[:, None] & (g < num_groups)[None, :]
        scale = tl.load(scale_ptr + cols[:, None] * num_groups + g[None, :], mask=g_ok, other=0.0)
        minimum = tl.load(min_ptr + cols[:, None] * num_groups + g[None, :], mask=g_ok, other=0.0)
        acc += qx * scale + minimum * x_sum[None, :]
    tl.store(out_ptr + row * N + cols, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=col_ok)


_gemv_tuned = triton.autotune(configs=_configs((256, 512)), key=["N", "K", "HAS_SCALE"])(_gemv_kernel)
_int4_tuned = {}  # group size -> autotuned kernel (its block sizes must hold whole groups)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests without a GPU)


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] contiguous @ (weight [N, K] * scale [N]).T -> [M, N] in x's dtype. `weight`: int8 with its
    fp32 per-row `scale`, or half precision with no scale. Any M works; M <= MAX_ROWS is where it pays."""
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    has_scale = scale is not None
    scale = scale if has_scale else out  # an unread placeholder
    if _interpreting():
        _gemv_kernel[(triton.cdiv(N, 16), M)](x, weight, scale, out, N, K, has_scale, BLOCK_N=16, BLOCK_K=64)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](x, weight, scale, out, N, K, has_scale)
    return out


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """x [M, K] contiguous @ the int4 layer's weight.T -> [M, N] in x's dtype (quant/linear.py
    has the packing)."""
    M, K = x.shape
    N = qweight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if _interpreting():
        _int4_gemv_kernel[(triton.cdiv(N, 16), M)](x, qweight, scale, minimum, out, N, K,
                                                   GROUP=group_size, BLOCK_N=16, BLOCK_K=2 * group_size)
        return out
    if group_size not in _int4_tuned:
        block_ks = tuple(group_size * m for m in (2, 4) if group_size * m <= 1024) or (group_size,)
        _int4_tuned[group_size] = triton.autotune(configs=_configs(block_ks), key=["N", "K"])(_int4_gemv_kernel)
    _int4_tuned[group_size][lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](
        x, qweight, scale, minimum, out, N, K, GROUP=group_size)
    return out
