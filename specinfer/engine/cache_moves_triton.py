"""The commit's cache compaction on a GPU as one Triton kernel.

A commit moves each request's accepted entries down behind its committed prefix, in every layer, for
keys and values and every KV head. With torch ops that is an index upload plus a gather and a scatter,
each launching several kernels; at batch 1 on an H200 the host spent about 0.1 ms per model on them every
speculative step, while the device had nothing queued. Here the moves of a step are one launch: a program
per (layer and k/v, move and head) walks its entries in order. Entries only move down (a kept entry never
sits before its destination) and destinations ascend, so walking in order reads every entry before
anything overwrites it, in place.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs take the torch path (kv_cache.py)
    triton = None


def supported(tensor: torch.Tensor) -> bool:
    # (Triton's CPU interpreter, chosen when triton is imported, runs the kernel in tests without a GPU.)
    return triton is not None and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def move_rows(rows: torch.Tensor, runs: np.ndarray, src: np.ndarray, dst: np.ndarray, upload) -> None:
    """Copy rows `src[i]` of `rows` [layers * 2, entries, D] to `dst[i]`, every layer, run by run: run g
    is `src[runs[g]:runs[g + 1]]`, ascending, each destination at or before its source."""
    index = upload(torch.from_numpy(np.concatenate([runs, src, dst])), rows.device)
    num_runs, total = len(runs) - 1, len(src)
    layers_kv, _, head_dim = rows.shape
    _move_rows_kernel[(layers_kv, num_runs)](
        rows, index, rows.stride(0), num_runs, total, head_dim, BLOCK_D=triton.next_power_of_2(head_dim))


if triton is not None:

    @triton.jit
    def _move_rows_kernel(rows_ptr, index_ptr, stride_layer, num_runs, total, head_dim, BLOCK_D: tl.constexpr):
        layer = tl.program_id(0).to(tl.int64)
        run = tl.program_id(1)
        # index: run offsets [num_runs + 1], then all sources [total], then all destinations [total]
        lo = tl.load(index_ptr + run)
        hi = tl.load(index_ptr + run + 1)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < head_dim
        base = rows_ptr + layer * stride_layer
        for j in range(lo, hi):
            src = tl.load(index_ptr + num_runs + 1 + j)
            dst = tl.load(index_ptr + num_runs + 1 + total + j)
            row = tl.load(base + src * head_dim + cols, mask=mask)
            tl.store(base + dst * head_dim + cols, row, mask=mask)
