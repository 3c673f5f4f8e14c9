"""Tree attention on the GPU that reads the KV cache where it lies (Triton).

One kernel serves every step with at most `MAX_TOKENS` new tokens per row: incremental decoding, SSM
tree levels and tree verification. Row b's queries see every entry before `prefix_lens[b]` in its slot
(no mask is read there) and, after it, entry `prefix_lens[b] + j` where `tree_mask[b, t, j]` allows.
Nothing of the cache is gathered or copied, and the loop runs to the row's own length read from the
device, so a CUDA graph captured once serves every context length.

The grid is (row, KV head, query block, split). A KV head's whole group of query heads shares one
program, so grouped-query attention reads each key once. When rows and heads alone cannot fill the GPU
(batch 1), the prefix is split flash-decoding style: each split keeps its own running maximum and sum,
and a second kernel combines them. The last split also covers the tree part.
"""

from __future__ import annotations

import functools
import os

import torch

from . import dependent_launch

try:
    import triton
    import triton.language as tl

    from .dependent_launch import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: attention falls back to SDPA (layers/attention.py)
    triton = None

MAX_TOKENS = 256  # longer chunks (prefills) take SDPA
MAX_SPLITS = 8
HEAD_DIMS = (16, 32, 64, 128, 256)


def supported(q: torch.Tensor) -> bool:
    return (
        triton is not None
        and os.environ.get("SPECINFER_ATTENTION") != "sdpa"  # A/B benchmarks against the SDPA path
        and (q.is_cuda or _interpreting())
        and q.shape[2] <= MAX_TOKENS
        and q.shape[3] in HEAD_DIMS
        and not (q.requires_grad and torch.is_grad_enabled())
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests without a GPU)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def tree_attention(
    q: torch.Tensor,  # [B, H, T, D]
    cache_k: torch.Tensor,  # [num_slots, Hkv, capacity, D]
    cache_v: torch.Tensor,
    read_slots: torch.Tensor,  # [B]
    prefix_lens: torch.Tensor,  # [B]
    tree_mask: torch.Tensor,  # [B, T, W] bool
) -> torch.Tensor:  # [B, H, T, D]
    B, H, T, D = q.shape
    # The kernel reads the last dimension of every tensor as contiguous, and slots and prefix lengths as
    # vectors (a column of a wider tensor would read its neighbours as slot numbers).
    q, tree_mask = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, tree_mask))
    read_slots, prefix_lens = read_slots.contiguous(), prefix_lens.contiguous()
    assert cache_k.stride(-1) == 1 and cache_v.stride(-1) == 1
    num_kv_heads, capacity = cache_k.shape[1], cache_k.shape[2]
    group = H // num_kv_heads
    width = tree_mask.shape[2]
    rows = group * T
    # Few variants of the compiled kernel (block_m only), so that no step meets a fresh compilation.
    block_m = 16 if rows <= 64 else 64
    block_n = 64 if D <= 128 else 32
    m_blocks = triton.cdiv(rows, block_m)
    programs = B * num_kv_heads * m_blocks
    # Split the prefix only while the GPU has idle multiprocessors; each split costs a partial write.
    splits = max(1, min(MAX_SPLITS, _multiprocessors(q.device) // programs))
    out = torch.empty_like(q)
    if splits > 1:
        partial_out = torch.empty(B, H, T, splits, D, device=q.device, dtype=torch.float32)
        partial_max = torch.empty(B, H, T, splits, device=q.device, dtype=torch.float32)
        partial_sum = torch.empty_like(partial_max)
    else:
        partial_out = partial_max = partial_sum = out  # unused
    scale = D**-0.5 * 1.4426950408889634  # exp2 instead of exp
    # Both kernels start as the kernel before them finishes and wait for it before reading anything
    # (dependent_launch.py): everything they read (queries, the cache, slots) is some kernel's output.
    dependent = dependent_launch.enabled(q)
    _tree_attention_kernel[(B, num_kv_heads, m_blocks * splits)](
        q, cache_k, cache_v, out, partial_out, partial_max, partial_sum, read_slots, prefix_lens, tree_mask,
        *q.stride()[:3], *cache_k.stride()[:3], *cache_v.stride()[:3], *out.stride()[:3],
        tree_mask.stride(0), tree_mask.stride(1),
        T, width, capacity, scale, splits,
        GROUP=group, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DEPENDENT=dependent,
        **dependent_launch.launch_options(dependent),
    )
    if splits > 1:
        _combine_kernel[(B * H * T,)](
            partial_out, partial_max, partial_sum, out, H, T, *out.stride()[:3], splits,
            MAX_SPLITS=MAX_SPLITS, HEAD_DIM=D, DEPENDENT=dependent, **dependent_launch.launch_options(dependent),
        )
    return out


if triton is not None:

    @triton.jit
    def _attend(q, k_base, v_base, entries, visible, stride_kl, stride_vl, row_max, row_sum, acc, scale,
                HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        """Fold the key block `entries` (visibility [BLOCK_M, BLOCK_N]) into the running softmax."""
        dims = tl.arange(0, HEAD_DIM)
        needed = tl.max(visible.to(tl.int32), 0) > 0  # read only keys some query sees
        k = tl.load(k_base + entries[None, :] * stride_kl + dims[:, None], mask=needed[None, :], other=0.0)
        # Values are read before the scores are formed, so that both trips to memory overlap.
        v = tl.load(v_base + entries[:, None] * stride_vl + dims[None, :], mask=needed[:, None], other=0.0)
        scores = tl.dot(q, k, input_precision=PRECISION) * scale
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet
        p = tl.exp2(scores - safe_max[:, None])
        alpha = tl.exp2(row_max - safe_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return new_max, row_sum, acc

    # Sizes that change from step to step are not specialised on (Triton would compile a variant for
    # each value that is 1 or a multiple of 16, in the middle of serving).
    @triton.jit(do_not_specialize=["stride_qb", "stride_qh", "stride_qt", "stride_ob", "stride_oh", "stride_ot",
                                   "stride_mb", "stride_mt", "num_tokens", "width", "capacity", "splits"])
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
        slots_ptr, prefix_ptr, mask_ptr,
        stride_qb, stride_qh, stride_qt, stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ot, stride_mb, stride_mt,
        num_tokens, width, capacity, scale, splits,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DEPENDENT: tl.constexpr,
    ):
        if DEPENDENT:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        m_block = tl.program_id(2) // splits
        split = tl.program_id(2) % splits
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row = (query head in group) * T + token
        row_ok = rows < GROUP * num_tokens
        head = kv_head * GROUP + rows // num_tokens
        token = rows % num_tokens
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        prefix = tl.load(prefix_ptr + b).to(tl.int32)
        k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
        v_base = v_ptr + slot * stride_vs + kv_head * stride_vh
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

        # This split's share of the prefix, in whole key blocks.
        chunk = tl.cdiv(tl.cdiv(prefix, splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, prefix)
        # One new token (a decode step): its own entry, where its mask lets it see itself, joins the last
        # split's range rather than a masked pass of its own, whose reads (the mask, then the entry's key
        # and value) would queue behind the prefix's.
        last = split == splits - 1
        own_entry = (num_tokens == 1) & (width == 1)
        if last & own_entry:
            sees_itself = (tl.load(mask_ptr + b * stride_mb) != 0) & (prefix < capacity)
            lo = tl.minimum(lo, prefix)
            hi = prefix + sees_itself.to(tl.int32)
        start = lo
        while start < hi:  # (while, not range: loop bounds read from memory)
            entries = start + tl.arange(0, BLOCK_N)
            visible = row_ok[:, None] & (entries < hi)[None, :]
            row_max, row_sum, acc = _attend(q, k_base, v_base, entries, visible, stride_kl, stride_vl,
                                            row_max, row_sum, acc, scale, HEAD_DIM, PRECISION)
            start += BLOCK_N
        if last & ((num_tokens != 1) | (width != 1)):  # the tree part: entries prefix + j, masked
            start = 0
            while start < width:
                cols = start + tl.arange(0, BLOCK_N)
                in_range = (cols < width) & (prefix + cols < capacity)
                visible = tl.load(mask_ptr + b * stride_mb + token[:, None] * stride_mt + cols[None, :],
                                  mask=row_ok[:, None] & in_range[None, :], other=0) != 0
                row_max, row_sum, acc = _attend(q, k_base, v_base, prefix + cols, visible, stride_kl, stride_vl,
                                                row_max, row_sum, acc, scale, HEAD_DIM, PRECISION)
                start += BLOCK_N

        if splits == 1:
            out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
            tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_ot + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # partials laid out [B, H, T, splits(, D)], contiguous
            H = tl.num_programs(1) * GROUP
            base = ((b * H + head) * num_tokens + token) * splits + split
            tl.store(part_max_ptr + base, row_max, mask=row_ok)
            tl.store(part_sum_ptr + base, row_sum, mask=row_ok)
            tl.store(part_out_ptr + base[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])

    @triton.jit(do_not_specialize=["num_heads", "num_tokens", "stride_ob", "stride_oh", "stride_ot", "splits"])
    def _combine_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_heads, num_tokens,
                        stride_ob, stride_oh, stride_ot, splits, MAX_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        DEPENDENT: tl.constexpr):
        if DEPENDENT:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(0)  # (b, head, token)
        token = row % num_tokens
        head = (row // num_tokens) % num_heads
        b = row // (num_tokens * num_heads)
        index = tl.arange(0, MAX_SPLITS)
        used = index < splits
        dims = tl.arange(0, HEAD_DIM)
        maxes = tl.load(part_max_ptr + row * splits + index, mask=used, other=float("-inf"))
        sums = tl.load(part_sum_ptr + row * splits + index, mask=used, other=0.0)
        parts = tl.load(part_out_ptr + (row * splits + index)[:, None] * HEAD_DIM + dims[None, :],
                        mask=used[:, None], other=0.0)
        top = tl.max(maxes, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weights = tl.exp2(maxes - top)
        total = tl.sum(sums * weights, 0)
        out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + head * stride_oh + token * stride_ot + dims, out.to(out_ptr.dtype.element_ty))
