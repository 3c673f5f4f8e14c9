"""Top-k over a long last dimension in two short stages, for the drafter's few rows of scores.

`torch.topk` over a few rows of 16k-49k scores runs one thread block per row (a radix select), and cost
an H200 about 50 us a call for a handful of rows, four times a step for a 4-level tree: more than the
SSM's own layers. Splitting each row into blocks, taking every block's top k and then the top k of those
candidates spreads the first stage over many blocks and leaves a short second one. The k best are the
same, in the same order (ties aside, which a draft may break either way: it only proposes tokens).
"""

from __future__ import annotations

import torch

BLOCK = 256  # columns per first-stage block
MIN_COLUMNS = 4096  # shorter rows: one torch.topk
# Past this many first-stage blocks (rows x blocks per row) the first stage is the slower one (64 rows of
# 49,152 scores, k = 8, on an H200: 183 us against 61 us for torch.topk).
MAX_BLOCKS = 2048


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest of `scores` [..., V] along the last dimension, best first: [..., k]."""
    columns = scores.shape[-1]
    if k == 1:
        return scores.argmax(-1, keepdim=True)
    rows = scores.numel() // max(columns, 1)
    if columns < MIN_COLUMNS or columns % BLOCK or k > BLOCK or rows * (columns // BLOCK) > MAX_BLOCKS:
        return scores.topk(k, dim=-1).indices
    blocks = scores.unflatten(-1, (columns // BLOCK, BLOCK))  # [..., V / BLOCK, BLOCK]
    values, within = blocks.topk(k, dim=-1)  # [..., V / BLOCK, k]
    best = values.flatten(-2).topk(k, dim=-1).indices  # [..., k] into the candidates
    block = best // k
    return block * BLOCK + within.flatten(-2).gather(-1, best)
