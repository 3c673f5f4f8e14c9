"""Reusable host objects by key: a few per key, handed out in turn; the least recently used keys dropped.

Pinned host memory costs tens of microseconds to take, so the buffers a step fills and copies to the
device (a pass's inputs, staged uploads) are kept and reused. Handing a key's buffers out in turn lets one
be filled while the copy out of the previous one may still be queued; bounding the keys keeps memory flat
while shapes vary (prefills come in every length, ragged index tensors in many widths).

Objects are made outside inference mode even when asked for inside it: a buffer first used by a pass under
`torch.inference_mode` (say, a cache move deferred into the next forward) is refilled in place later by
code that runs outside it (a commit), and an inference tensor refuses in-place updates there.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RingCache(Generic[K, V]):
    def __init__(self, make: Callable[[K], V], depth: int, max_keys: int) -> None:
        self.make, self.depth, self.max_keys = make, depth, max_keys
        self._rings: OrderedDict[K, list[V]] = OrderedDict()
        self._turns: dict[K, int] = {}

    def next(self, key: K) -> tuple[V, bool]:
        """The key's next object in turn, and whether it was just made (else it is being reused)."""
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = []
            if len(self._rings) > self.max_keys:
                self._turns.pop(self._rings.popitem(last=False)[0], None)
        self._rings.move_to_end(key)
        turn = self._turns.get(key, 0)
        self._turns[key] = (turn + 1) % self.depth
        if turn == len(ring):
            with torch.inference_mode(False):
                ring.append(self.make(key))
            return ring[turn], True
        return ring[turn], False
