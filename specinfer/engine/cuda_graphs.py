"""CUDA graphs for the model forward: one captured graph per padded (batch, tokens, width) bucket.

A decode, draft or verification step of a small model is dominated by kernel launches, not by math.
Replaying a captured graph launches the whole forward at once. Shapes must be static, so inputs are
padded to the bucket: batch rows, new tokens, and the width of the tree part of the attention mask
(the speculative entries a token may see). Context lengths stay dynamic: attention reads each row's
prefix length from the device. Padding rows write into the cache's scratch slot.
"""

from __future__ import annotations

import torch
from torch import nn

from . import one_off
from .gc_freeze import freeze_long_lived_objects
from .host_batch import DeviceBatch, HostBatch, Layout
from .kv_cache import KVCache

# Powers of two up to 16, then every multiple of 16: a verified tree is its nodes plus the root (the
# 64-node tree is 65 tokens), and padding it to the next power of two doubled the pass's matrix rows,
# attention rows and cache writes. Graphs are captured on first use (the adaptive engine captures its
# ladder's up front, `RequestManager._capture_ladder`), so only the sizes served cost memory.
TOKEN_BUCKETS = (1, 2, 4, 8) + tuple(range(16, 257, 16))


class CudaGraphs:
    def __init__(self, model: nn.Module, cache: KVCache, max_batch: int) -> None:
        self.model = model
        self.cache = cache
        self.batch_buckets = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
        self.graphs: dict[Layout, _Graph] = {}
        self.pool = None

    def bucket(self, batch: int, num_tokens: int, width: int) -> tuple[int, int, int] | None:
        """The smallest captured shape (batch, tokens, tree width) that holds the batch, or None to run
        eagerly (e.g. a prefill)."""
        b = next((x for x in self.batch_buckets if x >= batch), None)
        # Padding columns write into the scratch slot at their column index, which must fit the cache.
        t = next((x for x in TOKEN_BUCKETS if num_tokens <= x <= self.cache.capacity), None)
        w = next((x for x in TOKEN_BUCKETS if max(width, t or 0) <= x), None)
        return None if b is None or t is None or w is None else (b, t, w)

    @torch.inference_mode()
    def capture_up_to(self, batch: int, num_tokens: int) -> None:
        """Capture, where not yet captured, every bucket that serves `batch` rows of 1 to `num_tokens` new
        tokens with nothing speculative before them (a tree mask as wide as the tokens)."""
        for tokens in [t for t in TOKEN_BUCKETS if t < num_tokens] + [num_tokens]:
            shape = self.bucket(batch, tokens, tokens)
            layout = Layout(*shape) if shape is not None else None
            if layout is not None and layout not in self.graphs:
                self.graphs[layout] = self._capture(layout)

    def load(self, host: HostBatch) -> DeviceBatch:
        """Copy `host` (pinned: the copy does not block the host) into its bucket's static inputs, which
        it returns (the caller may still write drafted token ids into them); `replay` runs the pass."""
        graph = self.graphs.get(host.layout)
        if graph is None:
            graph = self.graphs[host.layout] = self._capture(host.layout)
        graph.batch.buffer.copy_(host.buffer, non_blocking=True)
        host.sent(graph.batch.buffer.device)
        return graph.batch

    def replay(self, layout: Layout) -> torch.Tensor:
        """Run the bucket's captured pass; returns its static hidden states [B, T, H]."""
        graph = self.graphs[layout]
        graph.graph.replay()
        return graph.hidden

    def _capture(self, layout: Layout) -> "_Graph":
        one_off.note()
        device, capacity = self.cache.data.device, self.cache.capacity
        host = HostBatch(layout, self.cache.scratch_slot, pinned=False)  # all padding
        batch = DeviceBatch(layout, host.buffer.to(device), kv_len=capacity)
        # Warm up on a side stream (lazy initialisation must not happen during capture).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(batch.tokens, self.cache, batch.meta)
        torch.cuda.current_stream(device).wait_stream(stream)
        batch.meta.dense_mask = batch.meta.sdpa_rows = None  # built inside the graph, so that replays rebuild it
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(batch.tokens, self.cache, batch.meta)
        self.pool = graph.pool()
        graph.replay()  # a graph's first launch uploads it: paid here, in the step that is not timed
        freeze_long_lived_objects(collect=False)  # what compiling and capturing made lives on with the graph
        return _Graph(graph, batch, hidden)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, batch: DeviceBatch, hidden: torch.Tensor):
        self.graph, self.batch, self.hidden = graph, batch, hidden
