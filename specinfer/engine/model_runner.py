"""Tensors in, logits out: runs one model over ragged batches of token chunks against its KV cache.

Each slot's cache holds `num_cached` committed entries, then a scratch area of *speculative* entries
appended during one engine step (a catch-up chain, SSM tree levels, or the tree being verified). A new
token attends to every committed entry and to its own ancestors among the speculative ones. `commit`
keeps one chain of speculative entries (the accepted path), compacts it behind the committed prefix and
drops the rest. The runner decides nothing: which tokens to feed and what to keep come from the caller.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SpecInferError
from . import one_off
from .cuda_graphs import CudaGraphs
from .host_batch import HostBatch, HostBatchPool, Layout
from .kv_cache import KVCache


@dataclass(slots=True)
class Chunk:
    """New tokens for one slot. `parents[i]` indexes the slot's speculative entries (existing ones first,
    then this chunk's, in order); -1 hangs the token directly off the committed prefix."""

    slot: int
    tokens: list[int]
    parents: list[int]
    logit_rows: list[int]  # which of the new tokens need logits

    @classmethod
    def chain(cls, slot: int, tokens: list[int], logits: str = "last") -> "Chunk":
        """Tokens in sequence after the prefix (prefill, catch-up); logits for "last", "all" or "none"."""
        n = len(tokens)
        rows = {"last": [n - 1], "all": list(range(n)), "none": []}[logits]
        return cls(slot, tokens, [-1] + list(range(n - 1)), rows)


@dataclass(slots=True)
class _SlotState:
    num_cached: int = 0
    depths: list[int] | None = None  # depth of each speculative entry (0 = child of the prefix)
    ancestors: np.ndarray | None = None  # [n, n] bool, ancestor-or-self among speculative entries

    @property
    def num_speculative(self) -> int:
        return 0 if self.depths is None else len(self.depths)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        num_slots: int,
        capacity: int,
        cache_dtype: torch.dtype | None = None,
        use_cuda_graphs: bool | None = None,
    ):
        """`use_cuda_graphs` (default: on for CUDA) replays captured graphs for small batches of chunks."""
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(model.config, num_slots, capacity, self.device, cache_dtype or param.dtype)
        self.slots = [_SlotState() for _ in range(num_slots)]
        if use_cuda_graphs is None:
            # Tensor-parallel ranks capture too: NCCL all-reduces replay inside graphs, and every rank runs
            # the same steps, so all capture the same buckets at the same step (a 13B-shaped decode on 2
            # H200s: 59 ms eager, host-bound, against 8.4 ms captured).
            # Streamed (offloaded) layers swap their weights per pass, which a captured graph cannot follow.
            use_cuda_graphs = self.device.type == "cuda" and getattr(model, "streamer", None) is None
        self.graphs = CudaGraphs(model, self.cache, max_batch=num_slots) if use_cuda_graphs else None
        self.host_batches = HostBatchPool(self.cache.scratch_slot, pinned=self.device.type == "cuda")
        self._deferred_moves: list[list[tuple[int, list[int], int]]] = []  # see commit_all

    def num_cached(self, slot: int) -> int:
        return self.slots[slot].num_cached

    def num_speculative(self, slot: int) -> int:
        return self.slots[slot].num_speculative

    def release(self, slot: int) -> None:
        self.slots[slot] = _SlotState()

    def forward(self, chunks: list[Chunk], device_tokens: torch.Tensor | None = None,
                replay: bool = True) -> list[torch.Tensor]:
        """Run all chunks in one batched pass; returns, per chunk, logits [len(logit_rows), vocab] (fp32).

        `device_tokens` [len(chunks), max chunk length]: the token ids, already on the device (drafted
        there); the chunks' own `tokens` then only count them. `replay=False` marks a pass whose shape
        does not come back step after step (an SSM catching up on a prompt or on the tokens of plain
        steps): it runs eagerly even where a CUDA graph could serve (capturing one would cost tens of
        milliseconds for one use), and counts as one-off work (`one_off.py`), so the step is not timed.
        Nothing here waits for the device."""
        logits = self.forward_rows(chunks, device_tokens, replay)
        if logits is None:
            return [torch.empty(0, device=self.device) for _ in chunks]
        return list(logits.split([len(c.logit_rows) for c in chunks]))

    @torch.inference_mode()
    def forward_rows(self, chunks: list[Chunk], device_tokens: torch.Tensor | None = None,
                     replay: bool = True) -> torch.Tensor | None:
        """`forward`, its logits in one tensor [rows, vocab], chunk after chunk (None: no rows asked for)."""
        self._move_deferred()
        num_tokens = max(len(c.tokens) for c in chunks)
        width = max(self.slots[c.slot].num_speculative + len(c.tokens) for c in chunks)
        if not replay:
            one_off.note()
        shape = self.graphs.bucket(len(chunks), num_tokens, width) if self.graphs is not None and replay else None
        host = self._prepare(chunks, Layout(*(shape or (len(chunks), num_tokens, width))))
        # Eagerly: a device copy of the inputs; with graphs: the bucket's static inputs, loaded.
        batch = host.to_device(self.device) if shape is None else self.graphs.load(host)
        if device_tokens is not None:
            batch.tokens[: device_tokens.shape[0], : device_tokens.shape[1]] = device_tokens
        if shape is None:
            hidden = self.model(batch.tokens, self.cache, batch.meta)  # [B, T, hidden]
        else:
            hidden = self.graphs.replay(host.layout)
        n = host.num_logit_rows
        if not n:
            return None
        # With graphs, the LM head (eager) runs at a bucketed row count: each new count's first product
        # stalls (see `warm_logits`), and steps where some requests draft come in every count. Padding
        # rows repeat logit row 0 (the buffer's padding) and are cut off.
        padded = min(logit_rows_bucket(n), batch.logit_rows.shape[0]) if shape is not None else n
        rows = batch.logit_rows[:padded]
        logits = self.model.compute_logits(hidden.reshape(-1, hidden.shape[-1])[rows])
        return logits if padded == n else logits[:n]

    @torch.inference_mode()
    def warm_logits(self, max_rows: int) -> None:
        """Run the LM head and the argmax after it, which stay eager, once at every row count a replayed
        pass of up to `max_rows` logit rows uses (`logit_rows_bucket`, or a captured layout's whole
        batch): a shape's first matrix product loads its kernel lazily (on an H200 a tree size's first
        step took 4.8-5.9 ms against 1.9-2.4 ms after), which would otherwise fall in a timed step."""
        if self.graphs is None:
            return
        counts = {logit_rows_bucket(rows) for rows in range(1, max_rows + 1)}
        counts |= {layout.batch * layout.tokens for layout in self.graphs.graphs}
        for rows in sorted(r for r in counts if r <= logit_rows_bucket(max_rows)):
            hidden = torch.zeros(rows, self.model.config.hidden_size, device=self.device, dtype=self.cache.data.dtype)
            self.model.compute_logits(hidden).argmax(-1)

    def extend_speculative(self, slot: int, depths: list[int]) -> None:
        """Record speculative entries written outside `forward` (by a tree expansion that ran on the
        device), with their depths. Such entries can be committed, not extended by `forward`."""
        state = self.slots[slot]
        state.depths = (state.depths or []) + depths
        state.ancestors = None

    def commit(self, slot: int, keep: list[int]) -> None:
        """Keep speculative entries `keep` (a chain hanging off the prefix) as committed; drop the rest."""
        self.commit_all([(slot, keep)])

    def commit_all(self, commits: list[tuple[int, list[int]]], defer_moves: bool = False) -> None:
        """`commit` for several slots at once: one cache move for all of them. `defer_moves`: the move is
        queued on the device just before the next pass instead of now (after an SSM's draft launched
        meanwhile, say: the host's work for it then overlaps the device's instead of delaying it)."""
        moves = []
        for slot, keep in commits:
            state = self.slots[slot]
            if keep:
                assert state.depths is not None and [state.depths[i] for i in keep] == list(range(len(keep))), keep
                if keep[-1] != len(keep) - 1:  # (ascending) else the chain already lies where it is kept
                    moves.append((slot, [state.num_cached + i for i in keep], state.num_cached))
            state.num_cached += len(keep)
            state.depths, state.ancestors = None, None
        if defer_moves:
            self._deferred_moves.append(moves)
        else:
            self._move_deferred()
            self.cache.move_entries(moves)

    def _move_deferred(self) -> None:
        """Queue the cache moves of deferred commits, in their order."""
        for moves in self._deferred_moves:
            self.cache.move_entries(moves)
        self._deferred_moves.clear()

    def _prepare(self, chunks: list[Chunk], layout: Layout) -> HostBatch:
        """Host inputs for `chunks`, padded to `layout`; reads entries up to the longest row's end."""
        states = [self.slots[c.slot] for c in chunks]
        needed = max(s.num_cached + s.num_speculative + len(c.tokens) for s, c in zip(states, chunks))
        if needed > self.cache.capacity:
            raise SpecInferError(f"KV cache overflow: {needed} entries needed, capacity {self.cache.capacity}")
        host = self.host_batches.get(layout)
        host.kv_len = needed
        first = chunks[0]
        if all(s.depths is None and c.parents == first.parents and c.logit_rows == first.logit_rows
               for s, c in zip(states, chunks)):
            self._prepare_alike(chunks, states, host)
            return host
        rows = 0
        for b, (chunk, state) in enumerate(zip(chunks, states)):
            base, prev, n = state.num_cached, state.num_speculative, len(chunk.tokens)
            depths, ancestors = _extend_tree(state, chunk.parents)
            host.tokens[b, :n] = chunk.tokens
            host.positions[b, :n] = depths[prev:]
            host.positions[b, :n] += base
            host.write_slots[b, :n] = chunk.slot
            host.write_offsets[b, :n] = np.arange(base + prev, base + prev + n)
            host.read_slots[b] = chunk.slot
            host.prefix_lens[b] = base
            host.tree_mask[b, :n, : prev + n] = ancestors[prev:]
            host.logit_rows[rows : rows + len(chunk.logit_rows)] = chunk.logit_rows
            host.logit_rows[rows : rows + len(chunk.logit_rows)] += b * layout.tokens
            rows += len(chunk.logit_rows)
            state.depths, state.ancestors = depths, ancestors
        host.num_logit_rows = rows
        return host

    @staticmethod
    def _prepare_alike(chunks: list[Chunk], states: list[_SlotState], host: HostBatch) -> None:
        """`_prepare` where every chunk is the same tree (plain decoding, whole trees) starting with no
        speculative entries: each field in one numpy operation for the whole batch, not one per row (at
        batch 64 the loop cost 1.7 ms of host time a step on an H200's host, more than the pass itself)."""
        B, n, first = len(chunks), len(chunks[0].tokens), chunks[0]
        depths, ancestors, offsets = _tree_structure(tuple(first.parents))
        slots = np.fromiter((c.slot for c in chunks), np.int64, B)
        bases = np.fromiter((s.num_cached for s in states), np.int64, B)
        host.tokens[:B, :n] = [c.tokens for c in chunks]
        np.add(bases[:, None], depths, out=host.positions[:B, :n])
        host.write_slots[:B, :n] = slots[:, None]
        np.add(bases[:, None], offsets, out=host.write_offsets[:B, :n])
        host.read_slots[:B] = slots
        host.prefix_lens[:B] = bases
        host.tree_mask[:B, :n, :n] = ancestors
        k = len(first.logit_rows)
        if k:
            rows = np.asarray(first.logit_rows)[None, :] + host.layout.tokens * np.arange(B)[:, None]
            host.logit_rows[: B * k] = rows.ravel()
        host.num_logit_rows = B * k
        depth_list = depths.tolist()
        for state in states:
            state.depths, state.ancestors = depth_list, ancestors


def logit_rows_bucket(rows: int) -> int:
    """`rows` rounded up to 8 to 15 times a power of two (1 to 8 stay as they are): at most 1/8 more rows
    than asked, and about 8 counts an octave."""
    if rows <= 8:
        return rows
    step = 1 << (rows.bit_length() - 4)  # an eighth of the octave's lower end
    return -(-rows // step) * step


@functools.lru_cache(maxsize=256)
def _tree_structure(parents: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Depths, ancestor-or-self matrix (read-only: slots share it) and entry offsets 0..n-1 of a tree of
    new entries with nothing speculative before them. A step verifies one tree shape for most requests."""
    depths, ancestors = _extend_tree(_SlotState(), list(parents))
    ancestors.flags.writeable = False
    return np.asarray(depths, dtype=np.int64), ancestors, np.arange(len(parents), dtype=np.int64)


def _extend_tree(state: _SlotState, parents: list[int]) -> tuple[list[int], np.ndarray]:
    """Depths and ancestor-or-self matrix of the slot's speculative entries after appending `parents`."""
    prev = state.num_speculative
    if prev and state.ancestors is None:
        raise SpecInferError("entries recorded by extend_speculative can be committed, not extended")
    n = len(parents)
    depths = list(state.depths or [])
    for i, p in enumerate(parents):
        if not -1 <= p < prev + i:
            raise ValueError(f"parent {p} of new entry {prev + i} must precede it")
        depths.append(0 if p < 0 else depths[p] + 1)
    ancestors = np.zeros((prev + n, prev + n), dtype=np.bool_)
    if prev:
        ancestors[:prev, :prev] = state.ancestors
    is_chain = all(p == prev + i - 1 for i, p in enumerate(parents[1:], start=1))
    if is_chain:  # prefill and catch-up: one block copy instead of a row per token
        if parents[0] >= 0:
            ancestors[prev:, :prev] = ancestors[parents[0], :prev]
        ancestors[prev:, prev:] = np.tri(n, dtype=np.bool_)
    else:
        for i, p in enumerate(parents):
            row = prev + i
            if p >= 0:
                ancestors[row] = ancestors[p]
            ancestors[row, row] = True
    return depths, ancestors
