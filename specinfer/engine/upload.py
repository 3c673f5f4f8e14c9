"""Host-to-device copies that do not make the host wait for the device.

A plain `tensor.to("cuda")` from pageable memory synchronises with the stream: the host stalls until
every queued kernel has run, so building the next pass's inputs could never overlap the current pass.
Staging through pinned memory lets the copy queue behind the kernels. The staging buffers are kept and
reused per shape and dtype (taking fresh pinned memory costs tens of microseconds, and these copies
happen every step: the drafter's inputs, the cache moves of a commit); a buffer is refilled only once
the copy out of it has run.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

RING = 4  # buffers per shape and dtype, used in turn
MAX_SHAPES = 64  # shapes kept (least recently used dropped): ragged index tensors come in many widths


class _Staging:
    def __init__(self) -> None:
        self.rings: OrderedDict[tuple, list[list]] = OrderedDict()  # key -> [[buffer, event | None], ...]
        self.turns: dict[tuple, int] = {}

    def upload(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (tuple(tensor.shape), tensor.dtype, device)
        ring = self.rings.get(key)
        if ring is None:
            ring = self.rings[key] = []
            if len(self.rings) > MAX_SHAPES:
                self.turns.pop(self.rings.popitem(last=False)[0], None)
        self.rings.move_to_end(key)
        turn = self.turns.get(key, 0)
        self.turns[key] = (turn + 1) % RING
        if turn == len(ring):
            ring.append([torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True), None])
        entry = ring[turn]
        if entry[1] is not None:
            entry[1].synchronize()  # the copy out of this buffer RING uploads ago (long done, as a rule)
        entry[0].copy_(tensor)
        out = entry[0].to(device, non_blocking=True)
        entry[1] = torch.cuda.Event()
        entry[1].record(torch.cuda.current_stream(device))
        return out


_staging = _Staging()


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued on the current stream without a host sync."""
    if device.type != "cuda":
        return tensor.to(device)
    return _staging.upload(tensor, device)
