"""Token tree verification: which speculated path the LLM keeps, plus one token of its own.

The rule must match how the tree was built (see VERIFICATION notes in the docs):
- greedy: descend to the child holding argmax p_u; at the first miss emit argmax p_u.
- top-k (deterministic) children, sampling on: each child is a point mass, so drawing y ~ p_u and
  descending when y is a child is exact (equivalent to accepting child x with prob r(x), zeroing it
  and renormalising on rejection).
- children drawn from the SSMs (multi-step speculative sampling): r <- p_u; for each draw x_i ~ q_i in
  draw order accept with prob min(1, r(x_i) / q_i(x_i)); on rejection r <- norm(max(0, r - q_i)).
  All rejected: emit y ~ r. Either way the emitted sequence is distributed exactly as the LLM samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample
from .tree import TokenTree


@dataclass(slots=True)
class VerifyResult:
    accepted: list[int]  # tree nodes kept, root first (the root is always kept)
    next_token: int  # the LLM's own token after the last accepted node
    # (node, depth) of every node besides the root whose whole path the LLM accepted: the kept path, and
    # under greedy verification the other matching branches too (a smaller tree may keep one of them).
    matched: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.matched is None:
            self.matched = [(node, depth) for depth, node in enumerate(self.accepted[1:], start=1)]

    def new_tokens(self, tree: TokenTree) -> list[int]:
        """Tokens committed by this step: the accepted speculated tokens, then the LLM's token."""
        return [tree.tokens[u] for u in self.accepted[1:]] + [self.next_token]


def verify_greedy(tree: TokenTree, logits: torch.Tensor) -> VerifyResult:
    """logits [N, V] at every tree node."""
    return verify_greedy_targets(tree, logits.argmax(-1).tolist())  # one device sync for the whole tree


def verify_greedy_targets(tree: TokenTree, targets: list[int]) -> VerifyResult:
    """`targets`: the LLM's argmax at every tree node. Keeps the deepest node whose whole path is the LLM's
    choice. Several SSMs' trees verified side by side under one root may hold the same token twice; the
    deeper of the two paths is kept, not the first (the tokens are the same either way)."""
    parents, tokens = tree.parents, tree.tokens  # (locals: this runs for every node of every request)
    depth = [0] * len(tokens)  # per node: its depth if its whole path is accepted, else -1
    deepest = deepest_depth = 0
    matched = []
    for node in range(1, len(tokens)):
        parent = parents[node]
        d = depth[parent]
        if d >= 0 and tokens[node] == targets[parent]:
            depth[node] = d = d + 1
            matched.append((node, d))
            if d > deepest_depth:
                deepest, deepest_depth = node, d
        else:
            depth[node] = -1
    return VerifyResult(tree.path_to(deepest), targets[deepest], matched)


def shared_draws(tree: TokenTree, draws: list[int]) -> list[int]:
    """`draws` (the LLM's token drawn at every node) with each node that repeats an earlier one's path (the
    same token under the same parent path: several SSMs' trees side by side under one root) given that
    node's draw. The walk then meets one draw per distinct context, as on the merged tree; a repeated path
    with a draw of its own would get a second chance, and keeping the deeper of two matches would favour
    the tokens drafted below it. (The engine draws the nodes of one depth at one uniform, so repeated
    paths draw alike already but for rounding: their logits come from different cache entries.)"""
    parents, tokens = tree.parents, tree.tokens
    first: dict[tuple[int, int], int] = {}
    canonical = [0] * len(tokens)
    shared = list(draws)
    for node in range(1, len(tokens)):
        c = canonical[node] = first.setdefault((canonical[parents[node]], tokens[node]), node)
        shared[node] = draws[c]
    return shared


def verify_stochastic(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator | None) -> VerifyResult:
    """probs [N, V]: the LLM's sampling distribution at every tree node (on the CPU, like `generator`)."""
    node, accepted = 0, [0]
    while True:
        if tree.sampled:
            child, residual = _speculative_sampling_step(tree, node, probs[node], generator)
            if child is None:
                return VerifyResult(accepted, sample(residual, generator))
        else:
            token = sample(probs[node], generator)
            child = tree.child_with_token(node, token)
            if child is None:
                return VerifyResult(accepted, token)
        node = child
        accepted.append(node)


def _speculative_sampling_step(
    tree: TokenTree, node: int, p: torch.Tensor, generator: torch.Generator | None
) -> tuple[int | None, torch.Tensor]:
    residual = p
    for proposal in tree.proposals[node]:
        token = tree.tokens[proposal.child]
        q = proposal.q
        accept_prob = min(1.0, float(residual[token] / q[token])) if q[token] > 0 else 0.0
        if float(torch.rand((), generator=generator)) < accept_prob:
            return proposal.child, residual
        updated = (residual - q).clamp_min(0)
        mass = updated.sum()
        # mass == 0 only when residual == q up to rounding, where the rejection itself had ~0 probability.
        if mass > 0:
            residual = updated / mass
    return None, residual
