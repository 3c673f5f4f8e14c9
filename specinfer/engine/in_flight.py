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

from .read_back import QueuedReadBack
from .sequence import Request

@dataclass(slots=True)
class InFlightStep:
    requests: list[Request]
    targets: torch.Tensor  # [B] int64 on the device: each request's next token
    one_offs: int  # `one_off.count()` when the step was queued
    start: float = field(default_factory=time.perf_counter)  # from when its time counts
    refills: int = 0  # the tree size of the speculative step it follows (0: it follows a plain step)
    _read_back: QueuedReadBack | None = None

    def __post_init__(self) -> None:
        # Queued now, behind this step's pass and ahead of the next: reading it waits for this step only.
        self._read_back = QueuedReadBack(self.targets)

    def tokens(self) -> list[int]:
        """The step's tokens on the host (waits for the step, not for what was queued after it)."""
        return self._read_back.tolist()
