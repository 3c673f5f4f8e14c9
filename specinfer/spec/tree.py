"""The token tree: candidate continuations proposed by the SSMs, verified by the LLM in one pass.

Node 0 is the root: the last committed token, which the LLM has not yet seen. Every other node is a
speculated token whose parent precedes it, so node order is a topological order and the tree can be fed
to a model as-is. A node's position is prefix length + depth; it attends to the prefix and its ancestors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SpecInferError


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
        return depths_of(self.parents)

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root down to `node`, both included."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def depths_of(parents: list[int]) -> list[int]:
    """Each node's depth in a tree given as parent indexes (-1: a root), parents before children."""
    depths: list[int] = []
    for p in parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


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
    """The topology of a greedy draft tree whose every child is its parent's k-th best token (top-k).

    A node is named by its rank path: (0, 2) is the SSM's third choice after its first choice. Top-k
    tokens under one parent are always distinct, so the shape depends on the ranks alone and can be laid
    out before any token is known. An expansion config (`from_widths`) gives every node at depth d the
    same `widths[d]` children; a fitted shape (`spec/tree_fit.py`) spends its nodes where the SSM is
    measured to be right, e.g. deep along its first choices. Nodes are numbered in level order, children
    of one parent consecutive and in rank order, node 0 the root: the order the drafters build."""

    paths: tuple[tuple[int, ...], ...]  # per node, root first (the empty path)
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    ranks: tuple[int, ...]  # per node, its rank among its parent's children (root: 0)
    children: tuple[tuple[int, ...], ...]  # per node, its children in rank order
    level_starts: tuple[int, ...]  # level d holds nodes level_starts[d] .. level_starts[d + 1] - 1

    @classmethod
    def from_widths(cls, widths: tuple[int, ...]) -> "TreeShape":
        paths, level = [], [()]
        for width in widths:
            level = [path + (rank,) for path in level for rank in range(width)]
            paths += level
        return cls.from_paths(paths)

    @classmethod
    def from_paths(cls, paths) -> "TreeShape":
        """A shape from rank paths (every node's parent path present, its siblings ranked 0..k-1)."""
        try:
            given = {tuple(int(rank) for rank in path) for path in paths}
        except (TypeError, ValueError):
            raise SpecInferError("a tree must be a list of rank paths such as [[0], [1], [0, 0]]") from None
        given.discard(())
        for path in sorted(given):
            if min(path) < 0:
                raise SpecInferError(f"tree path {list(path)} has a negative rank")
            if len(path) > 1 and path[:-1] not in given:
                raise SpecInferError(f"tree path {list(path)} lacks its parent {list(path[:-1])}")
            if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in given:
                raise SpecInferError(f"tree path {list(path)} lacks its better-ranked sibling "
                                     f"{list(path[:-1] + (path[-1] - 1,))}")
        if not given:
            raise SpecInferError("a tree needs at least one node besides the root")
        children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for path in sorted(given):
            children.setdefault(path[:-1], []).append(path)
        ordered, parents, starts, level = [()], [-1], [0, 1], [0]
        while level:
            next_level = []
            for parent in level:
                for child in children.get(ordered[parent], ()):
                    next_level.append(len(ordered))
                    ordered.append(child)
                    parents.append(parent)
            if next_level:
                starts.append(len(ordered))
            level = next_level
        kids: list[list[int]] = [[] for _ in ordered]
        for node, parent in enumerate(parents[1:], start=1):
            kids[parent].append(node)
        return cls(tuple(ordered), tuple(parents), tuple(len(p) for p in ordered),
                   tuple(p[-1] if p else 0 for p in ordered), tuple(map(tuple, kids)), tuple(starts))

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return len(self.level_starts) - 2

    def level_width(self, depth: int) -> int:
        """The k of the top-k that yields level `depth` (>= 1): its highest rank plus one."""
        return max(self.ranks[self.level_starts[depth] : self.level_starts[depth + 1]]) + 1

    def num_nodes_within(self, depth: int) -> int:
        """Nodes (root included) at depth <= `depth`: a prefix of the level order."""
        return self.level_starts[min(depth, self.depth) + 1]
