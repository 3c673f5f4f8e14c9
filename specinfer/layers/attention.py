"""Attention over a paged-by-slot KV cache, with an arbitrary (tree) visibility mask.

Every forward pass — prefill, incremental decoding, SSM expansion, tree verification — is the same
operation: write the new tokens' keys/values into the cache, then let each new token attend to the
cached entries its mask allows (the committed prefix and its own ancestors in the token tree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Where a batch of new tokens sits in the cache and what each may see. Built by the model runner."""

    positions: torch.Tensor  # [B, T] position ids (prefix length + depth in the tree)
    write_slots: torch.Tensor  # [B, T] cache slot of each new token (padding goes to a scratch slot)
    write_offsets: torch.Tensor  # [B, T] index inside the slot where its key/value is stored
    read_slots: torch.Tensor  # [B] cache slot of each batch row
    kv_len: int  # keys 0..kv_len-1 of each slot are read
    mask: torch.Tensor  # [B, 1, T, kv_len] bool, True = may attend


@torch.compiler.disable  # in-place cache writes; kept out of compiled blocks (models/compile.py)
def cached_attention(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, T, D]
    v: torch.Tensor,  # [B, Hkv, T, D]
    cache_k: torch.Tensor,  # [num_slots, Hkv, capacity, D]
    cache_v: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:  # [B, H, T, D]
    # Advanced indices around a slice put the indexed dims first: cache_k[s, :, o] is [B, T, Hkv, D].
    cache_k[meta.write_slots, :, meta.write_offsets] = k.transpose(1, 2).to(cache_k.dtype)
    cache_v[meta.write_slots, :, meta.write_offsets] = v.transpose(1, 2).to(cache_v.dtype)
    keys = cache_k[meta.read_slots, :, : meta.kv_len]  # [B, Hkv, L, D]
    values = cache_v[meta.read_slots, :, : meta.kv_len]
    return F.scaled_dot_product_attention(
        q, keys.to(q.dtype), values.to(q.dtype), attn_mask=meta.mask, enable_gqa=keys.shape[1] != q.shape[1]
    )
