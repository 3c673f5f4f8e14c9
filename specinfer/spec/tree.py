"""The token tree: candidate continuations proposed by the SSMs, verified by the LLM in one pass.

Node 0 is the root: the last committed token, which the LLM has not yet seen. Every other node is a
speculated token whose parent precedes it, so node order is a topological order and the tree can be fed
to a model as-is. A node's position is prefix length + depth; it attends to the prefix and its ancestors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Proposal:
    """One draw behind a child: stochastic verification needs the distribution it was drawn from."""

    child: int  # node index in the tree
    q: torch.Tensor | None  # [V] draft distribution at the parent; None for a deterministic (top-k) child


@dataclass(slots=True)
class TokenTree:
    tokens: list[int]
    parents: list[int]  # parents[0] == -1
    # proposals[u]: the draws that produced u's children, in draw order (one per draw: a child drawn
    # twice, or by two SSMs, appears twice). Empty lists for trees built without draws.
    proposals: list[list[Proposal]] = field(default_factory=list)
    sampled: bool = False  # children were drawn from the SSMs (rule 1) rather than chosen top-k (rule 3)

    def __post_init__(self) -> None:
        if not self.proposals:
            self.proposals = [[] for _ in self.tokens]

    @classmethod
    def root_only(cls, token: int) -> "TokenTree":
        return cls(tokens=[token], parents=[-1])

    def __len__(self) -> int:
        return len(self.tokens)

    def add_child(self, parent: int, token: int) -> int:
        """Child `token` of `parent`, created if new; returns its index."""
        for proposal_child in self.children(parent):
            if self.tokens[proposal_child] == token:
                return proposal_child
        self.tokens.append(token)
        self.parents.append(parent)
        self.proposals.append([])
        return len(self.tokens) - 1

    def children(self, node: int) -> list[int]:
        return [i for i in range(node + 1, len(self.parents)) if self.parents[i] == node]

    def child_with_token(self, node: int, token: int) -> int | None:
        for child in self.children(node):
            if self.tokens[child] == token:
                return child
        return None

    def depths(self) -> list[int]:
        depths: list[int] = []
        for p in self.parents:
            depths.append(0 if p < 0 else depths[p] + 1)
        return depths

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root down to `node`, both included."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: entry (i, j) is True when j is i or an ancestor of i (the tree-attention mask)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def merge_trees(trees: list[TokenTree]) -> tuple[TokenTree, list[list[int]]]:
    """Merge trees with the same root into one (shared prefixes once), keeping every proposal.

    Returns the merged tree and, per input tree, the merged index of each of its nodes.
    """
    merged = TokenTree(tokens=[trees[0].tokens[0]], parents=[-1], sampled=trees[0].sampled)
    node_maps = []
    for tree in trees:
        assert tree.tokens[0] == merged.tokens[0], "trees to merge must share their root"
        mapping = [0]
        for i in range(1, len(tree)):
            mapping.append(merged.add_child(mapping[tree.parents[i]], tree.tokens[i]))
        for u, proposals in enumerate(tree.proposals):
            merged.proposals[mapping[u]].extend(Proposal(mapping[p.child], p.q) for p in proposals)
        node_maps.append(mapping)
    return merged, node_maps


@dataclass(frozen=True)
class TreeShape:
    """The topology of a tree whose every node at depth d has `widths[d]` children (top-k expansion).

    Greedy drafting picks the top-k tokens under each node, which are always distinct, so the shape
    depends on the widths alone and can be laid out before any token is known. Nodes are numbered in
    level order, children of one parent consecutive, node 0 the root: the order `expand` builds."""

    widths: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    level_starts: tuple[int, ...]  # level d holds nodes level_starts[d] .. level_starts[d + 1] - 1

    @classmethod
    def from_widths(cls, widths: tuple[int, ...]) -> "TreeShape":
        parents, depths, starts = [-1], [0], [0, 1]
        for depth, width in enumerate(widths):
            for parent in range(starts[depth], starts[depth + 1]):
                parents.extend([parent] * width)
                depths.extend([depth + 1] * width)
            starts.append(len(parents))
        return cls(tuple(widths), tuple(parents), tuple(depths), tuple(starts))

    def __len__(self) -> int:
        return len(self.parents)

    def num_nodes_within(self, depth: int) -> int:
        """Nodes (root included) at depth <= `depth`: a prefix of the level order."""
        return self.level_starts[min(depth, len(self.widths)) + 1]
