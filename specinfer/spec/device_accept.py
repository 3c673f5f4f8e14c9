"""Greedy acceptance on the device: the path a verified tree keeps, found without the host.

The host's rule (`verify.verify_greedy_targets`) keeps the deepest node whose whole path is the LLM's
choice (a node matches where its token is its parent's target), the first such node in index order where
two paths reach the same depth. The same rule in tensor operations lets the next step's draft start from
the accepted tokens while this step is still on its way to the host (`RequestManager`, overlapped tree
steps): the chain the SSM must catch up on is the accepted path's tokens and the LLM's own token.
"""

from __future__ import annotations

import torch

from .tree import depths_of


class GreedyPaths:
    """For trees of one shape (`parents`, root first), verified for a batch of requests at once."""

    def __init__(self, parents: list[int], device: torch.device) -> None:
        depths = depths_of(parents)
        self.max_depth = max(depths)
        self.parents = torch.tensor([0] + list(parents[1:]), device=device)  # the root is its own parent
        self.depths = torch.tensor(depths, device=device)
        # Per node, its ancestor at each depth up to its own, then itself (the path, padded).
        table = []
        for node in range(len(parents)):
            path = [node]
            while path[-1] != 0:
                path.append(parents[path[-1]])
            path.reverse()
            table.append(path + [node] * (self.max_depth + 1 - len(path)))
        self.ancestor_at = torch.tensor(table, device=device)  # [N, max_depth + 1]

    def __call__(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`tokens`, `targets` [B, N]: each node's token and the LLM's choice after it. Returns the kept
        path's nodes [B, max_depth + 1] (root first, padded with the deepest), each request's accepted
        depth [B] and the LLM's token after the path [B]."""
        match = tokens == targets[:, self.parents]
        match[:, 0] = True
        kept = match
        for _ in range(self.max_depth):  # a node is kept where it and all its ancestors match
            kept = match & kept[:, self.parents]
        deepest = torch.where(kept, self.depths, -1).argmax(-1)  # the first of the deepest, as on the host
        path = self.ancestor_at[deepest]
        return path, self.depths[deepest], targets.gather(1, deepest[:, None]).squeeze(1)

    def chains(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What an SSM catches up on after the step: per request the accepted tokens (below the root) and
        the LLM's own, left-aligned in [B, max_depth + 1], their count [B], and the accepted depth [B]."""
        path, accepted, bonus = self(tokens, targets)
        chain = torch.cat([tokens.gather(1, path[:, 1:]), torch.zeros_like(bonus)[:, None]], dim=1)
        chain.scatter_(1, accepted[:, None], bonus[:, None])
        return chain, accepted + 1, accepted
