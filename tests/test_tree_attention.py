"""The Triton tree-attention kernel against SDPA with the same prefix + tree mask spelled out densely.

On a GPU it runs compiled; without one, through Triton's CPU interpreter (in a subprocess, since the
interpreter is chosen when triton is imported), where triton is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from specinfer.layers import tree_attention
from specinfer.layers.attention import AttentionMetadata, dense_mask

# (batch, heads, kv heads, tokens, head dim, tree width, prefix lengths): GQA groups, one and many
# query blocks, splits of the prefix (few programs) and none (many), an empty prefix.
CASES = [
    (1, 4, 2, 1, 16, 1, [5]),
    (2, 9, 3, 5, 64, 7, [70, 3]),
    (3, 4, 4, 20, 32, 20, [130, 0, 64]),
    (1, 8, 2, 40, 16, 64, [200]),
    (4, 2, 1, 3, 128, 4, [17, 250, 1, 64]),
    (2, 4, 1, 1, 32, 1, [200, 64]),  # decode steps: the token's own entry read with the prefix
]


def reference(q, cache_k, cache_v, slots, prefix_lens, tree_mask):
    kv_len = int((prefix_lens + tree_mask.shape[2]).max().clamp(max=cache_k.shape[2]))
    meta = AttentionMetadata(None, None, None, slots, prefix_lens, tree_mask, kv_len)
    k, v = cache_k[slots, :, :kv_len].double(), cache_v[slots, :, :kv_len].double()
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=dense_mask(meta), enable_gqa=k.shape[1] != q.shape[1])


def check_against_sdpa(device: str, dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(0)
    for batch, heads, kv_heads, tokens, head_dim, width, prefixes in CASES:
        slots, capacity = batch + 1, 300
        cache_k = torch.randn(slots, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        cache_v = torch.randn_like(cache_k)
        q = torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype)
        read_slots = torch.randperm(slots, device=device)[:batch]
        prefix_lens = torch.tensor(prefixes, device=device)
        tree_mask = torch.rand(batch, tokens, width, device=device) < 0.5
        tree_mask[:, :, 0] = True
        assert tree_attention.supported(q)
        out = tree_attention.tree_attention(q, cache_k, cache_v, read_slots, prefix_lens, tree_mask)
        expected = reference(q, cache_k, cache_v, read_slots, prefix_lens, tree_mask)
        error = (out.double() - expected).abs().max().item()
        assert error < tolerance, f"case {batch, heads, kv_heads, tokens, head_dim, width}: max error {error:.2e}"
        # A row that sees nothing (padding) comes out as zeros, not NaN.
        tree_mask[0] = False
        prefix_lens[0] = 0
        out = tree_attention.tree_attention(q, cache_k, cache_v, read_slots, prefix_lens, tree_mask)
        assert out[0].eq(0).all() and torch.isfinite(out).all()


# (heads, kv heads, head dim, prefix length, number of slots): few programs (splits combined by the last
# to arrive), GQA, a prefix shorter than a key block, an empty one, many programs (no split).
DECODE_CASES = [(4, 2, 16, 70, 3), (8, 2, 64, 5, 2), (2, 1, 32, 0, 2), (64, 64, 128, 200, 2)]


def check_decode_against_unfolded(device: str, dtype: torch.dtype, tolerance: float) -> None:
    """`decode_attention` (rotary, cache write and attention in one kernel) against the unfolded path:
    `apply_rotary`, `write_kv` and `tree_attention`. The cache entries it writes are bitwise those."""
    from specinfer.layers.attention import write_kv
    from specinfer.layers.rotary import RotaryEmbedding
    from specinfer.models.llama import LlamaAttention

    torch.manual_seed(2)
    for heads, kv_heads, head_dim, prefix, slots in DECODE_CASES:
        for sees_itself in (True, False):
            cache_k = torch.randn(slots, kv_heads, 300, head_dim, device=device, dtype=dtype)
            cache_v = torch.randn_like(cache_k)
            qkv = torch.randn(1, 1, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
            slot = torch.tensor([slots - 1], device=device)
            positions = torch.tensor([[prefix]], device=device)
            rope = RotaryEmbedding(head_dim, 10000.0, None)(positions)
            meta = AttentionMetadata(positions, slot[:, None], positions, slot, torch.tensor([prefix], device=device),
                                     torch.tensor([[[sees_itself]]], device=device), prefix + 1)
            heads_of = SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
            q, kv = LlamaAttention.rotate(heads_of, qkv, rope)  # reads only the head counts
            expected_k, expected_v = cache_k.clone(), cache_v.clone()
            write_kv(kv, expected_k, expected_v, meta)
            expected = tree_attention.tree_attention(q, expected_k, expected_v, meta.read_slots, meta.prefix_lens,
                                                     meta.tree_mask)
            assert tree_attention.decode_supported(qkv, cache_k, meta.tree_mask)
            out = tree_attention.decode_attention(qkv, rope, heads, cache_k, cache_v, meta.write_slots,
                                                  meta.write_offsets, meta.read_slots, meta.prefix_lens, meta.tree_mask)
            assert torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)
            error = (out.double() - expected.double()).abs().max().item()
            assert error < tolerance, f"case {heads, kv_heads, head_dim, prefix, sees_itself}: max error {error:.2e}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("check", ["check_against_sdpa", "check_decode_against_unfolded"])
def test_kernel_matches_sdpa_in_triton_interpreter(check):
    code = f"import torch; from tests.test_tree_attention import {check}; {check}('cpu', torch.float32, 1e-5)"
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_kernel_matches_sdpa_on_gpu(dtype, tolerance):
    check_against_sdpa("cuda", dtype, tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_decode_kernel_matches_the_unfolded_path_on_gpu(dtype, tolerance):
    check_decode_against_unfolded("cuda", dtype, tolerance)


@pytest.mark.parametrize("slots", [[0, 1, 2], [4, 2, 3], [1], [0, 2, 3], [5, 1, 3, 2]],
                         ids=["run", "permuted-run", "one", "gap", "permuted-gap"])
def test_cpu_attention_over_slots_in_any_order(slots):
    """The CPU path reads a contiguous run of slots as a view (rows reordered to slot order and back),
    any other set of slots as a gathered copy: both as SDPA over each row's own slot."""
    from specinfer.layers.attention import cached_attention

    torch.manual_seed(1)
    batch, heads, kv_heads, tokens, head_dim, width = len(slots), 6, 3, 4, 16, 5
    cache_k = torch.randn(7, kv_heads, 64, head_dim)
    cache_v = torch.randn_like(cache_k)
    q = torch.randn(batch, heads, tokens, head_dim)
    read_slots, prefix_lens = torch.tensor(slots), torch.tensor([9, 30, 0, 17, 4][:batch])
    tree_mask = torch.rand(batch, tokens, width) < 0.5
    tree_mask[:, :, 0] = True
    kv_len = int((prefix_lens + width).max())
    meta = AttentionMetadata(None, None, None, read_slots, prefix_lens, tree_mask, kv_len)
    out = cached_attention(q, cache_k, cache_v, meta)
    expected = reference(q, cache_k, cache_v, read_slots, prefix_lens, tree_mask)
    assert (out.double() - expected).abs().max().item() < 1e-5
