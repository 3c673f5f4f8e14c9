"""A device tensor's copy to the host, queued now and read later.

`tensor.tolist()` waits for everything queued on the stream, the work queued after the tensor was
computed included. A copy into pinned memory with an event recorded behind it lets the host read the
tensor as soon as it is ready while the device goes on with what was queued after it: the next plain
step (engine/in_flight.py), the next tree step's draft (`RequestManager._draft_ahead`).
"""

from __future__ import annotations

import torch

from .ring_cache import RingCache

# Pinned buffers by length, used in turn: at most two read-backs are pending at once (a plain step in
# flight and the one queued behind it), and a buffer is read before the one three later copies into it.
_buffers: RingCache[int, torch.Tensor] = RingCache(
    lambda rows: torch.empty(rows, dtype=torch.int64, pin_memory=True), depth=3, max_keys=64)


class QueuedReadBack:
    """The copy of `tensor` (1-D, int64) to the host, queued on the current stream when made."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor, self._host, self._copied = tensor, None, None
        if tensor.device.type == "cuda":
            self._host, _ = _buffers.next(tensor.shape[0])
            self._host.copy_(tensor, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(tensor.device))

    def tolist(self) -> list[int]:
        """The values (waits for the tensor, not for what was queued after it)."""
        if self._copied is None:
            return self._tensor.tolist()
        self._copied.synchronize()
        return self._host.tolist()
