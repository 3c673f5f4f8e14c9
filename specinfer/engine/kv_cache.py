"""One preallocated KV cache per model, indexed by request slot.

Layout: [num_layers, 2 (k/v), num_slots + 1, num_kv_heads, capacity, head_dim]. Every request owns one
slot in every model's cache (the scheduler hands out slot numbers); the extra last slot is scratch space
that padding rows of a ragged batch write into, so they never touch a live request.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.config import ModelConfig
from . import cache_moves_triton
from .upload import upload


class KVCache:
    def __init__(
        self, cfg: ModelConfig, num_slots: int, capacity: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        shape = (cfg.num_layers, 2, num_slots + 1, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.data = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = [self.data[i] for i in range(cfg.num_layers)]  # each [2, slots + 1, Hkv, capacity, D]
        self.keys = [self.data[i, 0] for i in range(cfg.num_layers)]  # each [slots + 1, Hkv, capacity, D]
        self.values = [self.data[i, 1] for i in range(cfg.num_layers)]
        self.num_slots = num_slots
        self.capacity = capacity
        self.scratch_slot = num_slots
        # [layers * 2, (slots + 1) * Hkv * capacity, D]: one row per cached entry of every slot and head.
        self._rows = self.data.view(cfg.num_layers * 2, -1, cfg.head_dim)
        self._slot_rows = cfg.num_kv_heads * capacity
        self._heads = (np.arange(cfg.num_kv_heads) * capacity)[:, None]

    def move_entries(self, moves: list[tuple[int, list[int], int]]) -> None:
        """For each (slot, src, dst_start): copy entries `src` of `slot` (all layers, src ascending) to
        `dst_start, dst_start + 1, ...`. All moves of a step go in one upload and, on a GPU, one kernel."""
        slots, src, dst, counts = [], [], [], []
        down = True  # every entry moves towards the slot's start (a commit's compaction)
        for slot, entries, start in moves:
            if entries and list(entries) != list(range(start, start + len(entries))):
                slots += [slot] * len(entries)
                src += entries
                dst += range(start, start + len(entries))
                counts.append(len(entries))
                down = down and entries[0] >= start  # ascending sources: then each one lies after its target
        if not slots:
            return
        # Rows of the flat view, head by head: [Hkv, entries], each (head, move) a contiguous run.
        base = self._heads + np.asarray(slots) * self._slot_rows
        src_rows, dst_rows = (base + np.asarray(src)).ravel(), (base + np.asarray(dst)).ravel()
        if down and cache_moves_triton.supported(self.data):
            runs = np.cumsum([0] + counts * len(self._heads))
            cache_moves_triton.move_rows(self._rows, runs, src_rows, dst_rows, upload)
            return
        index = upload(torch.from_numpy(np.stack([src_rows, dst_rows])), self.data.device)
        # The gather copies first, so overlapping sources and destinations are safe.
        self._rows.index_copy_(1, index[1], self._rows.index_select(1, index[0]))

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
