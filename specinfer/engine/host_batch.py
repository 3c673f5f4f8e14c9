"""One forward's inputs, built on the host in one byte buffer and sent to the device in one copy.

A step of a small model is short enough for host work to show: a dozen small torch tensors, each
filled by torch ops, pinned and copied on its own, cost more than the copies themselves. Here every
input of a pass — token ids, positions, where keys/values are written and read, prefix lengths, the
rows whose logits are wanted, the tree mask — has its place in one buffer, filled through numpy views
(a numpy op costs a microsecond, a torch op several), pinned and copied once. On the device the
metadata are views of that copy; a captured CUDA graph owns a device buffer of the same layout and the
copy lands there. Buffers are kept per layout and reused (`HostBatchPool`): allocating pinned memory
costs tens of microseconds a step, as much as filling the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layers.attention import AttentionMetadata
from .ring_cache import RingCache


@dataclass(frozen=True, slots=True)
class Layout:
    """Shapes of one padded batch: rows, new tokens per row, and the width of the tree mask."""

    batch: int
    tokens: int
    width: int

    @property
    def num_ints(self) -> int:  # tokens, positions, write slots/offsets, logit rows; then 2 per row
        return 5 * self.batch * self.tokens + 2 * self.batch

    @property
    def nbytes(self) -> int:
        return 8 * self.num_ints + self.batch * self.tokens * self.width

    def split(self, ints, mask_bytes):
        """Named views of the int64 region and the mask region (numpy arrays or torch tensors alike)."""
        B, T, W = self.batch, self.tokens, self.width
        bt = B * T
        return dict(
            tokens=ints[0:bt].reshape(B, T),
            positions=ints[bt : 2 * bt].reshape(B, T),
            write_slots=ints[2 * bt : 3 * bt].reshape(B, T),
            write_offsets=ints[3 * bt : 4 * bt].reshape(B, T),
            logit_rows=ints[4 * bt : 5 * bt],
            read_slots=ints[5 * bt : 5 * bt + B],
            prefix_lens=ints[5 * bt + B : 5 * bt + 2 * B],
            tree_mask=mask_bytes.reshape(B, T, W),
        )


class HostBatch:
    """Host side: numpy views to fill, initialised as all padding (rows and columns that write into the
    scratch slot and see one entry, so that their softmax stays finite; their outputs are unused)."""

    def __init__(self, layout: Layout, scratch_slot: int, pinned: bool) -> None:
        self.layout, self.pinned = layout, pinned
        self.buffer = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pinned)
        self._raw = self.buffer.numpy()
        views = layout.split(self._raw[: 8 * layout.num_ints].view(np.int64), self._raw[8 * layout.num_ints :].view(np.bool_))
        self.tokens, self.positions = views["tokens"], views["positions"]
        self.write_slots, self.write_offsets = views["write_slots"], views["write_offsets"]
        self.logit_rows, self.read_slots = views["logit_rows"], views["read_slots"]
        self.prefix_lens, self.tree_mask = views["prefix_lens"], views["tree_mask"]
        self._raw[: 8 * layout.num_ints].view(np.int64)[:] = 0
        self.write_slots[:] = scratch_slot
        self.write_offsets[:] = np.arange(layout.tokens)
        self.read_slots[:] = scratch_slot
        self.tree_mask[:] = False
        self.tree_mask[:, :, 0] = True
        self._padding = self._raw.copy()
        self.num_logit_rows = 0
        self.kv_len = 0  # set by the caller: entries the SDPA path reads
        self._sent: torch.cuda.Event | None = None  # recorded after the last copy out of `buffer`

    def reset(self) -> None:
        """All padding again, once the last copy out of the buffer has been done (it is queued on the
        device behind earlier work, and the host must not overwrite what it has not yet read)."""
        if self._sent is not None:
            self._sent.synchronize()
            self._sent = None
        np.copyto(self._raw, self._padding)
        self.num_logit_rows = self.kv_len = 0

    def sent(self, device: torch.device) -> None:
        """Call after queuing a copy out of `buffer` on `device`'s current stream."""
        if self.pinned:
            self._sent = torch.cuda.Event()
            self._sent.record(torch.cuda.current_stream(device))

    def to_device(self, device: torch.device) -> "DeviceBatch":
        if device.type == "cpu":  # the host buffer serves as it is (the pass runs before it is refilled)
            return DeviceBatch(self.layout, self.buffer, self.kv_len)
        batch = DeviceBatch(self.layout, self.buffer.to(device, non_blocking=True), self.kv_len)
        self.sent(device)
        return batch


class HostBatchPool:
    """Reusable host batches per layout, a few of each in turn, so that filling one rarely waits for the
    copy of the one before it; layouts beyond MAX_LAYOUTS (eager prefills come in every length) are
    dropped, least recently used first."""

    DEPTH = 2
    MAX_LAYOUTS = 64

    def __init__(self, scratch_slot: int, pinned: bool) -> None:
        self._batches: RingCache[Layout, HostBatch] = RingCache(
            lambda layout: HostBatch(layout, scratch_slot, pinned), self.DEPTH, self.MAX_LAYOUTS)

    def get(self, layout: Layout) -> HostBatch:
        """A batch of `layout`, all padding."""
        batch, fresh = self._batches.next(layout)
        if not fresh:
            batch.reset()
        return batch


class DeviceBatch:
    """Device side: the token ids, the attention metadata and the logit rows, all views of `buffer`."""

    def __init__(self, layout: Layout, buffer: torch.Tensor, kv_len: int) -> None:
        self.layout, self.buffer = layout, buffer
        views = layout.split(buffer[: 8 * layout.num_ints].view(torch.int64), buffer[8 * layout.num_ints :].view(torch.bool))
        self.tokens, self.logit_rows = views["tokens"], views["logit_rows"]
        self.meta = AttentionMetadata(
            positions=views["positions"], write_slots=views["write_slots"], write_offsets=views["write_offsets"],
            read_slots=views["read_slots"], prefix_lens=views["prefix_lens"], tree_mask=views["tree_mask"],
            kv_len=kv_len,
        )
