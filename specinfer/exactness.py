"""Checking "identical to incremental decoding" under rounding.

Scoring several tokens in one pass uses other matmul shapes than scoring one, so logits round
differently; where the LLM's top two logits are closer than that rounding, greedy decoding may pick
either. Outputs count as equivalent when they are identical, or when at the first differing position
the LLM's top-two logit margin is within the stated bound for the dtype.
"""

from __future__ import annotations

import torch

from .engine.model_runner import Chunk, ModelRunner

ROUNDING_BOUNDS = {torch.float32: 1e-3, torch.float16: 0.02, torch.bfloat16: 0.125}


def first_divergence(reference: list[int], candidate: list[int]) -> int | None:
    """Index of the first differing token (a length mismatch counts at the shorter end), or None."""
    for i, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def top2_margin(model: torch.nn.Module, tokens: list[int]) -> float:
    """The LLM's top-1 minus top-2 logit after `tokens`, scored incrementally-free in one prefill."""
    runner = ModelRunner(model, num_slots=1, capacity=len(tokens) + 1)
    logits = runner.forward([Chunk.chain(0, tokens)])[0][0]
    top = logits.topk(2).values
    return float(top[0] - top[1])


def divergence_margin(model: torch.nn.Module, prompt: list[int], reference: list[int], candidate: list[int]) -> float | None:
    """None if identical; else the top-two margin at the first divergence (inf if it is not a tie-break,
    e.g. one output stopped early)."""
    i = first_divergence(reference, candidate)
    if i is None:
        return None
    if i >= min(len(reference), len(candidate)):
        return float("inf")
    return top2_margin(model, prompt + reference[:i])
