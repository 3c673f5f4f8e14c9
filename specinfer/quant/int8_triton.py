"""int8 weight x half-precision activation matmul on the GPU, reading the int8 weights directly.

A decode step is bound by reading the weights, so the win of int8 comes only from a kernel that
streams the int8 bytes and widens them in registers: out[m, n] = scale[n] * sum_k x[m, k] * q[n, k],
accumulated in fp32. Imported only on CUDA (Triton ships with PyTorch's CUDA builds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs() -> list[triton.Config]:
    configs = []
    for block_m, block_n, block_k, warps, stages in [
        (16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 32, 128, 4, 5), (16, 64, 128, 4, 4),
        (32, 64, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
    ]:
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                                     num_warps=warps, num_stages=stages))
    return configs


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _int8_matmul_kernel(x_ptr, q_ptr, scale_ptr, out_ptr, M, N, K, M_BUCKET,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + ks
        x = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        q = tl.load(q_ptr + cols[None, :] * K + kk[:, None], mask=(cols[None, :] < N) & (kk[:, None] < K), other=0)
        acc += tl.dot(x, q.to(x.dtype))
    scale = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
    out = acc * scale[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp16/bf16, contiguous) @ (qweight [N, K] int8 * scale [N] fp32).T -> [M, N] in x's dtype."""
    M, K = x.shape
    N = qweight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bucket = 16 if M <= 16 else 64 if M <= 64 else 256 if M <= 256 else 1024
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))
    _int8_matmul_kernel[grid](x, qweight, scale, out, M, N, K, bucket)
    return out
