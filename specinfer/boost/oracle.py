"""Acceptance of greedy tree speculation measured without the LLM: the LLM's recorded answer is the oracle.

Greedy verification keeps the longest path of the tree whose every token is the LLM's argmax after the
path before it, plus the LLM's own next token. When the LLM's greedy answer to a prompt is already known
(boost-tuning records it), the argmax after any prefix of that answer is simply the answer's next
token, and a path that leaves the answer is never descended. So an "LLM" that answers at every position
with the recorded answer's next token accepts exactly what the real LLM would, and the engine can run
the SSMs, draft, merge and verify as usual while the LLM's pass costs nothing. That makes wide trees
cheap to evaluate on a CPU. The identity with the real LLM holds up to rounding (greedy outputs being
the incremental ones); `tests/test_boost.py` checks it on a small model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import EngineConfig, GenerationConfig, SpeculationConfig
from ..engine.request_manager import RequestManager
from ..models.config import ModelConfig
from .data import Example


class AnswerOracle(nn.Module):
    """Stands in for the LLM of the request being served (one at a time): at position p its logits pick
    `answer[p + 1]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # A one-layer, one-head cache of width one: the engine allocates one, nothing reads it.
        self.config = dataclasses.replace(config, num_layers=1, num_kv_heads=1, head_dim=1)
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # device and dtype for the engine
        self.answer = torch.zeros(1, dtype=torch.long)

    def forward(self, tokens: torch.Tensor, cache, meta) -> torch.Tensor:
        return meta.positions.to(torch.float32)[..., None]  # [B, T, 1]: the position is all it needs

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        following = (hidden[:, 0].long() + 1).clamp(max=len(self.answer) - 1)
        logits = torch.zeros(hidden.shape[0], self.config.vocab_size, device=hidden.device)
        logits[torch.arange(hidden.shape[0], device=hidden.device), self.answer[following]] = 1.0
        return logits


@torch.no_grad()
def oracle_tokens_per_step(llm_config: ModelConfig, ssms: list[nn.Module], examples: list[Example],
                           expansion: tuple[int, ...], max_new_tokens: int,
                           tree: tuple[tuple[int, ...], ...] | None = None) -> float:
    """Mean tokens per LLM step (accepted plus the LLM's own, per verification) of greedy tree speculation
    with `ssms` (their trees merged) over the recorded greedy answers of `examples`, each served alone,
    without running the LLM. `tree`: a fitted shape in place of `expansion`."""
    answers = [(e.tokens[: e.answer_start + max_new_tokens], e.answer_start) for e in examples]
    answers = [(answer, start) for answer, start in answers if len(answer) > start]
    if not answers:
        return 0.0
    device = next(ssms[0].parameters()).device
    oracle = AnswerOracle(llm_config).to(device)
    # One engine for every answer, so that caches and CUDA graphs are made once.
    longest = max(len(answer) for answer, _ in answers)
    manager = RequestManager(oracle, ssms, EngineConfig(max_batch_size=1, max_sequence_length=longest + 1,
                                                        device=str(device)),
                             SpeculationConfig(expansion=expansion, adaptive=False, tree=tree), eos_token_ids=[])
    steps = committed = 0
    for answer, start in answers:
        oracle.answer = torch.tensor(answer, device=device)
        request_id = manager.register_new_request(answer[:start],
                                                  sampling=GenerationConfig(max_new_tokens=len(answer) - start))
        manager.run()
        request = manager.pop_request(request_id)
        if request.output_tokens != answer[start:]:  # an engine bug, not bad input
            raise RuntimeError("speculation with the answer oracle did not reproduce the recorded answer")
        steps += request.stats.num_llm_steps  # as the engine counts (evaluate.mean_tokens_per_step)
        committed += request.stats.num_accepted + request.stats.num_llm_steps
    return committed / max(steps, 1)
