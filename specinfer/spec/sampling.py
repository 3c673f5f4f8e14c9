"""Turning logits into the distribution plain sampling would draw from, and drawing from it."""

from __future__ import annotations

import torch

from ..config import GenerationConfig
from ..engine.upload import upload


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


def choose_tokens(
    logits: torch.Tensor, configs: list[GenerationConfig], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of logits [N, V], on the logits' device with one host sync for all rows: the
    argmax for greedy rows, a draw from the row's distribution for sampled rows. Each draw inverts the
    row's CDF at a uniform from the request's own (CPU) generator, so a seed fixes the draw wherever it
    runs, and no per-row distribution has to reach the host."""
    uniforms = [float(torch.rand((), generator=g)) if c.do_sample else 0.0 for c, g in zip(configs, generators)]
    return draw_tokens(logits, [(c, 1) for c in configs], torch.tensor(uniforms)).tolist()


def draw_tokens(logits: torch.Tensor, runs: list[tuple[GenerationConfig, int]], uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens for logits [N, V] on their device, without a host sync: rows come in runs of (config, rows)
    in order; greedy runs take the argmax, sampled ones invert each row's CDF (after the config's
    temperature, top-k and top-p) at its uniform in `uniforms` [N] (on the host)."""
    tokens = logits.argmax(-1)
    groups: dict[tuple, tuple[GenerationConfig, list[int]]] = {}
    start = 0
    for config, rows in runs:
        if config.do_sample:
            key = (config.temperature, config.top_k, config.top_p)
            groups.setdefault(key, (config, []))[1].extend(range(start, start + rows))
        start += rows
    for config, rows in groups.values():
        index = torch.tensor(rows)
        # (Both through pinned staging: a plain copy from pageable memory would wait for the device.)
        row_uniforms, index = upload(uniforms[index].float(), logits.device), upload(index, logits.device)
        probs = logits_to_probs(logits[index], config)
        cdf = probs.cumsum(-1)
        targets = (row_uniforms * cdf[:, -1]).unsqueeze(-1)
        # right=True: the first token whose CDF exceeds the target, so zero-probability tokens never win.
        drawn = torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
        tokens[index] = drawn
    return tokens
