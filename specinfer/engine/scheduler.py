"""Who runs this step. Plain Python: hands out cache slots, never touches tensors."""

from __future__ import annotations

from collections import deque

from .sequence import Request, RequestStatus


class Scheduler:
    def __init__(self, max_batch_size: int) -> None:
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_slots = list(range(max_batch_size - 1, -1, -1))

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots (first come, first served); returns those admitted."""
        admitted = []
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
        return admitted

    def retire_finished(self) -> list[Request]:
        """Drop finished requests from the batch and free their slots; returns them."""
        finished = [r for r in self.running if r.status is RequestStatus.FINISHED]
        for request in finished:
            self.free_slots.append(request.slot)
        self.running = [r for r in self.running if r.status is not RequestStatus.FINISHED]
        return finished

    def remove(self, request: Request) -> None:
        """Take a request out of the queue or the batch (a cancelled one), freeing its slot."""
        # By identity: requests are dataclasses, whose == compares every field.
        if any(r is request for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r is not request)
        elif any(r is request for r in self.running):
            self.running = [r for r in self.running if r is not request]
            self.free_slots.append(request.slot)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
