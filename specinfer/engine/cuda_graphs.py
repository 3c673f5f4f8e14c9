"""CUDA graphs for the model forward: one captured graph per padded (batch, tokens) bucket.

A decode, draft or verification step of a small model is dominated by kernel launches, not by math.
Replaying a captured graph launches the whole forward at once. Shapes must be static, so inputs are
padded to the bucket: batch rows, new tokens, and the width of the tree part of the attention mask
(the speculative entries a token may see). Context lengths stay dynamic: attention reads each row's
prefix length from the device. Padding rows write into the cache's scratch slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..layers.attention import AttentionMetadata
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .model_runner import HostBatch

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class CudaGraphs:
    def __init__(self, model: nn.Module, cache: KVCache, max_batch: int) -> None:
        self.model = model
        self.cache = cache
        self.batch_buckets = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None

    def bucket(self, batch: int, num_tokens: int, width: int) -> tuple[int, int, int] | None:
        """The smallest captured shape (batch, tokens, tree width) that holds the batch, or None to run
        eagerly (e.g. a prefill)."""
        b = next((x for x in self.batch_buckets if x >= batch), None)
        # Padding columns write into the scratch slot at their column index, which must fit the cache.
        t = next((x for x in TOKEN_BUCKETS if num_tokens <= x <= self.cache.capacity), None)
        w = next((x for x in TOKEN_BUCKETS if max(width, t or 0) <= x), None)
        return None if b is None or t is None or w is None else (b, t, w)

    def run(self, host: "HostBatch", tokens: torch.Tensor) -> torch.Tensor:
        """Copy `host`'s metadata and the device `tokens` into the bucket's static inputs and replay;
        returns the static hidden states [B, T, H]."""
        shape = (*tokens.shape, host.tree_mask.shape[2])
        graph = self.graphs.get(shape)
        if graph is None:
            graph = self.graphs[shape] = self._capture(*shape)
        graph.load(host, tokens)
        graph.graph.replay()
        return graph.hidden

    def _capture(self, batch: int, num_tokens: int, width: int) -> "_Graph":
        device, capacity, scratch = self.cache.data.device, self.cache.capacity, self.cache.scratch_slot
        tokens = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
        meta = AttentionMetadata(
            positions=torch.zeros(batch, num_tokens, dtype=torch.long, device=device),
            write_slots=torch.full((batch, num_tokens), scratch, dtype=torch.long, device=device),
            write_offsets=torch.arange(num_tokens, device=device).repeat(batch, 1),
            read_slots=torch.full((batch,), scratch, dtype=torch.long, device=device),
            prefix_lens=torch.zeros(batch, dtype=torch.long, device=device),
            tree_mask=torch.ones(batch, num_tokens, width, dtype=torch.bool, device=device),
            kv_len=capacity,
        )
        # Warm up on a side stream (lazy initialisation must not happen during capture).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(tokens, self.cache, meta)
        torch.cuda.current_stream(device).wait_stream(stream)
        meta.dense_mask = None  # built inside the graph, so that replays rebuild it
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(tokens, self.cache, meta)
        self.pool = graph.pool()
        return _Graph(graph, tokens, meta, hidden)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, tokens: torch.Tensor, meta: AttentionMetadata, hidden: torch.Tensor):
        self.graph, self.tokens, self.meta, self.hidden = graph, tokens, meta, hidden

    def load(self, host: "HostBatch", tokens: torch.Tensor) -> None:
        self.tokens.copy_(tokens)
        # The host tensors are pinned (ModelRunner._prepare): these copies do not block the host.
        self.meta.positions.copy_(host.positions, non_blocking=True)
        self.meta.write_slots.copy_(host.write_slots, non_blocking=True)
        self.meta.write_offsets.copy_(host.write_offsets, non_blocking=True)
        self.meta.read_slots.copy_(host.read_slots, non_blocking=True)
        self.meta.prefix_lens.copy_(host.prefix_lens, non_blocking=True)
        self.meta.tree_mask.copy_(host.tree_mask, non_blocking=True)
