"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class RequestStats:
    num_llm_steps: int = 0  # LLM verification (or incremental) passes after prefill
    num_speculated: int = 0  # tree nodes proposed by the SSMs, root excluded
    num_accepted: int = 0  # speculated tokens the LLM kept
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens committed per LLM step: accepted speculated tokens plus the LLM's own one."""
        return (self.num_accepted + self.num_llm_steps) / self.num_llm_steps if self.num_llm_steps else 0.0


@dataclass(slots=True)
class Request:
    id: int
    prompt_tokens: list[int]
    max_sequence_length: int  # prompt + output
    sampling: GenerationConfig
    generator: torch.Generator | None
    prompt: str | None = None
    output_tokens: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    slot: int = -1
    stats: RequestStats = field(default_factory=RequestStats)
    _max_output: int = field(init=False, repr=False)  # output tokens allowed: by length and max_new_tokens
    _uniforms: list[float] = field(default_factory=list, repr=False)  # see position_uniforms

    def __post_init__(self) -> None:
        self._max_output = self.max_sequence_length - len(self.prompt_tokens)
        if self.sampling.max_new_tokens is not None:
            self._max_output = min(self._max_output, self.sampling.max_new_tokens)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.output_tokens

    @property
    def last_token(self) -> int:
        """The newest token: the next step's root (what `tokens[-1]` is, without building the list)."""
        return self.output_tokens[-1] if self.output_tokens else self.prompt_tokens[-1]

    @property
    def num_remaining(self) -> int:
        """How many more tokens this request may produce."""
        return self._max_output - len(self.output_tokens)

    def position_uniforms(self, count: int, ahead: int = 0) -> list[float]:
        """The uniforms that draw this (sampled) request's next `count` output tokens, after `ahead` more
        still on their way (a plain step in flight): the i-th output token is drawn at the generator's
        i-th uniform, however the steps that produce it fall (plain or speculative, any tree). A seed then
        gives the same tokens with or without speculation, and a step's draws at nodes of one depth may
        share a uniform: the walk visits one of them."""
        start = len(self.output_tokens) + ahead
        missing = start + count - len(self._uniforms)
        if missing > 0:
            self._uniforms.extend(torch.rand(missing, generator=self.generator).tolist())
        return self._uniforms[start : start + count]

    def append(self, new_tokens: list[int], eos_token_ids: list[int]) -> None:
        """Commit tokens, cut at the first EOS or the length budget, and finish if either is hit."""
        new_tokens = new_tokens[: self.num_remaining]
        for i, token in enumerate(new_tokens):
            if token in eos_token_ids:
                self.output_tokens.extend(new_tokens[: i + 1])
                self.finish_reason = "stop"
                break
        else:
            self.output_tokens.extend(new_tokens)
            if self.num_remaining <= 0:
                self.finish_reason = "length"
        if self.stats.first_token_time is None:
            self.stats.first_token_time = time.perf_counter()
        if self.finish_reason is not None:
            self.status = RequestStatus.FINISHED
            self.stats.finish_time = time.perf_counter()
