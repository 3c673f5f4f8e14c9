"""SSM expansion: grow each request's token tree level by level, one batched SSM pass per level.

The first pass also catches the SSM's cache up on committed tokens it has not seen (the prompt on the
first step; afterwards the tokens the LLM accepted beyond the SSM's own tree), ending with the root.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GenerationConfig
from ..engine.model_runner import Chunk, ModelRunner
from .device_draft import CATCH_UP
from .sampling import logits_to_probs
from .tree import Proposal, TokenTree, TreeShape


@dataclass(slots=True)
class DraftRequest:
    slot: int
    tokens: list[int]  # every committed token; the last one is the root
    max_depth: int  # the tree may not go deeper (the request's remaining budget)
    sampling: GenerationConfig
    generator: torch.Generator | None


@dataclass(slots=True)
class SSMDraft:
    tree: TokenTree
    num_catch_up: int  # speculative cache entries 0..num_catch_up-1 are the catch-up chain (root last)
    cache_index: list[int]  # per tree node: its speculative cache entry, or -1 if never fed (leaves)
    merged_index: list[int] | None = None  # per tree node: its index in the merged tree
    shape_nodes: list[int] | None = None  # per tree node: the node of the shape it fills (None: the same)
    own: dict[int, int] | None = None  # `own_nodes()` made ahead (shared by drafts of one cut), or None

    def own_nodes(self) -> dict[int, int]:
        """Merged tree node -> this SSM's node."""
        if self.own is not None:
            return self.own
        return {m: o for o, m in enumerate(self.merged_index or range(len(self.tree)))}

    def entries_to_keep(self, accepted: list[int], own: dict[int, int] | None = None) -> list[int]:
        """Cache entries that stay valid once the merged tree's nodes `accepted` (root first) are committed:
        the catch-up chain, then the accepted path for as long as it runs through nodes this SSM fed."""
        own = own if own is not None else self.own_nodes()
        keep = list(range(self.num_catch_up))
        for node in accepted[1:]:
            index = self.cache_index[own[node]] if node in own else -1
            if index < 0:
                break
            keep.append(index)
        return keep


def expand(runner: ModelRunner, requests: list[DraftRequest], shape: TreeShape) -> list[SSMDraft]:
    """Grow one tree per request along `shape`. Greedy: a node's children are the SSM's top-k tokens, its
    k children in the shape. Sampling: as many independent draws from the SSM's sampling distribution
    (duplicates merge, each draw kept as a proposal), the i-th new token taking the shape's i-th child."""
    if not requests:
        return []
    drafts, chunks = [], []
    for r in requests:
        catch_up = r.tokens[runner.num_cached(r.slot) :]
        n = len(catch_up)
        chunks.append(Chunk.chain(r.slot, catch_up))
        drafts.append(SSMDraft(TokenTree.root_only(r.tokens[-1]), n, [n - 1], shape_nodes=[0]))
        drafts[-1].tree.sampled = r.sampling.do_sample
    # Per request: the tree nodes whose logits the last pass produced, and the shape node of each.
    frontier: list[list[tuple[int, int]]] = [[(0, 0)] for _ in requests]
    # A chain longer than what a step leaves since the last draft (a prompt, the tokens of plain steps) is
    # a one-off pass: eager, and the step is not timed.
    logits = runner.forward(chunks, replay=max(len(c.tokens) for c in chunks) <= CATCH_UP)
    for depth in range(shape.depth):
        active = [i for i, r in enumerate(requests) if depth < r.max_depth and frontier[i]]
        if not active:
            break
        grown = {i: _add_children(drafts[i].tree, frontier[i], logits[i], shape, requests[i].sampling,
                                  requests[i].generator) for i in active}
        for i, nodes in grown.items():
            drafts[i].shape_nodes += [at for _, at in nodes]  # new nodes only, in tree order
        frontier = [[] for _ in requests]
        chunks, feed = [], []
        for i in active:
            # Only nodes with children in the shape are fed; the others never get a cache entry.
            nodes = [(node, at) for node, at in grown[i] if shape.children[at] and depth + 1 < requests[i].max_depth]
            if not nodes:
                continue
            draft = drafts[i]
            first = runner.num_speculative(requests[i].slot)
            draft.cache_index.extend([-1] * (len(draft.tree) - len(draft.cache_index)))
            for k, (node, _) in enumerate(nodes):
                draft.cache_index[node] = first + k
            parents = [draft.cache_index[draft.tree.parents[u]] for u, _ in nodes]
            tokens = [draft.tree.tokens[u] for u, _ in nodes]
            chunks.append(Chunk(requests[i].slot, tokens, parents, list(range(len(nodes)))))
            frontier[i] = nodes
            feed.append(i)
        if not feed:
            break
        outputs = runner.forward(chunks)
        logits = [None] * len(requests)
        for i, out in zip(feed, outputs):
            logits[i] = out
    for draft in drafts:  # leaves that were never fed
        draft.cache_index.extend([-1] * (len(draft.tree) - len(draft.cache_index)))
    return drafts


def _add_children(
    tree: TokenTree,
    parents: list[tuple[int, int]],  # (tree node, its shape node)
    logits: torch.Tensor,  # [len(parents), V]
    shape: TreeShape,
    sampling: GenerationConfig,
    generator: torch.Generator | None,
) -> list[tuple[int, int]]:
    """Add each parent's children; returns the new (tree node, shape node) pairs in order."""
    new_nodes: list[tuple[int, int]] = []
    widths = [len(shape.children[at]) for _, at in parents]
    if not sampling.do_sample:
        top = logits.topk(max(widths), dim=-1).indices.tolist()
        for (parent, at), tokens in zip(parents, top):
            for token, child_at in zip(tokens, shape.children[at]):
                new_nodes.append((tree.add_child(parent, token), child_at))
        return new_nodes
    probs = logits_to_probs(logits, sampling).cpu()  # q: what the draws really come from
    # One batched draw; a parent with fewer children uses its first draws (still independent draws).
    draws = torch.multinomial(probs, max(widths), replacement=True, generator=generator).tolist()
    for (parent, at), q, tokens, width in zip(parents, probs, draws, widths):
        places = iter(shape.children[at])
        for token in tokens[:width]:
            before = len(tree)
            child = tree.add_child(parent, token)
            tree.proposals[parent].append(Proposal(child, q))
            if len(tree) > before:
                new_nodes.append((child, next(places)))
    return new_nodes
