"""When to speculate: only where it is expected to pay.

A speculative step costs `cost_ratio` plain steps (SSM passes plus a wider verification) and yields a
request's expected tokens per speculative step, `gain`; a plain step yields one token. Speculating pays
when gain > cost_ratio. Both are measured as the engine runs (exponential moving averages). A request
whose draft does not pay sits out, and is probed again after a back-off that grows while probes keep
failing, so a useless draft costs a few per cent instead of a multiple. The choice never changes the
output: every tree, down to the bare root, is verified exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

SMOOTHING = 0.3  # weight of the newest observation in the moving averages
FIRST_BACKOFF = 4  # plain steps before re-probing a draft that just failed to pay
BACKOFF_GROWTH = 4  # each further failed probe waits this many times longer ...
MAX_BACKOFF = 128  # ... up to this many plain steps (a useless draft then costs ~ cost_ratio / 128)


@dataclass(slots=True)
class _RequestState:
    gain: float | None = None  # tokens per speculative step (None: not yet measured)
    wait: int = 0  # plain steps left before the next probe
    backoff: int = FIRST_BACKOFF


class SpeculationController:
    def __init__(self, cost_ratio: float | None = None) -> None:
        """`cost_ratio` fixes the cost of a speculative step in plain steps (tests); None measures it."""
        self.fixed_cost_ratio = cost_ratio
        self.plain_step_s: float | None = None
        self.speculative_step_s: float | None = None
        self.requests: dict[int, _RequestState] = {}

    @property
    def cost_ratio(self) -> float:
        if self.fixed_cost_ratio is not None:
            return self.fixed_cost_ratio
        if self.plain_step_s is None or self.speculative_step_s is None:
            return 1.0  # optimistic until both kinds of step have been timed
        return self.speculative_step_s / self.plain_step_s

    def should_speculate(self, request_id: int) -> bool:
        state = self.requests.setdefault(request_id, _RequestState())
        if state.gain is None or state.gain > self.cost_ratio:
            return True
        if state.wait > 0:
            state.wait -= 1
            return False
        return True  # probe: the draft may do better on this part of the text

    def record_request(self, request_id: int, tokens: int) -> None:
        """After a speculative step of this request that committed `tokens` tokens."""
        state = self.requests.setdefault(request_id, _RequestState())
        state.gain = tokens if state.gain is None else (1 - SMOOTHING) * state.gain + SMOOTHING * tokens
        if state.gain > self.cost_ratio:
            state.backoff = FIRST_BACKOFF
        else:
            state.wait = state.backoff
            state.backoff = min(BACKOFF_GROWTH * state.backoff, MAX_BACKOFF)

    def record_step(self, seconds: float, speculative: bool) -> None:
        if speculative:
            self.speculative_step_s = _ema(self.speculative_step_s, seconds)
        else:
            self.plain_step_s = _ema(self.plain_step_s, seconds)

    def forget(self, request_id: int) -> None:
        self.requests.pop(request_id, None)


def _ema(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value
