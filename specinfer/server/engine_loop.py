"""The one place the engine runs: a thread that steps the request manager while there is work.

The HTTP layer (asyncio) never touches the manager. It submits requests and cancellations through a
thread-safe inbox, and the engine thread posts each request's progress back into an asyncio queue with
`call_soon_threadsafe`. Between two steps the thread admits new requests, applies cancellations and stop
strings, so requests join and leave the running batch continuously.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field

from ..config import GenerationConfig
from ..engine.request_manager import RequestManager
from ..engine.sequence import RequestStatus
from ..errors import SpecInferError
from ..tokenizer import Tokenizer
from .metrics import Metrics
from .text_stream import TextStream

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The batch and the queue are full; the client should retry later."""


class ShuttingDown(Exception):
    """The server is draining and takes no new requests."""


@dataclass(slots=True)
class Event:
    """Progress of one choice: new text, and at the end the finish reason and token counts."""

    index: int  # the choice this event belongs to
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # the tokens this event adds
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class Submission:
    index: int
    prompt_tokens: list[int]
    sampling: GenerationConfig
    stop: list[str]
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    key: int = field(default_factory=itertools.count().__next__)  # ours, before the manager gives an id


@dataclass(slots=True)
class _Live:
    """A submission the manager is serving."""

    submission: Submission
    request_id: int
    text: TextStream
    num_sent_tokens: int = 0


class EngineLoop:
    def __init__(self, manager: RequestManager, tokenizer: Tokenizer, max_queued: int, metrics: Metrics) -> None:
        """`manager`: the request manager, or under tensor parallelism its rank-0 `LockstepManager`."""
        self.manager = manager
        self.tokenizer = tokenizer
        self.metrics = metrics
        # Requests accepted but not finished may be at most a full batch plus the queue bound.
        self.capacity = manager.engine.max_batch_size + max_queued
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._draining = False
        self._stopped = threading.Event()
        self._live: dict[int, _Live] = {}  # by submission key
        self._thread = threading.Thread(target=self._run, name="specinfer-engine", daemon=True)

    # --- called from the HTTP side ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, submissions: list[Submission]) -> None:
        """Queue all choices of one HTTP request, or none of them (Overloaded / ShuttingDown)."""
        with self._lock:
            if self._draining:
                raise ShuttingDown()
            if self._outstanding + len(submissions) > self.capacity:
                raise Overloaded()
            self._outstanding += len(submissions)
        for s in submissions:
            self._inbox.put(("add", s))
        self._wakeup.set()

    def cancel(self, submissions: list[Submission]) -> None:
        """The client went away: stop these choices and free their cache (no-op for finished ones)."""
        for s in submissions:
            self._inbox.put(("cancel", s))
        self._wakeup.set()

    def drain(self) -> None:
        """Take no new requests; the thread keeps serving those accepted."""
        with self._lock:
            self._draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish the requests in flight, then end the thread."""
        self.drain()
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # --- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        # Under tensor parallelism the manager mirrors itself to the other ranks (distributed/lockstep.py).
        idle, close = getattr(self.manager, "idle", None), getattr(self.manager, "close", None)
        while True:
            self._take_inbox()
            if not self.manager.has_work():
                if self._stopped.is_set() and self._inbox.empty():
                    if close is not None:
                        close()
                    return
                if idle is not None:
                    idle()
                self._wakeup.wait(0.05)
                self._wakeup.clear()
                continue
            try:
                self.manager.step()
            except Exception as err:  # a bug or an out-of-memory: fail the batch, keep serving
                log.exception("engine step failed; failing the requests in it")
                for live in list(self._live.values()):
                    try:
                        self._abort(live, "error", f"internal error: {err}")
                    except Exception:  # the manager's state is beyond repair for this one; still answer
                        self._live.pop(live.submission.key, None)
                        self._finish_outstanding()
                        self._post(live.submission, Event(live.submission.index, finish_reason="error",
                                                          error=f"internal error: {err}"))
                continue
            self._publish()

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, submission = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(submission)
            else:
                live = self._live.get(submission.key)
                if live is not None:
                    self._abort(live, "cancelled")
                    self.metrics.requests.labels(outcome="cancelled").inc()

    def _add(self, s: Submission) -> None:
        prompt_len = len(s.prompt_tokens)
        try:
            request_id = self.manager.register_new_request(
                s.prompt_tokens, prompt_len + s.sampling.max_new_tokens, s.sampling
            )
        except Exception as err:  # checked on the HTTP side already; kept so nothing is ever lost
            if not isinstance(err, SpecInferError):
                log.exception("could not register a request")
            self._finish_outstanding()
            self._post(s, Event(s.index, finish_reason="error", error=str(err), prompt_tokens=prompt_len))
            return
        self._live[s.key] = _Live(s, request_id, TextStream(self.tokenizer, s.stop))
        self.metrics.prompt_tokens.inc(prompt_len)

    def _publish(self) -> None:
        """Send each live request's new text; retire those finished or stopped by a stop string."""
        for live in list(self._live.values()):
            request = self.manager.requests[live.request_id]
            tokens = request.output_tokens
            finished = request.status is RequestStatus.FINISHED
            if len(tokens) == live.num_sent_tokens and not finished:
                continue
            text = live.text.push(tokens, final=finished)
            new_ids = tokens[live.num_sent_tokens :]
            live.num_sent_tokens = len(tokens)
            if live.text.stopped and not finished:
                request = self.manager.abort_request(live.request_id, reason="stop")
                finished = True
            elif finished:
                request = self.manager.pop_request(live.request_id)
            if not finished:
                if text or new_ids:
                    self._post(live.submission, Event(live.submission.index, text, new_ids))
                continue
            del self._live[live.submission.key]
            self._finish_outstanding()
            self.metrics.record_finished(request)
            self._post(live.submission, Event(
                live.submission.index, text, new_ids, finish_reason=request.finish_reason,
                prompt_tokens=len(request.prompt_tokens), completion_tokens=len(request.output_tokens),
            ))
        self.metrics.queue_length.set(len(self.manager.scheduler.waiting))
        self.metrics.batch_size.set(len(self.manager.scheduler.running))

    def _abort(self, live: _Live, reason: str, error: str | None = None) -> None:
        request = self.manager.abort_request(live.request_id, reason=reason)
        del self._live[live.submission.key]
        self._finish_outstanding()
        self._post(live.submission, Event(
            live.submission.index, finish_reason=reason, error=error,
            prompt_tokens=len(request.prompt_tokens), completion_tokens=len(request.output_tokens),
        ))

    def _finish_outstanding(self) -> None:
        with self._lock:
            self._outstanding -= 1

    @staticmethod
    def _post(s: Submission, event: Event) -> None:
        try:
            s.loop.call_soon_threadsafe(s.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the client is gone
            pass
