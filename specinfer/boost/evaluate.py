"""Built-in evaluation on held-out prompts: acceptance of each SSM alone and of the merged set, and the
share of the LLM's answer tokens that the set covers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import EngineConfig, GenerationConfig, SpeculationConfig
from ..engine.request_manager import RequestManager
from .data import Example
from .oracle import oracle_tokens_per_step
from .train import coverage


@dataclass(slots=True)
class Evaluation:
    label: str
    mean_tokens_per_step: float  # greedy, tree verification, adaptive speculation off
    coverage: float  # share of held-out answer tokens among some SSM's top-k


def mean_tokens_per_step(llm: nn.Module, ssms: list[nn.Module], examples: list[Example],
                         expansion: tuple[int, ...], max_new_tokens: int, batch_size: int = 8) -> float:
    """Tokens per LLM step with the LLM itself verifying (what `oracle_tokens_per_step` reproduces)."""
    max_len = max(e.answer_start for e in examples) + max_new_tokens + 1
    manager = RequestManager(llm, ssms, EngineConfig(max_batch_size=batch_size, max_sequence_length=max_len,
                                                     device=str(next(llm.parameters()).device)),
                             SpeculationConfig(expansion=expansion, adaptive=False),
                             eos_token_ids=llm.config.eos_token_ids)
    ids = [manager.register_new_request(e.tokens[: e.answer_start], sampling=GenerationConfig(max_new_tokens=max_new_tokens))
           for e in examples]
    manager.run()
    requests = [manager.pop_request(i) for i in ids]
    steps = sum(r.stats.num_llm_steps for r in requests)
    accepted = sum(r.stats.num_accepted for r in requests)
    return (accepted + steps) / max(steps, 1)


@torch.no_grad()
def evaluate(llm: nn.Module, ssms: list[nn.Module], labels: list[str], examples: list[Example],
             expansion: tuple[int, ...], top_k: int, max_length: int, max_new_tokens: int = 64) -> list[Evaluation]:
    """One row per SSM alone, then one for all of them merged into one tree."""
    def share(cover: list[torch.Tensor]) -> float:
        total = sum(len(c) for c in cover)
        return sum(int(c.sum()) for c in cover) / max(total, 1)

    rows = []
    groups = [([ssm], label) for ssm, label in zip(ssms, labels)]
    if len(ssms) > 1:
        groups.append((ssms, "merged set"))
    for group, label in groups:
        rows.append(Evaluation(
            label,
            # The recorded greedy answers stand in for the LLM (oracle.py): the same acceptance, no LLM passes.
            oracle_tokens_per_step(llm.config, group, examples, expansion, max_new_tokens),
            share(coverage(group, examples, top_k, max_length)),
        ))
    return rows
