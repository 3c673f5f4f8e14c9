"""When to speculate, and for whom: only where it is expected to pay, at the batch size running now.

A speculative step costs `ratio` plain steps (SSM passes plus a wider verification), and the ratio
grows with the batch as compute stops being free, so it is measured per batch-size bucket (medians of
recent steps of both kinds). A request's `gain` is its tokens per speculative step (an exponential
moving average); a plain step yields one token per request. Speculating for the set S in a batch of B
requests pays when

    sum over S of (gain - 1)  >  (ratio - 1) * B,

which for one request is gain > ratio. Where it does not pay the whole batch runs plain steps, down to
plain incremental decoding. Drafts that do not pay are probed again after a back-off that grows while
probes keep failing; probes fall on steps that are multiples of the back-off, so at a large batch they
share a few speculative steps instead of each one making the whole batch pay. A draft that yields less
than half of what even the cheapest speculative step seen costs (a CPU verifying a tree of 20 tokens pays
about six plain steps for two tokens) goes straight to the longest back-off: a probe re-measures the
draft's acceptance, which does not triple. Each batch size starts with a plain step, so the first
speculative step is already weighed against a measured plain one. A new request starts from
the gain and back-off measured on earlier ones. The choice never changes the output: every tree, down
to the bare root, is verified exactly.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

SMOOTHING = 0.3  # weight of the newest observation in the moving averages
FIRST_BACKOFF = 4  # steps before re-probing a draft that just failed to pay
BACKOFF_GROWTH = 4  # each further failed probe waits this many times longer ...
MAX_BACKOFF = 128  # ... up to this many steps (a useless draft then costs ~ ratio / 128)
REMEASURE_EVERY = 64  # a plain step this often while only speculative steps run, to keep the ratio honest
FIRST_MEASURE_AFTER = 2  # speculative steps between the first timed plain steps at a batch size
STEP_WINDOW = 9  # recent step times kept per kind and batch-size bucket
MIN_PLAIN_SAMPLES = 3  # plain steps timed early at each batch size, so that one outlier cannot set the median
HOPELESS = 0.5  # gain below this share of the cheapest speculative step's cost ratio: longest back-off at once
MIN_HOPELESS_SAMPLES = 2  # speculative steps timed before that verdict (the first may capture CUDA graphs)


@dataclass(slots=True)
class _RequestState:
    gain: float | None = None  # tokens per speculative step (None: not yet measured)
    backoff: int = FIRST_BACKOFF
    next_probe: int = 0  # the step from which a probe may run


@dataclass(slots=True)
class _StepTimes:
    """Recent step times of each kind at one batch-size bucket. Medians, not averages: a step that
    captured a CUDA graph or grew an allocation can take a hundred times longer, once."""

    plain: deque = field(default_factory=lambda: deque(maxlen=STEP_WINDOW))
    speculative: deque = field(default_factory=lambda: deque(maxlen=STEP_WINDOW))
    steps_since_plain: int = 0

    @property
    def plain_s(self) -> float | None:
        return statistics.median(self.plain) if self.plain else None

    @property
    def speculative_s(self) -> float | None:
        # Below three samples a median is a mean, and one first-use stall would make speculation look
        # hopeless for the long back-off that follows: take the fastest until there are three.
        if len(self.speculative) < 3:
            return min(self.speculative, default=None)
        return statistics.median(self.speculative)


@dataclass
class SpeculationController:
    fixed_cost_ratio: float | None = None  # fixes the ratio (tests); None measures it
    requests: dict[int, _RequestState] = field(default_factory=dict)
    times: dict[int, _StepTimes] = field(default_factory=dict)  # by batch-size bucket
    prior_gain: float | None = None  # pooled over every request's speculative steps
    prior_backoff: int = FIRST_BACKOFF  # the back-off a new request starts with while drafts fail to pay
    step: int = 0

    def cost_ratio(self, batch_size: int) -> float:
        """Cost of a speculative step in plain steps at this batch size (1.0, optimistic, until measured)."""
        if self.fixed_cost_ratio is not None:
            return self.fixed_cost_ratio
        bucket = _bucket(batch_size)
        measured = [b for b, t in self.times.items() if t.plain_s is not None and t.speculative_s is not None]
        if not measured:
            return 1.0
        nearest = min(measured, key=lambda b: (abs(b - bucket), -b))  # ties: the larger batch, the costlier
        t = self.times[nearest]
        return t.speculative_s / t.plain_s

    def choose(self, request_ids: list[int]) -> set[int]:
        """The requests that speculate in this step (empty: a plain step for the whole batch)."""
        self.step += 1
        batch = len(request_ids)
        times = self.times.setdefault(_bucket(batch), _StepTimes())
        if self.fixed_cost_ratio is None and (not times.plain or times.steps_since_plain >= (
            FIRST_MEASURE_AFTER if len(times.plain) < MIN_PLAIN_SAMPLES else REMEASURE_EVERY
        )):
            return set()
        ratio = self.cost_ratio(batch)
        states = {rid: self._state(rid) for rid in request_ids}
        unmeasured = {rid for rid, s in states.items() if s.gain is None}
        useful = {rid for rid, s in states.items() if s.gain is not None and s.gain > 1.0}
        chosen = set(unmeasured)
        if useful and sum(states[rid].gain - 1.0 for rid in useful) > (ratio - 1.0) * batch:
            chosen |= useful
        chosen |= {rid for rid, s in states.items() if self.step >= s.next_probe and self.step % s.backoff == 0}
        return chosen

    def record_request(self, request_id: int, tokens: int, batch_size: int = 1) -> None:
        """After a speculative step of this request that committed `tokens` tokens."""
        state = self._state(request_id)
        state.gain = _ema(state.gain, tokens)
        self.prior_gain = _ema(self.prior_gain, tokens)
        if state.gain > self.cost_ratio(batch_size):  # pays even alone: keep it going
            state.backoff = self.prior_backoff = FIRST_BACKOFF
            state.next_probe = self.step
        else:
            cheapest = self._cheapest_ratio(batch_size)
            if cheapest is not None and state.gain < HOPELESS * cheapest:
                state.backoff = MAX_BACKOFF
            state.next_probe = self.step + state.backoff
            state.backoff = min(BACKOFF_GROWTH * state.backoff, MAX_BACKOFF)
            self.prior_backoff = max(self.prior_backoff, state.backoff)

    def _cheapest_ratio(self, batch_size: int) -> float | None:
        """The cost ratio of the cheapest speculative step timed at this batch size (None: too few timed)."""
        if self.fixed_cost_ratio is not None:
            return self.fixed_cost_ratio
        t = self.times.get(_bucket(batch_size))
        if t is None or t.plain_s is None or len(t.speculative) < MIN_HOPELESS_SAMPLES:
            return None
        return min(t.speculative) / t.plain_s

    def record_step(self, seconds: float, batch_size: int, speculative: bool) -> None:
        t = self.times.setdefault(_bucket(batch_size), _StepTimes())
        if speculative:
            t.speculative.append(seconds)
            t.steps_since_plain += 1
        else:
            t.plain.append(seconds)
            t.steps_since_plain = 0

    def forget(self, request_id: int) -> None:
        self.requests.pop(request_id, None)

    def _state(self, request_id: int) -> _RequestState:
        state = self.requests.get(request_id)
        if state is None:
            # Start from what earlier requests measured; if that does not pay, wait for an aligned probe.
            state = self.requests[request_id] = _RequestState(gain=self.prior_gain)
            if self.prior_gain is not None and self.prior_gain <= self.cost_ratio(1):
                state.backoff = self.prior_backoff
                state.next_probe = self.step + state.backoff
        return state


def _bucket(batch_size: int) -> int:
    """1, 2, 3-4, 5-8, ... map to 0, 1, 2, 3, ...: step costs change little within a power of two."""
    return max(batch_size - 1, 0).bit_length()


def _ema(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value
