"""Host-to-device copies that do not make the host wait for the device.

A plain `tensor.to("cuda")` from pageable memory synchronises with the stream: the host stalls until
every queued kernel has run, so building the next pass's inputs could never overlap the current pass.
Staging through pinned memory lets the copy queue behind the kernels. The staging buffers are kept and
reused per shape and dtype (taking fresh pinned memory costs tens of microseconds, and these copies
happen every step: the drafter's inputs, the cache moves of a commit); a buffer is refilled only once
the copy out of it has run.
"""

from __future__ import annotations

import torch

from .ring_cache import RingCache

RING = 4  # buffers per shape and dtype, used in turn
MAX_SHAPES = 64  # shapes kept (least recently used dropped): ragged index tensors come in many widths


class _Staged:
    """One pinned staging buffer and the event recorded after the last copy out of it."""

    def __init__(self, key: tuple) -> None:
        shape, dtype, _ = key
        self.buffer = torch.empty(shape, dtype=dtype, pin_memory=True)
        self.copied: torch.cuda.Event | None = None

    def upload(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()  # the copy out of this buffer RING uploads ago (long done, as a rule)
        self.buffer.copy_(tensor)
        out = self.buffer.to(device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record(torch.cuda.current_stream(device))
        return out


_staging: RingCache[tuple, _Staged] = RingCache(_Staged, RING, MAX_SHAPES)


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued on the current stream without a host sync."""
    if device.type != "cuda":
        return tensor.to(device)
    staged, _ = _staging.next((tuple(tensor.shape), tensor.dtype, device))
    return staged.upload(tensor, device)
