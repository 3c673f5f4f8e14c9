"""Attention over a paged-by-slot KV cache, with a tree visibility mask.

Every forward pass — prefill, incremental decoding, SSM expansion, tree verification — is the same
operation: write the new tokens' keys/values into the cache, then let each new token attend to the
cached entries it may see. Those are always a *prefix* of its slot (committed tokens, and for SSM tree
levels the catch-up chain), visible to every new token of the row, followed by a *tree part* where a
token sees only its own ancestors and itself. The mask is given for the tree part alone, so it stays
a few hundred columns wide however long the context grows.

On CUDA (and steps of up to 256 tokens) a Triton kernel reads the cache in place
(`tree_attention.py`); elsewhere the entries are gathered and fed to SDPA with a dense mask built once
per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import tree_attention

# The dtype a bf16 model's attention computes in on a CPU (see cached_attention).
CPU_BF16_ATTENTION_DTYPE = torch.float64


@dataclass(slots=True)
class AttentionMetadata:
    """Where a batch of new tokens sits in the cache and what each may see. Built by the model runner."""

    positions: torch.Tensor  # [B, T] position ids (prefix length + depth in the tree)
    write_slots: torch.Tensor  # [B, T] cache slot of each new token (padding goes to a scratch slot)
    write_offsets: torch.Tensor  # [B, T] index inside the slot where its key/value is stored
    read_slots: torch.Tensor  # [B] cache slot of each batch row
    prefix_lens: torch.Tensor  # [B] entries 0..prefix-1 of the row's slot are visible to all its tokens
    tree_mask: torch.Tensor  # [B, T, W] bool: token t sees entry prefix + j where True
    kv_len: int  # no row reads past entry kv_len - 1 (the SDPA path reads this many)
    dense_mask: torch.Tensor | None = None  # [B, 1, T, kv_len], built on first use by the SDPA path
    sdpa_rows: "_SdpaRows | None" = None  # how the SDPA path reads the cache, worked out on first use


def write_kv(
    kv: torch.Tensor,  # [B, T, 2, Hkv, D]: keys, then values
    cache_k: torch.Tensor,  # [num_slots, Hkv, capacity, D]
    cache_v: torch.Tensor,
    meta: AttentionMetadata,
    cache_kv: torch.Tensor | None = None,  # [2, num_slots, Hkv, capacity, D]: cache_k and cache_v, stacked
) -> None:
    """Store the new tokens' keys and values where `meta` says. Traceable: compiled blocks do it inside
    the kernel that rotates the keys (models/compile.py), so the write costs no launch of its own."""
    # Advanced indices around a slice put the indexed dims first: cache_k[s, :, o] is [B, T, Hkv, D], and
    # cache_kv[:, s, :, o] is [B, T, 2, Hkv, D], so keys and values go in with one write where they can.
    if cache_kv is not None:
        cache_kv[:, meta.write_slots, :, meta.write_offsets] = kv.to(cache_kv.dtype)
    else:
        cache_k[meta.write_slots, :, meta.write_offsets] = kv[:, :, 0].to(cache_k.dtype)
        cache_v[meta.write_slots, :, meta.write_offsets] = kv[:, :, 1].to(cache_v.dtype)


@torch.compiler.disable  # its own kernel (or the SDPA fallback), between the compiled halves of a block
def cached_attention(
    q: torch.Tensor,  # [B, H, T, D]
    cache_k: torch.Tensor,  # [num_slots, Hkv, capacity, D], the new tokens' entries already written
    cache_v: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:  # [B, H, T, D]
    if q.dtype == cache_k.dtype and tree_attention.supported(q):
        return tree_attention.tree_attention(q, cache_k, cache_v, meta.read_slots, meta.prefix_lens, meta.tree_mask)
    if meta.sdpa_rows is None:  # once per pass, for every layer
        meta.dense_mask = dense_mask(meta)
        meta.sdpa_rows = _SdpaRows.of(meta, on_host=not q.is_cuda)
    rows = meta.sdpa_rows
    if rows.first is None:
        keys = cache_k[meta.read_slots, :, : meta.kv_len]  # [B, Hkv, L, D]
        values = cache_v[meta.read_slots, :, : meta.kv_len]
    else:
        end = rows.first + q.shape[0]
        keys, values = cache_k[rows.first : end, :, : meta.kv_len], cache_v[rows.first : end, :, : meta.kv_len]
        if rows.by_slot is not None:
            q = q[rows.by_slot]
    # bf16 on a CPU attends in fp64. The CPU's SDPA rounds a query's row differently with the number of
    # queries beside it and the cache length it reads (its blocks fall elsewhere), and one flipped bf16
    # bit drifts through the layers: on a 2-core Xeon with AMX (2026-12-07) verified trees and incremental
    # steps drifted apart beyond bf16's rounding bound (top-two margins of 0.25 at the first difference,
    # 2 runs of the main command in 5; in fp32 still 0.19 in engine_speed.py). In fp64 the rows' rounding
    # differences sit far below one bf16 step: a chain of 6 tokens scored in one pass gave every layer's
    # output bitwise as 6 single steps did, and engine_speed.py's 24 speculative generations were all
    # identical to incremental decoding (the products already round each row alike at any row count).
    # It costs 2.7 ms of a 25 ms step at 300 cached tokens, 6 ms of 27 at 900.
    compute = CPU_BF16_ATTENTION_DTYPE if q.dtype == torch.bfloat16 and not q.is_cuda else q.dtype
    out = F.scaled_dot_product_attention(
        q.to(compute), keys.to(compute), values.to(compute), attn_mask=rows.mask,
        enable_gqa=keys.shape[1] != q.shape[1]).to(q.dtype)
    return out if rows.order is None else out[rows.order]


@dataclass(slots=True)
class _SdpaRows:
    """How the SDPA path reads a pass's rows from the cache. Where the rows' slots are a contiguous run
    (as the scheduler hands them out) and the slots are on the host: as a view of the run (`first`, rows
    taken in slot order, `by_slot`, and put back, `order`; None where already in order). Gathering a copy
    of every row's prefix, every layer, cost a CPU 2 to 4 times the attention itself (batch 1 to 16, 150
    to 400 entries). Otherwise (`first` None) a gathered copy."""

    mask: torch.Tensor  # the dense mask, rows in the order the cache is read
    first: int | None = None
    by_slot: torch.Tensor | None = None  # the run's place i holds row by_slot[i]
    order: torch.Tensor | None = None  # row b sits at place order[b] of the run

    @classmethod
    def of(cls, meta: AttentionMetadata, on_host: bool) -> "_SdpaRows":
        slots, mask = meta.read_slots, meta.dense_mask
        if not on_host:  # (reading slots would wait for the device, and break a graph's capture)
            return cls(mask)
        first, last = int(slots.min()), int(slots.max())
        if last - first + 1 != slots.shape[0] or slots.unique().shape[0] != slots.shape[0]:
            return cls(mask)
        order = slots - first
        if torch.equal(order, torch.arange(slots.shape[0])):
            return cls(mask, first)
        by_slot = torch.empty_like(order)
        by_slot[order] = torch.arange(slots.shape[0])
        return cls(mask[by_slot], first, by_slot, order)


def dense_mask(meta: AttentionMetadata) -> torch.Tensor:
    """The prefix + tree mask spelled out over entries 0..kv_len-1: [B, 1, T, kv_len] bool."""
    B, T, W = meta.tree_mask.shape
    entries = torch.arange(meta.kv_len, device=meta.tree_mask.device)
    offset = entries[None, :] - meta.prefix_lens[:, None]  # [B, L]: index into the tree part
    in_tree = (offset >= 0) & (offset < W)
    tree = meta.tree_mask.gather(2, offset.clamp(0, W - 1)[:, None, :].expand(B, T, -1))  # [B, T, L]
    return ((offset < 0)[:, None, :] | (tree & in_tree[:, None, :]))[:, None]
