"""One preallocated KV cache per model, indexed by request slot.

Layout: [num_layers, 2 (k/v), num_slots + 1, num_kv_heads, capacity, head_dim]. Every request owns one
slot in every model's cache (the scheduler hands out slot numbers); the extra last slot is scratch space
that padding rows of a ragged batch write into, so they never touch a live request.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.config import ModelConfig
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

    def move_entries(self, moves: list[tuple[int, list[int], int]]) -> None:
        """For each (slot, src, dst_start): copy entries `src` of `slot` (all layers, src ascending) to
        `dst_start, dst_start + 1, ...`. All moves of a step go in one upload, one gather and one scatter.

        Each (slot, head, entry) is one row of D values in every layer's keys and values, so a move is a
        list of rows: a one-dimensional `index_select` and `index_copy_` (multi-dimensional advanced
        indexing over the 6-d cache cost the host several hundred microseconds a step on an H200's host)."""
        src, dst = [], []
        for slot, entries, start in moves:
            if list(entries) != list(range(start, start + len(entries))):
                src.append((slot, entries))
                dst.append((slot, range(start, start + len(entries))))
        if not src:
            return
        heads, capacity = self.data.shape[3], self.capacity
        head_rows = np.arange(heads, dtype=np.int64)[:, None] * capacity  # [H, 1]

        def rows(parts) -> np.ndarray:
            return np.concatenate([((slot * heads) * capacity + head_rows + np.asarray(entries)[None, :]).ravel()
                                   for slot, entries in parts])

        index = upload(torch.from_numpy(np.stack([rows(src), rows(dst)])), self.data.device)
        flat = self.data.view(self.data.shape[0] * 2, -1, self.data.shape[-1])  # [layers * 2, rows, D]
        # The gather copies first, so overlapping sources and destinations are safe.
        flat.index_copy_(1, index[1], flat.index_select(1, index[0]))

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
