"""Fitting a draft tree's shape to how often the SSMs are right (as Sequoia does), instead of a fixed
number of children per depth.

Under greedy verification a node of a top-k tree is accepted exactly when every token on its path is
the LLM's choice. Teacher-forced on the LLM's own answers, an SSM gives each answer token a rank (0:
its first choice); a tree drafted at answer position t then accepts the longest rank path that it
holds among `ranks[t + 1], ranks[t + 2], ...`, plus the LLM's own token. So recorded ranks tell what any
shape would accept, and `tokens_per_step` replays greedy steps over them exactly. With several SSMs
drafting side by side (the device drafter verifies their trees under a shared root), a step accepts the
longest path that any one of them holds.

`fit_tree` grows a shape node by node, always adding the rank path that most raises the accepted length
summed over all positions of the fitting answers. The candidates are the first child and the next
sibling of chosen nodes, so the grown set is always a valid top-k tree. Fit and judge on different
answers, and fit on answers the SSMs were not trained on: they know those too well, and a shape fitted
to them expects too much of the SSMs on new text.

A fitted tree is stored as JSON (`write_tree`, `load_tree_file`): its rank paths and how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import SpecInferError
from .tree import TreeShape
from .tree_ladder import growth_order

Ranks = list[np.ndarray]  # per answer: the rank of each answer token under one SSM (token 0 comes from prefill)


def tokens_per_step(shape: TreeShape, ranks: list[Ranks], max_new_tokens: int | None = None) -> float:
    """Mean tokens per LLM step of greedy speculation with `shape` over the recorded answers, each served
    alone from its first token (the prefill's) to its last (or `max_new_tokens`): what the engine would
    count, replayed from the ranks. `ranks[s][a]`: SSM s, answer a."""
    by_rank = [dict() for _ in shape.paths]  # per node: rank -> child
    for node, parent in enumerate(shape.parents[1:], start=1):
        by_rank[parent][shape.ranks[node]] = node
    steps = committed = 0
    for answer in zip(*ranks):
        n = len(answer[0]) if max_new_tokens is None else min(len(answer[0]), max_new_tokens)
        t = 0
        while t < n - 1:
            room = n - 1 - t - 1  # the tree may not reach past the budget, less the LLM's own token
            accepted = max(_matched_depth(by_rank, r, t, room) for r in answer)
            steps += 1
            committed += accepted + 1
            t += accepted + 1
    return committed / max(steps, 1)


def _matched_depth(by_rank: list[dict], ranks: np.ndarray, t: int, room: int) -> int:
    node = depth = 0
    while depth < room:
        node = by_rank[node].get(int(ranks[t + depth + 1]), -1)
        if node < 0:
            break
        depth += 1
    return depth


def fit_tree(ranks: list[Ranks], num_nodes: int, max_depth: int = 32, max_rank: int = 16) -> TreeShape:
    """The shape of `num_nodes` nodes (root excluded) that greedily maximises the summed accepted length
    over every position of the answers, for the SSMs in `ranks` drafting side by side."""
    return TreeShape.from_paths(grow_tree(ranks, num_nodes, max_depth, max_rank))


def grow_tree(ranks: list[Ranks], num_nodes: int, max_depth: int = 32,
              max_rank: int = 16) -> list[tuple[int, ...]]:
    """`fit_tree`'s rank paths in the order they were chosen: every prefix of the list is the tree that
    fitting would give for that many nodes."""
    # One row per answer position t (a possible step root): the ranks of the next `max_depth` tokens.
    rows = []
    for per_ssm in zip(*ranks):
        n = len(per_ssm[0])
        for t in range(n - 1):
            rows.append([_window(r, t, max_depth) for r in per_ssm])
    if not rows:
        raise SpecInferError("no answer has two tokens or more: nothing to fit a tree to")
    windows = np.array(rows).transpose(1, 0, 2)  # [SSMs, positions, depth]; -1 beyond an answer's end
    positions = windows.shape[1]
    best = np.zeros(positions, dtype=np.int64)  # accepted depth so far, the best SSM's
    matches = {(): np.ones(windows.shape[:2], dtype=bool)}  # per chosen path: where each SSM follows it
    gains: dict[tuple[int, ...], tuple[int, np.ndarray]] = {}
    frontier = {(0,)}
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < num_nodes and frontier:  # stops early once no node adds anything
        for path in frontier - gains.keys():
            gains[path] = _gain(path, matches, windows, best)
        # Re-score lazily: a gain only falls as the tree grows, so a stale top score that still wins
        # after re-scoring is the true maximum.
        while True:
            path = max(frontier, key=lambda p: (gains[p][0], -len(p), [-r for r in p]))
            fresh = _gain(path, matches, windows, best)
            if fresh[0] == gains[path][0]:
                break
            gains[path] = fresh
        if gains[path][0] == 0:
            break  # no answer position would accept anything more
        frontier.remove(path)
        chosen.append(path)
        followed = gains.pop(path)[1]
        matches[path] = followed
        best = np.where(followed.any(0), np.maximum(best, len(path)), best)
        if len(path) < max_depth:
            frontier.add(path + (0,))
        if path[-1] + 1 < max_rank:
            frontier.add(path[:-1] + (path[-1] + 1,))
    if not chosen:
        raise SpecInferError("no SSM's first choice is ever right on these answers: nothing to fit a tree to")
    return chosen


def _window(ranks: np.ndarray, t: int, depth: int) -> np.ndarray:
    out = np.full(depth, -1, dtype=np.int64)
    ahead = np.asarray(ranks[t + 1 : t + 1 + depth], dtype=np.int64)
    out[: len(ahead)] = ahead
    return out


def _gain(path: tuple[int, ...], matches: dict, windows: np.ndarray, best: np.ndarray) -> tuple[int, np.ndarray]:
    """How much adding `path` raises the summed accepted depth, and where each SSM follows it."""
    followed = matches[path[:-1]] & (windows[:, :, len(path) - 1] == path[-1])
    anywhere = followed.any(0)
    return int(np.maximum(best[anywhere], len(path)).sum() - best[anywhere].sum()), followed


def load_tree_file(path: str | Path, nodes: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Rank paths from a JSON file: a list of paths, or an object with "paths" (what fit-tree writes).
    `nodes`: only the first that many, for a file whose paths are in growth order ("grown": true, as
    fit-tree writes them), so that one fitted tree gives every smaller one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecInferError(f"cannot read tree file {str(path)!r}: {err}") from None
    paths = data.get("paths") if isinstance(data, dict) else data
    if not isinstance(paths, list):
        raise SpecInferError(f"tree file {str(path)!r} must hold a list of rank paths or an object with \"paths\"")
    if nodes is not None:
        if not (isinstance(data, dict) and data.get("grown")):
            raise SpecInferError(f"tree file {str(path)!r} does not list its paths in growth order: it cannot be cut "
                                 "to fewer nodes (fit-tree writes files that can)")
        if not 1 <= nodes <= len(paths):
            raise SpecInferError(f"tree file {str(path)!r} holds {len(paths)} nodes; asked for {nodes}")
        paths = paths[:nodes]
    TreeShape.from_paths(paths)  # validates
    return growth_order(paths)  # the file's own order where it nests, for adaptive tree sizes


def write_tree(path: Path, grown: list[tuple[int, ...]], ssms: list[str], fitted_on: str,
               held_out: float | None = None, served: float | None = None) -> None:
    """The JSON that `--tree` and `load_tree_file` read: the rank paths in growth order (`grow_tree`),
    and how they were made."""
    shape = TreeShape.from_paths(grown)
    record = {"paths": [list(p) for p in grown], "grown": True, "nodes": len(shape) - 1, "depth": shape.depth,
              "ssms": ssms, "fitted_on": fitted_on}
    if held_out is not None:
        record["held_out_tokens_per_step"] = round(held_out, 3)
    if served is not None:
        record["held_out_tokens_per_step_served"] = round(served, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
