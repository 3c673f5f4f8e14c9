"""How much to draft, and for whom: the tree size that is expected to pay most at the batch size running now.

The engine may draft any tree of a nested ladder (`spec/tree_ladder.py`: 1, 3, 7, ... nodes up to the
whole tree) or nothing. A speculative step with the tree of n nodes costs `ratio(n)` plain steps (SSM
passes plus a wider verification); the ratio grows with n and with the batch as compute stops being free,
so it is measured per tree size and batch-size bucket (medians of recent steps). A request's `gain(n)` is
its tokens per step with that tree (a mean, then a moving average, drawn towards the average pooled
over all requests while it has few steps: one step commits anywhere from 1 token to the tree's depth,
so no verdict comes from fewer than MIN_SAMPLES steps); a plain step yields one token per request. One step drafts one tree size, for the requests whose gain there exceeds one; of all sizes
it takes the one with the most tokens per unit of time,

    (B + sum over S of (gain(n) - 1)) / ratio(n)   for a batch of B requests, S those drafting,

and a plain step (B tokens at ratio 1) where no size beats it, down to plain incremental decoding. Every
step with the tree of n nodes measures the gains of all smaller trees too, exactly under greedy
verification, since the smaller trees are parts of it. Larger trees are re-measured by probes: a request
whose best measured size is below the whole tree probes the next size up (one that runs plain steps at a small batch, the
size that pays most by the gains pooled over all requests, or a larger one that costs little more than the
cheapest size) after a back-off
that grows while probes keep failing (at batch sizes up to OPTIMISTIC_BATCH, only while the loss is beyond
what one standard error of the measured gain could explain). Probes fall on steps that are multiples of the back-off, so at a
large batch they share a few steps instead of each one making the whole batch pay. A draft that yields
less than half of what even the cheapest speculative step costs (a CPU verifying a tree of 20 tokens pays
about six plain steps for two tokens) goes straight to the longest back-off. Each batch size starts with
a plain step, so that the first speculative step is weighed against a measured plain one, and a size not
yet timed at a batch size is assumed to cost what the next smaller timed size costs, so it is tried once;
a plain step every REMEASURE_EVERY speculative ones keeps the plain time recent.
A new request starts from the gains and back-off measured on earlier ones. The choice never changes the
output: every tree, down to the bare root, is verified exactly.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

SMOOTHING = 0.1  # weight of the newest observation in a request's moving averages (a plain mean before): one
# step commits 1 to depth + 1 tokens, so a window of ~10 steps. At 0.3 (~3 steps), with the costs measured on
# an H200 at batch 1, a 1.4-token draft's estimate strayed below its 1.18-step cost often enough that 3 steps in
# 4 ran plain in simulation (a little over half at 0.1)
POOLED_SMOOTHING = 0.05  # the same for the averages pooled over all requests
MIN_SAMPLES = 4  # steps a new request drafts the whole tree before any verdict, while nothing is pooled yet
# (fewer where MIN_HOPELESS_SAMPLES timed steps show the whole tree losing even one standard error up)
PRIOR_WEIGHT = 4  # a request's own average counts as much as the pooled one after this many steps
FIRST_BACKOFF = 4  # steps before re-probing a draft that just failed to pay
BACKOFF_GROWTH = 4  # each further failed probe waits this many times longer ...
MAX_BACKOFF = 128  # ... up to this many steps (a useless draft then costs ~ ratio / 128)
REMEASURE_EVERY = 16  # a plain step this often while only speculative steps run: plain times taken only
# early in a batch's life made a CPU step of 1.39 plain steps look like 1.19 (batch 16), and a losing size win
FIRST_MEASURE_AFTER = 2  # speculative steps between the first timed plain steps at a batch size
STEP_WINDOW = 9  # recent step times kept per kind and batch-size bucket
MIN_PLAIN_SAMPLES = 3  # plain steps timed early at each batch size, so that one outlier cannot set the median
PROBE_MARGIN = 0.05  # a probe pays only this much above the size it would replace (noise: no flapping)
SPREAD = 0.8  # typical spread (standard deviation) of one step's committed tokens: how sure a measured gain is
OPTIMISTIC_BATCH = 2  # up to this batch size, a size that lost within one standard error is re-measured soon:
# a probe there costs the few requests that learn from it (at batch 16, the optimism cost 5% of plain speed)
CHEAP_PROBE = 0.25  # from plain steps at those batch sizes, a probe drafts the largest size within this
# share of the cheapest one's cost
HOPELESS = 0.5  # gain below this share of the cheapest speculative step's cost ratio: longest back-off at once
PLAIN_MARGIN = 0.05  # a plain choice is reused while no size came within this share of paying ...
PLAIN_REUSE = 8  # ... for at most this many steps (step times drift)
MIN_HOPELESS_SAMPLES = 2  # speculative steps timed before that verdict (the first may capture CUDA graphs)


@dataclass(slots=True)
class _Average:
    """A plain mean of the first 1 / floor values, then an exponential moving average: one step's
    tokens vary from 1 to the tree's depth, so the first values must not each set the estimate."""

    floor: float = SMOOTHING
    value: float = 0.0
    count: int = 0

    def add(self, x: float) -> None:
        self.count += 1
        self.value += max(1.0 / self.count, self.floor) * (x - self.value)


@dataclass(slots=True)
class _RequestState:
    gains: dict[int, _Average] = field(default_factory=dict)  # by tree size: tokens per step
    best: int | None = None  # the size it would draft alone, as of its last verdict (0: none; None: not yet)
    backoff: int = FIRST_BACKOFF
    next_probe: int = 0  # the step from which a probe may run


def _median_window() -> deque:
    return deque(maxlen=STEP_WINDOW)


@dataclass(slots=True)
class _StepTimes:
    """Recent step times at one batch-size bucket: plain ones and, per tree size, speculative ones.
    Medians, not averages: a step that captured a CUDA graph or grew an allocation can take a hundred
    times longer, once. They are kept until the next time is added: every step asks for them, for every
    size, and the controller's work sits between two device passes."""

    plain: deque = field(default_factory=_median_window)
    speculative: dict[int, deque] = field(default_factory=dict)
    steps_since_plain: int = 0
    _medians: dict[int, float | None] = field(default_factory=dict)  # by size, 0 for plain steps

    def add(self, size: int, seconds: float) -> None:
        """A step's time: `size` is the tree it drafted (0: a plain step)."""
        if size:
            self.speculative.setdefault(size, _median_window()).append(seconds)
            self.steps_since_plain += 1
        else:
            self.plain.append(seconds)
            self.steps_since_plain = 0
        self._medians.pop(size, None)

    def charge(self, size: int, seconds: float) -> None:
        """Add `seconds` to the latest step time of tree size `size` (one must be kept)."""
        self.speculative[size][-1] += seconds
        self._medians.pop(size, None)

    @property
    def plain_s(self) -> float | None:
        if 0 not in self._medians:
            self._medians[0] = statistics.median(self.plain) if self.plain else None
        return self._medians[0]

    def speculative_s(self, size: int) -> float | None:
        if size not in self._medians:
            times = self.speculative.get(size)
            # Below three samples a median is a mean, and one first-use stall would make the size look
            # hopeless for the long back-off that follows: take the fastest until there are three.
            self._medians[size] = None if not times else min(times) if len(times) < 3 else statistics.median(times)
        return self._medians[size]


@dataclass
class SpeculationController:
    sizes: tuple[int, ...] = (1,)  # the tree sizes it may draft (nested, ascending)
    fixed_cost_ratio: float | dict[int, float] | None = None  # fixes the ratios, or each size's (tests)
    requests: dict[int, _RequestState] = field(default_factory=dict)
    times: dict[int, _StepTimes] = field(default_factory=dict)  # by batch-size bucket
    prior_gains: dict[int, _Average] = field(default_factory=dict)  # by size, pooled over every request
    prior_backoff: int = FIRST_BACKOFF  # the back-off a new request starts with while drafts fail to pay
    step: int = 0
    gave_up_exploring: bool = False  # the whole tree was timed hopeless before MIN_SAMPLES steps of it
    # Ratios computed since the last recorded step time, by (bucket, size): medians are not cheap, and
    # each request's verdict asks for every size's ratio (at batch 64, most of the controller's time).
    _ratios: dict[tuple[int, int], float] = field(default_factory=dict)
    _nearest: dict[tuple[int, int], int | None] = field(default_factory=dict)  # (bucket, size) -> timed bucket
    # Per size, each request's gain, those above one and the sum of what they add, for the request ids and
    # the count of recorded drafts they were computed at: gains change only when a draft is recorded, so
    # steps that stay plain (where nothing pays) reuse them instead of recomputing batch x sizes gains.
    _records: int = 0
    _gains_key: tuple | None = None
    _gains: dict[int, tuple[dict[int, float], set[int], float]] = field(default_factory=dict)
    # A plain choice that holds, for the request ids and draft count of `_plain_key`, until step
    # `_plain_until` (see choose).
    _plain_key: tuple | None = None
    _plain_until: int = 0

    def cost_ratio(self, batch_size: int, size: int | None = None) -> float:
        """Cost of a speculative step with the tree of `size` nodes (default: the whole tree) in plain
        steps at this batch size: measured here, else at the nearest measured batch size, else the next
        smaller size's (1.0 when nothing is measured): an optimistic guess, so the size gets tried."""
        size = self.sizes[-1] if size is None else size
        key = (_bucket(batch_size), size)
        if key not in self._ratios:
            self._ratios[key] = self._cost_ratio(batch_size, size)
        return self._ratios[key]

    def _cost_ratio(self, batch_size: int, size: int) -> float:
        if self.fixed_cost_ratio is not None:
            fixed = self.fixed_cost_ratio
            return fixed[size] if isinstance(fixed, dict) else fixed
        bucket = _bucket(batch_size)
        key = (bucket, size)
        if key not in self._nearest:  # which buckets have timed a size changes rarely; the times, every step
            measured = [b for b, t in self.times.items() if t.plain and size in t.speculative]
            # Ties: the larger batch, the costlier.
            self._nearest[key] = min(measured, key=lambda b: (abs(b - bucket), -b)) if measured else None
        nearest = self._nearest[key]
        if nearest is not None:
            t = self.times[nearest]
            seconds = t.speculative_s(size)
            # A nested tree costs no more than a larger one: one stalled step of a size barely timed (on an
            # H200, 5.7 ms for a 31-node tree whose steps then took 1.9) must not price it above a larger
            # size's settled median, and send the request to plain steps.
            settled = [t.speculative_s(s) for s in self.sizes if s > size and len(t.speculative.get(s, ())) >= 3]
            return min([seconds] + settled) / t.plain_s
        smaller = [s for s in self.sizes if s < size]
        return self.cost_ratio(batch_size, smaller[-1]) if smaller else 1.0

    def choose(self, request_ids: list[int]) -> tuple[int, set[int]]:
        """The tree size this step drafts and the requests that draft it ((0, empty): a plain step)."""
        self.step += 1
        batch = len(request_ids)
        times = self._times_at(batch)
        if self.fixed_cost_ratio is None and (not times.plain or times.steps_since_plain >= (
            FIRST_MEASURE_AFTER if len(times.plain) < MIN_PLAIN_SAMPLES else REMEASURE_EVERY
        )):
            return 0, set()
        key = (tuple(request_ids), self._records)
        if key == self._plain_key and self.step < self._plain_until:
            return 0, set()  # nothing pays and no probe is due: a plain step, as the last one was
        states = {rid: self._state(rid) for rid in request_ids}
        full = self.sizes[-1]
        # While neither it nor earlier requests have measured enough, a request drafts the whole tree,
        # which measures every size at once (unless two timed steps already showed it hopeless).
        pooled = self.prior_gains.get(full)
        unmeasured = set() if pooled is not None and pooled.count >= MIN_SAMPLES else {
            rid for rid, s in states.items() if self._exploring(s)}
        best_size, best_rate, best_set = 0, float(batch), set()
        best_rate_spec = 0.0  # the best speculative size's rate, paying or not
        gains = self._gains_of(states)
        for size in self.sizes:
            _, useful, extra = gains[size]
            rate = (batch + extra) / self.cost_ratio(batch, size)
            best_rate_spec = max(best_rate_spec, rate)
            if rate > best_rate:
                best_size, best_rate, best_set = size, rate, useful
        probes = {rid: self._probe_size(s, batch) for rid, s in states.items()
                  if rid not in unmeasured and self.step >= s.next_probe and self.step % s.backoff == 0}
        probes = {rid: size for rid, size in probes.items() if size and (size > best_size or rid not in best_set)}
        size = max([best_size, *probes.values()] + ([full] if unmeasured else []))
        if size == 0:
            self._plain_key, self._plain_until = None, 0
            if best_rate_spec * (1 + PLAIN_MARGIN) < batch and not unmeasured:
                # Until a request's gains change (a draft is recorded) or a probe falls due, only the step
                # times can change this choice, and not by the margin within a few steps: the next steps
                # skip the weighing (at batch 64 it was most of a plain step's extra host time).
                self._plain_key = key
                self._plain_until = min([self.step + PLAIN_REUSE] + [self._next_probe_step(s) for s in states.values()])
            return 0, set()
        chosen = best_set | set(probes) | unmeasured
        if size != best_size:  # a probe or a newcomer makes the step larger: those it pays for join in
            chosen |= gains[size][1]
        return size, chosen

    def _gains_of(self, states: dict[int, "_RequestState"]) -> dict[int, tuple[dict[int, float], set[int], float]]:
        """Per size: each request's gain, the requests it pays for (gain above one), and their gains' sum
        above one each."""
        key = (tuple(states), self._records)
        if key != self._gains_key:
            self._gains_key, self._gains = key, {}
            for size in self.sizes:
                gains = {rid: self._gain(s, size) for rid, s in states.items()}
                useful = {rid for rid, gain in gains.items() if gain > 1.0}
                self._gains[size] = (gains, useful, sum(gains[rid] - 1.0 for rid in useful))
        return self._gains

    def record_request(self, request_id: int, tokens: dict[int, int], batch_size: int = 1) -> None:
        """After a speculative step of this request: the tokens it committed, and those each smaller tree
        would have committed, by tree size."""
        state = self._state(request_id)
        self._records += 1
        for size, count in tokens.items():
            # (get before setdefault: a default built on every call costs more than the update itself)
            own, pooled = state.gains.get(size), self.prior_gains.get(size)
            (own or state.gains.setdefault(size, _Average())).add(count)
            (pooled or self.prior_gains.setdefault(size, _Average(POOLED_SMOOTHING))).add(count)
        if self._exploring(state):
            if not self._whole_tree_hopeless(state, batch_size):
                return
            # Stop drafting the whole tree before MIN_SAMPLES steps of it: even one standard error up it
            # loses to plain steps. Smaller trees, measured by the same steps, are probed as after a failed
            # probe (a verdict now would rest on their guessed costs and on two steps' tokens).
            # Later requests start from the pooled gains instead of exploring it again.
            state.best, self.gave_up_exploring = 0, True
            state.next_probe = self.step + state.backoff
            state.backoff = min(BACKOFF_GROWTH * state.backoff, MAX_BACKOFF)
            self.prior_backoff = max(self.prior_backoff, state.backoff)
            return
        ran = max(tokens)
        best = self._best_size(state, batch_size)
        # No larger than it needs, judged with today's costs (the last verdict may have been made on a
        # guessed cost, and a size that then looked best keeps being probed unless it is judged again).
        if state.best is not None and ran <= min(state.best, best):
            state.best = best
            return
        before = state.best
        state.best = best  # after a probe, or a step larger than it needed
        paid = before is None or self._rate(state, ran, batch_size) >= (1 + PROBE_MARGIN) * self._rate(
            state, before, batch_size)
        if state.best == ran and paid:  # the larger tree paid, clearly: try the next one up soon
            state.backoff = self.prior_backoff = FIRST_BACKOFF
            state.next_probe = self.step + state.backoff
            return
        if batch_size <= OPTIMISTIC_BATCH and any(
            self._optimistic_rate(state, size, batch_size) > max(1.0, self._rate(state, state.best, batch_size))
            for size in tokens if size != state.best
        ):  # a size that lost may still pay within what a few steps can tell: measure again soon
            state.backoff = FIRST_BACKOFF
            state.next_probe = self.step + state.backoff
            return
        cheapest = self._cheapest_ratio(batch_size)
        if state.best == 0 and cheapest is not None and self._gain(state, self.sizes[-1]) < HOPELESS * cheapest:
            state.backoff = MAX_BACKOFF
        state.next_probe = self.step + state.backoff
        state.backoff = min(BACKOFF_GROWTH * state.backoff, MAX_BACKOFF)
        self.prior_backoff = max(self.prior_backoff, state.backoff)

    def record_step(self, seconds: float, batch_size: int, size: int) -> None:
        """A step's time: `size` is the tree it drafted (0: a plain step)."""
        self._ratios.clear()
        times = self._times_at(batch_size)
        if not (times.plain if size == 0 else size in times.speculative):
            self._nearest.clear()  # a first time of its kind at this bucket: the nearest timed buckets move
        times.add(size, seconds)

    def record_refill(self, seconds: float, batch_size: int, size: int) -> None:
        """The time of a plain step queued straight after a speculative one with the tree of `size`
        nodes, where plain steps go in flight (engine/in_flight.py): nothing was queued ahead of it, so
        it takes longer than a plain step chained behind another. The excess over the plain median is
        charged to that speculative step (switching to a tree and back costs it, not plain decoding);
        the plain times stay those of chained steps. Without a plain or speculative time to charge, it
        counts as a plain step."""
        times = self._times_at(batch_size)
        if times.plain_s is None or not times.speculative.get(size):
            self.record_step(seconds, batch_size, 0)
            return
        self._ratios.clear()
        times.charge(size, max(0.0, seconds - times.plain_s))

    def forget(self, request_id: int) -> None:
        self.requests.pop(request_id, None)

    # --- helpers -----------------------------------------------------------------------------------

    def _times_at(self, batch_size: int) -> _StepTimes:
        bucket = _bucket(batch_size)
        times = self.times.get(bucket)  # (not setdefault: a default built on every call costs a few us)
        if times is None:
            times = self.times[bucket] = _StepTimes()
        return times

    def _next_probe_step(self, state: _RequestState) -> int:
        """The first step after this one at which the request may probe (steps that are multiples of its
        back-off, from its next_probe on)."""
        first = max(state.next_probe, self.step + 1)
        return -(-first // state.backoff) * state.backoff

    def _gain(self, state: _RequestState, size: int) -> float:
        """Tokens per step with this tree: the request's own average, drawn towards the pooled one while it
        has few steps; where neither has measured the size, the largest smaller tree's (a nested tree
        commits no less), else one."""
        own, pooled = state.gains.get(size), self.prior_gains.get(size)
        if own is None and pooled is None:
            smaller = [s for s in self.sizes if s < size]
            return self._gain(state, smaller[-1]) if smaller else 1.0
        if pooled is None:
            return own.value
        if own is None:
            return pooled.value
        weight = own.count / (own.count + PRIOR_WEIGHT)
        return weight * own.value + (1 - weight) * pooled.value

    def _exploring(self, state: _RequestState) -> bool:
        full = self.sizes[-1]
        return not self.gave_up_exploring and all(
            a is None or a.count < MIN_SAMPLES for a in (state.gains.get(full), self.prior_gains.get(full)))

    def _whole_tree_hopeless(self, state: _RequestState, batch_size: int) -> bool:
        """The whole tree, timed MIN_HOPELESS_SAMPLES times at this batch size, loses to plain steps even
        with the request's gain one standard error higher. On a CPU a 20-node step costs about four plain
        ones, and four exploring steps on a prompt whose drafts rarely hold cost more than the request
        gains (the README's main command, one fresh request: 0.86x)."""
        full = self.sizes[-1]
        own = state.gains.get(full)
        if own is None or own.count < MIN_HOPELESS_SAMPLES:
            return False
        if self.fixed_cost_ratio is None:
            t = self.times.get(_bucket(batch_size))
            if t is None or not t.plain or len(t.speculative.get(full, ())) < MIN_HOPELESS_SAMPLES:
                return False
        return self._optimistic_rate(state, full, batch_size) < 1.0

    def _measured_sizes(self, state: _RequestState) -> list[int]:
        return [size for size in self.sizes if size in state.gains or size in self.prior_gains]

    def _rate(self, state: _RequestState, size: int, batch_size: int) -> float:
        """Tokens per plain step's time with this tree (size 0: plain steps, 1)."""
        return self._gain(state, size) / self.cost_ratio(batch_size, size) if size else 1.0

    def _optimistic_rate(self, state: _RequestState, size: int, batch_size: int) -> float:
        """`_rate` with the gain one standard error higher: the steps measured so far (the request's own,
        or as many pooled ones as the pooled average remembers, which hold its own) cannot rule out this much."""
        own, pooled = state.gains.get(size), self.prior_gains.get(size)
        # The pooled average holds the request's own steps too: they are not counted twice.
        samples = max(own.count if own else 0, min(pooled.count if pooled else 0, round(1 / POOLED_SMOOTHING)))
        return (self._gain(state, size) + SPREAD / math.sqrt(max(samples, 1))) / self.cost_ratio(batch_size, size)

    def _best_size(self, state: _RequestState, batch_size: int) -> int:
        """The size this request alone would draft (0: none), among those measured for it or pooled."""
        rates = {size: self._gain(state, size) / self.cost_ratio(batch_size, size)
                 for size in self._measured_sizes(state)}
        best = max(rates, key=lambda size: (rates[size], -size), default=0)
        return best if best and rates[best] > 1.0 else 0

    def _probe_size(self, state: _RequestState, batch_size: int) -> int:
        """The size a probe of this request tries: one above its best (0 where it drafts the whole tree);
        from plain steps at batch sizes up to OPTIMISTIC_BATCH, the size that pays most for the average
        request (by the pooled gains) where one does, or the largest that costs within CHEAP_PROBE of the
        cheapest size, if larger. (At larger batches the whole batch pays for a probe:
        in the one H200 run with the pooled best probed at every batch size, 36 of 127 steps at batch 16
        drafted 3 nodes at 1.7 plain steps each for about 1.5 tokens per request, 0.80x; there probes stay
        one size up, as before.) A request whose drafts failed for a while (an answer's opening, a stretch of numbers) then
        re-tests the tree that pays for its peers, which measures every smaller size too, instead of
        climbing back one size per back-off from the 1-node tree, whose probes rarely pay at a step's fixed
        cost (batch 1 on an H200: 35 plain steps of a 128-token request)."""
        best = self._best_size(state, batch_size)
        larger = [s for s in self.sizes if s > best]
        if not larger:
            return 0
        if best == 0 and batch_size <= OPTIMISTIC_BATCH:  # larger batches: every request pays for the probe
            peers = _RequestState()  # no own gains: the pooled ones alone
            pooled = self._best_size(peers, batch_size)
            # That, or a larger size that costs little more than the cheapest one, as it measures every
            # smaller size too. On a GPU a step's cost is mostly fixed (an H200 at batch
            # 1: 1.6 plain steps for 1 node, 1.9 for 64), and probing the 1-node tree alone left the larger
            # trees' first, unlucky estimates standing for good (in simulation 9 of 40 batch-1 runs went
            # plain, 0.98x, where the trees pay 1.3x); on a CPU, where each node costs, the smallest.
            ratios = {size: self.cost_ratio(batch_size, size) for size in self.sizes}
            cheap = [size for size in self.sizes if ratios[size] <= (1 + CHEAP_PROBE) * min(ratios.values())]
            return max(pooled, cheap[-1])
        return larger[0]

    def _cheapest_ratio(self, batch_size: int) -> float | None:
        """The cost ratio of the cheapest speculative step timed at this batch size (None: too few timed)."""
        if self.fixed_cost_ratio is not None:
            return min(self.cost_ratio(batch_size, size) for size in self.sizes)
        t = self.times.get(_bucket(batch_size))
        timed = [min(times) for times in t.speculative.values() if len(times) >= MIN_HOPELESS_SAMPLES] if t else []
        if t is None or t.plain_s is None or not timed:
            return None
        return min(timed) / t.plain_s

    def _state(self, request_id: int) -> _RequestState:
        state = self.requests.get(request_id)
        if state is None:
            # Start from what earlier requests measured, their verdict and their back-off: probes of a new
            # batch then fall on the same few steps as the old ones' instead of all coming early.
            state = self.requests[request_id] = _RequestState()
            if not self._exploring(state):
                state.best = self._best_size(state, 1)
                state.backoff = self.prior_backoff
                state.next_probe = self.step + state.backoff
        return state


def _bucket(batch_size: int) -> int:
    """1, 2, 3-4, 5-8, ... map to 0, 1, 2, 3, ...: step costs change little within a power of two."""
    return max(batch_size - 1, 0).bit_length()
