"""Nested draft trees of growing size, so that the engine can draft less where verification stops being free.

A draft tree is a list of rank paths in which every path comes after its parent and its better-ranked
sibling (the order `fit-tree` grows a tree in, or the level order of an expansion). Then every prefix of
the list is a valid tree, and the tree of m nodes is part of the tree of n > m nodes. The ladder holds
the prefixes of 1, 3, 7, ... nodes and the whole tree.

Nesting also means that one step drafted with a tree tells what every smaller tree of the ladder would
have committed in that step: the SSMs propose the same token at the same rank path whatever else the tree
holds, so the smaller tree accepts the part of the same accepted paths that it contains. Under greedy
verification that count is exact (`tokens_by_size`), which lets the controller weigh smaller trees
without ever running them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tree import TreeShape

Path = tuple[int, ...]


def growth_order(paths: list[Path] | tuple[Path, ...]) -> tuple[Path, ...]:
    """`paths` if each of its prefixes is a valid top-k tree, else the same tree in level order."""
    order, seen = [], {()}
    for path in map(tuple, paths):
        if path in seen:  # the root, or a repeat
            continue
        if path[:-1] not in seen or (path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in seen):
            return TreeShape.from_paths(paths).paths[1:]
        seen.add(path)
        order.append(path)
    return tuple(order)


def ladder_sizes(num_nodes: int) -> tuple[int, ...]:
    """1, 3, 7, ... (2^k - 1) and `num_nodes` itself, without a size so close to it (above 2/3 of it) that
    a second drafter would not pay for its memory and CUDA graphs. With its root a tree of 2^k - 1 nodes
    is 2^k tokens to verify, which fills a captured pass's token bucket exactly: a tree of 2^k nodes
    verified 2^k + 1 tokens, padded to twice that at small sizes."""
    sizes, size = [], 1
    while size * 3 <= num_nodes * 2 and size < num_nodes:
        sizes.append(size)
        size = 2 * size + 1
    return tuple(sizes) + (num_nodes,)


@dataclass(frozen=True)
class TreeLadder:
    sizes: tuple[int, ...]  # speculated nodes per SSM (root excluded), ascending; the last is the whole tree
    shapes: tuple[TreeShape, ...]  # the tree of each size
    # Per shape, per node: the node's place in the growth order (the root -1). The tree of m nodes holds
    # exactly the nodes of a larger one whose place is below m.
    places: tuple[tuple[int, ...], ...]

    @classmethod
    def from_paths(cls, paths, sizes: tuple[int, ...] | None = None) -> "TreeLadder":
        order = growth_order(paths)
        sizes = sizes or ladder_sizes(len(order))
        place = {path: i for i, path in enumerate(order)}
        place[()] = -1
        shapes = tuple(TreeShape.from_paths(order[:size]) for size in sizes)
        return cls(tuple(sizes), shapes, tuple(tuple(place[p] for p in shape.paths) for shape in shapes))

    @classmethod
    def single(cls, shape: TreeShape) -> "TreeLadder":
        """One tree only (no adaptive sizing)."""
        return cls((len(shape) - 1,), (shape,), (tuple(range(-1, len(shape) - 1)),))

    @property
    def full(self) -> TreeShape:
        return self.shapes[-1]

    def tokens_by_size(self, size_index: int, matched: list[tuple[int, int]]) -> dict[int, int]:
        """Tokens a step would have committed with each tree up to `sizes[size_index]`, the one it ran.

        `matched`: (place, depth) of every node whose whole path was accepted, its place in the growth
        order being the smallest among the SSMs' nodes merged into it. The tree of m nodes keeps the
        deepest of them placed below m (its ancestors are placed lower still), plus the LLM's token."""
        return {size: 1 + max((depth for place, depth in matched if place < size), default=0)
                for size in self.sizes[: size_index + 1]}
