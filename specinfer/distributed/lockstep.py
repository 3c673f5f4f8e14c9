"""Serving under tensor parallelism: every rank runs the same request manager, in lockstep with rank 0.

The HTTP front end lives on rank 0 alone. There, every call that changes the engine's state (a request
registered, aborted or handed over, an engine step) is applied at once and queued; before each step the
queue is broadcast, and the other ranks replay it in the same order. Request ids, batches, trees and
verification then agree on every rank, as the model's collectives require. An idle server broadcasts a
keep-alive every `HEARTBEAT_S`, so that the other ranks' wait never reaches the collectives' timeout.
"""

from __future__ import annotations

import logging
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0


class LockstepManager:
    """Rank 0's request manager: the manager's interface, each state change mirrored to the other ranks."""

    def __init__(self, manager) -> None:
        self._manager = manager
        self._pending: list[tuple[str, tuple, dict]] = []
        self._last_sent = time.monotonic()

    def __getattr__(self, name: str):  # reads (requests, scheduler, engine, has_work, ...) go straight through
        return getattr(self._manager, name)

    def register_new_request(self, *args, **kwargs) -> int:
        request_id = self._manager.register_new_request(*args, **kwargs)  # refused requests are not mirrored
        self._pending.append(("register_new_request", args, kwargs))
        return request_id

    def abort_request(self, *args, **kwargs):
        result = self._manager.abort_request(*args, **kwargs)
        self._pending.append(("abort_request", args, kwargs))
        return result

    def pop_request(self, *args, **kwargs):
        result = self._manager.pop_request(*args, **kwargs)
        self._pending.append(("pop_request", args, kwargs))
        return result

    def step(self):
        self._send(("step", (), {}))
        return self._manager.step()

    def idle(self) -> None:
        """Called while there is no work: pass on queued changes, or a keep-alive now and then."""
        if self._pending or time.monotonic() - self._last_sent > HEARTBEAT_S:
            self._send(("noop", (), {}))

    def close(self) -> None:
        """Release the other ranks (they return from `follow`)."""
        self._send(("stop", (), {}))

    def _send(self, last: tuple[str, tuple, dict]) -> None:
        commands, self._pending = self._pending + [last], []
        _broadcast(commands)
        self._last_sent = time.monotonic()


def follow(manager) -> None:
    """The other ranks: replay rank 0's calls on `manager` until rank 0 closes."""
    while True:
        for name, args, kwargs in _broadcast(None):
            if name == "stop":
                return
            if name == "noop":
                continue
            try:
                getattr(manager, name)(*args, **kwargs)
            except Exception:  # rank 0 met the same failure and goes on serving; so do we
                log.exception("replaying %s failed", name)


def _broadcast(commands: list | None) -> list:
    payload = [commands]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]
