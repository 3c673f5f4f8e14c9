"""Turning logits into the distribution plain sampling would draw from."""

from __future__ import annotations

import torch

from ..config import GenerationConfig


def logits_to_probs(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] after temperature, top-k, then top-p (fp32)."""
    logits = logits.float() / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest head whose mass reaches top_p: drop a token if the mass before it already does.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))
