"""One preallocated KV cache per model, indexed by request slot.

Layout: [num_layers, 2 (k/v), num_slots + 1, num_kv_heads, capacity, head_dim]. Every request owns one
slot in every model's cache (the scheduler hands out slot numbers); the extra last slot is scratch space
that padding rows of a ragged batch write into, so they never touch a live request.
"""

from __future__ import annotations

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
        `dst_start, dst_start + 1, ...`. All moves of a step go in one upload and one gather/scatter."""
        slots, src, dst = [], [], []
        for slot, entries, start in moves:
            targets = range(start, start + len(entries))
            if list(entries) != list(targets):
                slots += [slot] * len(entries)
                src += entries
                dst += targets
        if not slots:
            return
        index = upload(torch.tensor([slots, src, dst]), self.data.device)
        # Indexing with tensors copies first, so overlapping sources and destinations are safe.
        self.data[:, :, index[0], :, index[2]] = self.data[:, :, index[0], :, index[1]]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
