"""SSM expansion: grow each request's token tree level by level, one batched SSM pass per level.

The first pass also catches the SSM's cache up on committed tokens it has not seen (the prompt on the
first step; afterwards the tokens the LLM accepted beyond the SSM's own tree), ending with the root.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GenerationConfig
from ..engine.model_runner import Chunk, ModelRunner
from .sampling import logits_to_probs
from .tree import Proposal, TokenTree


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

    def entries_to_keep(self, accepted: list[int]) -> list[int]:
        """Cache entries that stay valid once the merged tree's nodes `accepted` (root first) are committed:
        the catch-up chain, then the accepted path for as long as it runs through nodes this SSM fed."""
        own = {m: o for o, m in enumerate(self.merged_index or range(len(self.tree)))}
        keep = list(range(self.num_catch_up))
        for node in accepted[1:]:
            index = self.cache_index[own[node]] if node in own else -1
            if index < 0:
                break
            keep.append(index)
        return keep


def expand(runner: ModelRunner, requests: list[DraftRequest], widths: tuple[int, ...]) -> list[SSMDraft]:
    """Grow one tree per request. Greedy: top-k children by SSM logits. Sampling: `width` independent
    draws from the SSM's sampling distribution (duplicates merge, each draw kept as a proposal)."""
    if not requests:
        return []
    drafts, chunks = [], []
    for r in requests:
        catch_up = r.tokens[runner.num_cached(r.slot) :]
        n = len(catch_up)
        chunks.append(Chunk.chain(r.slot, catch_up))
        drafts.append(SSMDraft(TokenTree.root_only(r.tokens[-1]), n, [n - 1]))
        drafts[-1].tree.sampled = r.sampling.do_sample
    frontier = [[0] for _ in requests]  # tree nodes whose logits the last pass produced, per request
    logits = runner.forward(chunks)
    for depth, width in enumerate(widths):
        active = [i for i, r in enumerate(requests) if depth < r.max_depth and frontier[i]]
        if not active:
            break
        new_nodes = {
            i: _add_children(drafts[i].tree, frontier[i], logits[i], width, requests[i].sampling, requests[i].generator)
            for i in active
        }
        frontier = [[] for _ in requests]
        feed = [i for i in active if depth + 1 < min(len(widths), requests[i].max_depth)]
        if not feed:
            break
        chunks = []
        for i in feed:
            draft, nodes = drafts[i], new_nodes[i]
            first = runner.num_speculative(requests[i].slot)
            draft.cache_index.extend([-1] * (len(draft.tree) - len(draft.cache_index)))
            for k, node in enumerate(nodes):
                draft.cache_index[node] = first + k
            parents = [draft.cache_index[draft.tree.parents[u]] for u in nodes]
            tokens = [draft.tree.tokens[u] for u in nodes]
            chunks.append(Chunk(requests[i].slot, tokens, parents, list(range(len(nodes)))))
            frontier[i] = nodes
        outputs = runner.forward(chunks)
        logits = [None] * len(requests)
        for i, out in zip(feed, outputs):
            logits[i] = out
    for draft in drafts:  # leaves that were never fed
        draft.cache_index.extend([-1] * (len(draft.tree) - len(draft.cache_index)))
    return drafts


def _add_children(
    tree: TokenTree,
    parents: list[int],
    logits: torch.Tensor,  # [len(parents), V]
    width: int,
    sampling: GenerationConfig,
    generator: torch.Generator | None,
) -> list[int]:
    """Add `width` children under each parent; returns the new nodes in order."""
    new_nodes: list[int] = []
    if not sampling.do_sample:
        top = logits.topk(width, dim=-1).indices.tolist()
        for parent, tokens in zip(parents, top):
            for token in tokens:
                new_nodes.append(tree.add_child(parent, token))
        return new_nodes
    probs = logits_to_probs(logits, sampling).cpu()  # q: what the draws really come from
    draws = torch.multinomial(probs, width, replacement=True, generator=generator).tolist()
    for parent, q, tokens in zip(parents, probs, draws):
        for token in tokens:
            before = len(tree)
            child = tree.add_child(parent, token)
            tree.proposals[parent].append(Proposal(child, q))
            if len(tree) > before:
                new_nodes.append(child)
    return new_nodes
