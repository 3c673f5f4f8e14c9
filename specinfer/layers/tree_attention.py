"""Tree attention on the GPU that reads the KV cache where it lies (Triton).

One kernel serves every step with at most `MAX_TOKENS` new tokens per row: incremental decoding, SSM
tree levels and tree verification. Row b's queries see every entry before `prefix_lens[b]` in its slot
(no mask is read there) and, after it, entry `prefix_lens[b] + j` where `tree_mask[b, t, j]` allows.
Nothing of the cache is gathered or copied, and the loop runs to the row's own length read from the
device, so a CUDA graph captured once serves every context length.

The grid is (row, KV head, query block, split). A KV head's whole group of query heads shares one
program, so grouped-query attention reads each key once. When rows and heads alone cannot fill the GPU
(batch 1), the prefix is split flash-decoding style: each split keeps its own running maximum and sum,
and the last split of a query block to finish combines them (an arrival count per block, kept per
cache so that kernels on other caches never share one), which costs no kernel of its own. The last
split also covers the tree part.

`decode_attention` serves a one-token step from the q/k/v product's output as it is: each program
rotates its queries, and the last split rotates the token's key and writes it and its value into the
cache before it reads them back with the prefix; the rotary kernel and the cache write of the
unfolded path are then not launched at all.
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

NO_ROTATION, FUSED_ROTATION, UNFUSED_ROTATION = 0, 1, 2  # decode_attention's rotary products: see _rotated
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
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    _launch(q, q.shape[1], q.stride()[:3], out, cache_k, cache_v, read_slots, prefix_lens, tree_mask)
    return out


def decode_supported(qkv: torch.Tensor, cache_k: torch.Tensor, tree_mask: torch.Tensor) -> bool:
    """Whether `decode_attention` serves this step (otherwise: rotary, cache write, `tree_attention`): one
    token per row that sees the prefix and, by its mask, itself (an SSM's later tree levels see more)."""
    return (triton is not None and os.environ.get("SPECINFER_ATTENTION") != "sdpa"
            and os.environ.get("SPECINFER_DECODE_ATTENTION") != "0"  # A/B benchmarks against the unfolded path
            and (qkv.is_cuda or _interpreting()) and qkv.dtype == cache_k.dtype and cache_k.shape[-1] in HEAD_DIMS
            and qkv.shape[1] == 1 and tree_mask.shape[1:] == (1, 1))


def decode_attention(
    qkv: torch.Tensor,  # [B, 1, (H + 2 Hkv) D]: the q/k/v product's output, before the rotary embedding
    rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [B, 1, 1, D] in fp32
    num_heads: int,
    cache_k: torch.Tensor,  # [num_slots, Hkv, capacity, D]
    cache_v: torch.Tensor,
    write_slots: torch.Tensor,  # [B, 1]
    write_offsets: torch.Tensor,  # [B, 1]: the prefix length (the token's own entry comes right after it)
    read_slots: torch.Tensor,  # [B]
    prefix_lens: torch.Tensor,  # [B]
    tree_mask: torch.Tensor,  # [B, 1, 1] bool: whether the token sees itself
) -> torch.Tensor:  # [B, H, 1, D]
    """Rotary embedding, cache write and attention of a one-token step in one kernel (see the module)."""
    B, T, _ = qkv.shape
    D = cache_k.shape[-1]
    assert T == 1 and tree_mask.shape[1:] == (1, 1) and qkv.stride(-1) == 1
    cos, sin = (x.reshape(B, D).float().contiguous() for x in rope)
    out = torch.empty(B, num_heads, 1, D, device=qkv.device, dtype=qkv.dtype)
    _launch(qkv, num_heads, (qkv.stride(0), D, 0), out, cache_k, cache_v, read_slots, prefix_lens, tree_mask,
            rotation=(cos, sin, write_slots.reshape(B).contiguous(), write_offsets.reshape(B).contiguous()))
    return out


def _launch(q, num_heads, q_strides, out, cache_k, cache_v, read_slots, prefix_lens, tree_mask, rotation=None):
    """Queries from `q` (heads of stride q_strides[1]; with `rotation`, the unrotated q/k/v rows) -> `out`."""
    B, T, D = out.shape[0], out.shape[2], out.shape[3]
    # The kernel reads the last dimension of every tensor as contiguous, and slots and prefix lengths as
    # vectors (a column of a wider tensor would read its neighbours as slot numbers).
    tree_mask = tree_mask if tree_mask.stride(-1) == 1 else tree_mask.contiguous()
    read_slots, prefix_lens = read_slots.contiguous(), prefix_lens.contiguous()
    assert cache_k.stride(-1) == 1 and cache_v.stride(-1) == 1
    num_kv_heads, capacity = cache_k.shape[1], cache_k.shape[2]
    group = num_heads // num_kv_heads
    width = tree_mask.shape[2]
    rows = group * T
    # Few variants of the compiled kernel (block_m only), so that no step meets a fresh compilation.
    block_m = 16 if rows <= 64 else 64
    block_n = 64 if D <= 128 else 32
    m_blocks = triton.cdiv(rows, block_m)
    programs = B * num_kv_heads * m_blocks
    # Split the prefix only while the GPU has idle multiprocessors; each split costs a partial write.
    multiprocessors = _multiprocessors(q.device)
    splits = max(1, min(MAX_SPLITS, multiprocessors // programs))
    if splits > 1:
        partial_out = torch.empty(B, num_heads, T, splits, D, device=q.device, dtype=torch.float32)
        partial_max = torch.empty(B, num_heads, T, splits, device=q.device, dtype=torch.float32)
        partial_sum = torch.empty_like(partial_max)
        arrivals = _arrival_counts(cache_k, multiprocessors)  # splits > 1: fewer programs than multiprocessors
    else:
        partial_out = partial_max = partial_sum = arrivals = out  # unused
    cos, sin, write_slots, write_offsets = rotation if rotation is not None else (out,) * 4  # unused without
    scale = D**-0.5 * 1.4426950408889634  # exp2 instead of exp
    # The kernel starts as the kernel before it finishes and waits for it before reading anything
    # (dependent_launch.py): everything it reads (queries, the cache, slots) is some kernel's output.
    dependent = dependent_launch.enabled(q)
    _tree_attention_kernel[(B, num_kv_heads, m_blocks * splits)](
        q, cache_k, cache_v, out, partial_out, partial_max, partial_sum, arrivals, read_slots, prefix_lens,
        tree_mask, cos, sin, write_slots, write_offsets,
        *q_strides, *cache_k.stride()[:3], *cache_v.stride()[:3], *out.stride()[:3],
        tree_mask.stride(0), tree_mask.stride(1),
        T, width, capacity, scale, splits,
        GROUP=group, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, MAX_SPLITS=MAX_SPLITS,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROTATE=NO_ROTATION if rotation is None else (FUSED_ROTATION if _interpreting() else UNFUSED_ROTATION),
        DEPENDENT=dependent, **dependent_launch.launch_options(dependent),
    )


_arrivals: dict[tuple[int, int], torch.Tensor] = {}


def _arrival_counts(cache_k: torch.Tensor, size: int) -> torch.Tensor:
    """Zeroed int32 counts that the kernel's last arrivals reset, one set per cache layer: kernels on one
    cache run one after another, so no two launches share a count while either is running. Made once
    (inside a CUDA graph capture the zeroing is captured too, and repeats harmlessly on each replay)."""
    key = (cache_k.data_ptr(), size)
    counts = _arrivals.get(key)
    if counts is None or counts.device != cache_k.device:
        counts = _arrivals[key] = torch.zeros(size, device=cache_k.device, dtype=torch.int32)
    return counts


if triton is not None:

    @triton.jit
    def _attend(q, k_base, v_base, entries, readable, visible, stride_kl, stride_vl, row_max, row_sum, acc, scale,
                HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        """Fold the key block `entries` (visibility [BLOCK_M, BLOCK_N]) into the running softmax, reading the
        entries `readable` [BLOCK_N] (others count as 0): each one read must hold a finite value, since one
        that no query sees weighs 0 only then."""
        dims = tl.arange(0, HEAD_DIM)
        k = tl.load(k_base + entries[None, :] * stride_kl + dims[:, None], mask=readable[None, :], other=0.0)
        # Values are read before the scores are formed, so that both trips to memory overlap.
        v = tl.load(v_base + entries[:, None] * stride_vl + dims[None, :], mask=readable[:, None], other=0.0)
        scores = tl.dot(q, k, input_precision=PRECISION) * scale
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that saw nothing yet
        p = tl.exp2(scores - safe_max[:, None])
        alpha = tl.exp2(row_max - safe_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return new_max, row_sum, acc

    @triton.jit
    def _rotated(row_ptrs, row_ok, cos, sin, HEAD_DIM: tl.constexpr, ROTATE: tl.constexpr):
        """Rows [BLOCK_M] (or one row) of the q/k/v output, rotated as `rotary.apply_rotary` does (fp32).
        ROTATE == UNFUSED_ROTATION rounds each product before the sum, as PyTorch's separate kernels do (the
        compiler would fuse one into a multiply-add, and cache entries would differ from the unfolded
        path's in the last bit); Triton's interpreter has no such intrinsic and never fuses."""
        dims = tl.arange(0, HEAD_DIM)
        partner = (dims + HEAD_DIM // 2) % HEAD_DIM  # the other half's element of the same pair
        x = tl.load(row_ptrs + dims, mask=row_ok, other=0.0)
        other = tl.load(row_ptrs + partner, mask=row_ok, other=0.0).to(tl.float32)
        rotated = tl.where(dims < HEAD_DIM // 2, -other, other)
        if ROTATE == 2:  # UNFUSED_ROTATION
            out = tl.inline_asm_elementwise(
                "{ .reg .f32 a, b; mul.rn.f32 a, $1, $2; mul.rn.f32 b, $3, $4; add.rn.f32 $0, a, b; }",
                "=f,f,f,f,f", [x.to(tl.float32), cos, rotated, sin], dtype=tl.float32, is_pure=True, pack=1)
        else:
            out = x.to(tl.float32) * cos + rotated * sin
        return out.to(x.dtype)

    # Sizes that change from step to step are not specialised on (Triton would compile a variant for
    # each value that is 1 or a multiple of 16, in the middle of serving).
    @triton.jit(do_not_specialize=["stride_qb", "stride_qh", "stride_qt", "stride_ob", "stride_oh", "stride_ot",
                                   "stride_mb", "stride_mt", "num_tokens", "width", "capacity", "splits"])
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, arrivals_ptr,
        slots_ptr, prefix_ptr, mask_ptr, cos_ptr, sin_ptr, write_slots_ptr, write_offsets_ptr,
        stride_qb, stride_qh, stride_qt, stride_ks, stride_kh, stride_kl, stride_vs, stride_vh, stride_vl,
        stride_ob, stride_oh, stride_ot, stride_mb, stride_mt,
        num_tokens, width, capacity, scale, splits,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MAX_SPLITS: tl.constexpr, PRECISION: tl.constexpr, ROTATE: tl.constexpr, DEPENDENT: tl.constexpr,
    ):
        if DEPENDENT:
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
        H = num_kv_heads * GROUP
        m_block = tl.program_id(2) // splits
        split = tl.program_id(2) % splits
        last = split == splits - 1
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # row = (query head in group) * T + token
        row_ok = rows < GROUP * num_tokens
        head = kv_head * GROUP + rows // num_tokens
        token = rows % num_tokens
        dims = tl.arange(0, HEAD_DIM)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        prefix = tl.load(prefix_ptr + b).to(tl.int32)
        k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
        v_base = v_ptr + slot * stride_vs + kv_head * stride_vh
        if ROTATE:  # one token: q_ptr holds its unrotated q, k and v heads one after another
            cos = tl.load(cos_ptr + b * HEAD_DIM + dims)
            sin = tl.load(sin_ptr + b * HEAD_DIM + dims)
            q_row = q_ptr + b * stride_qb
            q = _rotated(q_row + head[:, None] * stride_qh, row_ok[:, None], cos[None, :], sin[None, :], HEAD_DIM,
                         ROTATE)
            if last:  # the token's key and value into the cache, where the loop below reads them back
                key = _rotated(q_row + (H + kv_head) * stride_qh, dims < HEAD_DIM, cos, sin, HEAD_DIM, ROTATE)
                value = tl.load(q_row + (H + num_kv_heads + kv_head) * stride_qh + dims)
                write_slot = tl.load(write_slots_ptr + b).to(tl.int64)
                write_offset = tl.load(write_offsets_ptr + b).to(tl.int64)
                tl.store(k_ptr + write_slot * stride_ks + kv_head * stride_kh + write_offset * stride_kl + dims,
                         key.to(k_ptr.dtype.element_ty))
                tl.store(v_ptr + write_slot * stride_vs + kv_head * stride_vh + write_offset * stride_vl + dims,
                         value.to(v_ptr.dtype.element_ty))
                tl.debug_barrier()  # the program's own writes, visible to all its threads
        else:
            q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :],
                        mask=row_ok[:, None], other=0.0)
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
        own_entry = (num_tokens == 1) & (width == 1)
        if last & own_entry:
            sees_itself = (tl.load(mask_ptr + b * stride_mb) != 0) & (prefix < capacity)
            lo = tl.minimum(lo, prefix)
            hi = prefix + sees_itself.to(tl.int32)
        start = lo
        while start < hi:  # (while, not range: loop bounds read from memory)
            entries = start + tl.arange(0, BLOCK_N)
            visible = row_ok[:, None] & (entries < hi)[None, :]
            # The prefix's entries are the row's own, all written: read by their bounds alone, not by a mask
            # reduced from `visible` (a warp reduction an entry in the loop: 430 instructions a pass against
            # 343 in the sm_90 `sass` of a decode step's variant).
            row_max, row_sum, acc = _attend(q, k_base, v_base, entries, entries < hi, visible, stride_kl, stride_vl,
                                            row_max, row_sum, acc, scale, HEAD_DIM, PRECISION)
            start += BLOCK_N
        if last & ((num_tokens != 1) | (width != 1)):  # the tree part: entries prefix + j, masked
            start = 0
            while start < width:
                cols = start + tl.arange(0, BLOCK_N)
                in_range = (cols < width) & (prefix + cols < capacity)
                visible = tl.load(mask_ptr + b * stride_mb + token[:, None] * stride_mt + cols[None, :],
                                  mask=row_ok[:, None] & in_range[None, :], other=0) != 0
                # Only entries some query sees: a row whose tree is narrower than `width` has stale ones there.
                needed = tl.max(visible.to(tl.int32), 0) > 0
                row_max, row_sum, acc = _attend(q, k_base, v_base, prefix + cols, needed, visible, stride_kl, stride_vl,
                                                row_max, row_sum, acc, scale, HEAD_DIM, PRECISION)
                start += BLOCK_N

        out_ptrs = out_ptr + b * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_ot + dims[None, :]
        if splits == 1:
            out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:  # partials laid out [B, H, T, splits(, D)], contiguous
            row = (b * H + head) * num_tokens + token
            base = row * splits + split
            tl.store(part_max_ptr + base, row_max, mask=row_ok)
            tl.store(part_sum_ptr + base, row_sum, mask=row_ok)
            tl.store(part_out_ptr + base[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
            # The last of the block's splits to get here combines them. The barrier orders every thread's
            # partial writes before the count (released at GPU scope); the last arrival's acquire then
            # sees every other split's.
            tl.debug_barrier()
            count_ptr = arrivals_ptr + (b * num_kv_heads + kv_head) * (tl.num_programs(2) // splits) + m_block
            if tl.atomic_add(count_ptr, 1, sem="acq_rel") == splits - 1:
                tl.store(count_ptr, 0)  # ready for the next launch on this cache
                index = tl.arange(0, MAX_SPLITS)
                used = row_ok[:, None] & (index < splits)[None, :]
                parts = row[:, None] * splits + index[None, :]
                maxes = tl.load(part_max_ptr + parts, mask=used, other=float("-inf"), cache_modifier=".cg")
                sums = tl.load(part_sum_ptr + parts, mask=used, other=0.0, cache_modifier=".cg")
                top = tl.max(maxes, 1)
                weights = tl.exp2(maxes - tl.where(top == float("-inf"), 0.0, top)[:, None])
                total = tl.sum(sums * weights, 1)
                acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
                # In split order, whichever split arrived last; unrolled to MAX_SPLITS, those past `splits`
                # masked (adding 0), so that every partial's read is issued before the first is used.
                for s in tl.static_range(MAX_SPLITS):
                    weight = tl.sum(tl.where(index[None, :] == s, weights, 0.0), 1)
                    part = tl.load(part_out_ptr + (row * splits + s)[:, None] * HEAD_DIM + dims[None, :],
                                   mask=row_ok[:, None] & (tl.full([1, 1], s, tl.int32) < splits), other=0.0,
                                   cache_modifier=".cg")
                    acc += part * weight[:, None]
                out = acc / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
