"""A plain step whose tokens are still on their way to the host.

In a plain step (incremental decoding, or the adaptive engine's plain steps) each request's next input is
this step's token, already on the device: the argmax of its logits, or for a sampled request a draw made
there at a uniform the host knows ahead (`Request.position_uniforms`). The engine therefore queues
step t + 1 straight from step t's device tokens and reads step t back afterwards: the host's work between
two passes (reading back, appending tokens, retiring requests, the controller, preparing and launching
the next pass) then runs while the device computes, instead of leaving it idle. On an H200 that work
was 0.13 to 0.27 ms of a 1.1 ms batch-1 step (`docs/benchmarks/step_profile_gpu.md`).

The host learns one step late that a request ended (an EOS token): the step queued meanwhile computed one
token too many for it, which is dropped, and its cache entry is freed with the slot. Nothing else changes:
the chained step feeds exactly the tokens the host would have fed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .ring_cache import RingCache
from .sequence import Request

# Pinned buffers for the tokens' copy to the host, by batch size, used in turn: at most two steps are in
# flight, and a buffer is read before the step three later copies into it.
_read_back: RingCache[int, torch.Tensor] = RingCache(
    lambda rows: torch.empty(rows, dtype=torch.int64, pin_memory=True), depth=3, max_keys=64)


@dataclass(slots=True)
class InFlightStep:
    requests: list[Request]
    targets: torch.Tensor  # [B] int64 on the device: each request's next token
    one_offs: int  # `one_off.count()` when the step was queued
    start: float = field(default_factory=time.perf_counter)  # from when its time counts
    refills: int = 0  # the tree size of the speculative step it follows (0: it follows a plain step)
    _host: torch.Tensor | None = None
    _copied: torch.cuda.Event | None = None

    def __post_init__(self) -> None:
        if self.targets.device.type == "cuda":
            # Queued now, behind this step's pass and ahead of the next: reading it waits for this step only.
            self._host, _ = _read_back.next(self.targets.shape[0])
            self._host.copy_(self.targets, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.targets.device))

    def tokens(self) -> list[int]:
        """The step's tokens on the host (waits for the step, not for what was queued after it)."""
        if self._copied is None:
            return self.targets.tolist()
        self._copied.synchronize()
        return self._host.tolist()
