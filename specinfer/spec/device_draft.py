"""Greedy tree drafting that stays on the device from the SSM's catch-up to the last level's tokens.

A step's drafting starts where the SSM's cache stops: the tokens committed since its last draft (the
LLM's own token, and one more where the accepted path ended on a leaf the SSM never fed) are its
*catch-up chain*, the last of them the tree's root. The drafter feeds the chain (padded to CATCH_UP
tokens; longer chains, e.g. a prompt or the tokens of plain steps, are fed ahead and committed), takes
the SSM's top-k at the root, and grows the tree level by level.

With top-k children the tree's shape depends on the children's ranks alone (`TreeShape`), so every SSM
pass has static shapes: positions, cache offsets and tree masks follow from where each request's chain
starts in its cache, and each level's tokens are the previous level's top-k, never read by the host.
On a GPU the whole of it (catch-up and all levels) is captured once per batch bucket and replayed as one
CUDA graph; elsewhere the same code runs eagerly. The host first sees the tokens when the step's
verification is read back, together with the LLM's choices: one synchronisation per step.
"""

from __future__ import annotations

import torch

from ..engine import one_off
from ..engine.gc_freeze import freeze_long_lived_objects
from ..engine.model_runner import Chunk, ModelRunner
from ..engine.upload import upload
from ..layers.attention import AttentionMetadata
from ..models.draft_vocab import DraftVocabularyHead
from .top_k import top_k_indices
from .tree import TreeShape

# Catch-up tokens fed inside the drafter's graph: after a speculative step the chain is one token (the
# LLM's own) or two (the accepted path ended on a leaf). Padding positions write entries that the tree's
# nodes overwrite or that are never kept.
CATCH_UP = 2
# Longer chains are fed ahead of the drafter's graph, all but their last CATCH_UP tokens. Parts fed ahead
# of up to this many tokens (an SSM catching up on a few plain steps, when the controller probes a tree
# again) replay the SSM's captured passes, which the adaptive engine captures up front; longer ones (a
# prompt) run eagerly. Eager, the short ones cost about 3 ms a probe on an H200, where a step costs 1.1
# to 2.2 ms.
REPLAYED_CATCH_UP = 16


class DeviceTreeDrafter:
    def __init__(self, runner: ModelRunner, shape: TreeShape, catch_up: int = CATCH_UP) -> None:
        """`catch_up`: chain tokens fed inside the graph (a drafter fed from the device, `draft_from`,
        takes the whole accepted path and the LLM's token: the tree's depth plus one)."""
        self.runner, self.shape, self.catch_up = runner, shape, catch_up
        self.model, self.cache = runner.model, runner.cache
        self.device = self.cache.data.device
        n = len(shape) - 1  # non-root nodes; node i (>= 1) sits at cache entry start + i - 1
        ancestors = torch.zeros(n, n, dtype=torch.bool)  # among non-root nodes, self included
        for node in range(1, len(shape)):
            parent = shape.parents[node]
            if parent > 0:
                ancestors[node - 1] = ancestors[parent - 1]
            ancestors[node - 1, node - 1] = True
        ancestors = ancestors.to(self.device)
        # Per depth >= 1, the nodes that are fed to the SSM: those with children (a leaf's logits would go
        # unused). Their ids minus one are their cache entries after `start`; leaves' entries stay unwritten.
        fed = [[j for j in range(shape.level_starts[d], shape.level_starts[d + 1]) if shape.children[j]]
               for d in range(1, shape.depth + 1)]
        self.level_nodes = [torch.tensor([j - 1 for j in nodes], dtype=torch.long, device=self.device) for nodes in fed]
        self.level_masks = [ancestors[nodes] for nodes in self.level_nodes]  # what each fed node sees
        # Which of a level's nodes are fed: None where all of them are.
        self.level_feeds = [None if len(nodes) == shape.level_starts[d + 1] - shape.level_starts[d] else
                            torch.tensor([j - shape.level_starts[d] for j in nodes], device=self.device)
                            for d, nodes in enumerate(fed, start=1)]
        # Level d's tokens are picked from the top-k of every fed node of level d - 1: node j takes entry
        # (its parent's place among them) * k + (its rank). None where that is every entry in order.
        self.level_picks: list[torch.Tensor | None] = []
        for d in range(1, shape.depth + 1):
            k = shape.level_width(d)
            parents = [0] if d == 1 else fed[d - 2]
            place = {parent: i for i, parent in enumerate(parents)}
            nodes = range(shape.level_starts[d], shape.level_starts[d + 1])
            picks = [place[shape.parents[j]] * k + shape.ranks[j] for j in nodes]
            everything = picks == list(range(len(parents) * k))
            self.level_picks.append(None if everything else torch.tensor(picks, device=self.device))
        self.chain_steps = torch.arange(catch_up, device=self.device)
        self.chain_mask = torch.ones(catch_up, catch_up, dtype=torch.bool, device=self.device).tril()
        self.graphs: dict[int, _DraftGraph] = {}
        self.pool = None

    @torch.inference_mode()
    def draft(self, catch_up: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Per request: feed the SSM `catch_up[b]` (its tokens past the SSM's cache, the root last) and grow
        the tree. Returns token ids [B, len(shape)] on the device, the root first, and per request how many
        chain tokens lead its speculative cache entries (the rest were fed ahead and committed). Records the
        new entries with the runner (the chain, then the fed tree nodes); does not wait for the device."""
        width = self.catch_up
        ahead = [(slot, tokens[:-width]) for slot, tokens in zip(slots, catch_up) if len(tokens) > width]
        if ahead:  # committed tokens: fed and kept now, so that the graph sees a short chain
            # Not the tree's own cost, so the step is not timed (one-off work); long chains (a prompt) come
            # in every length and run eagerly.
            one_off.note()
            replay = max(len(tokens) for _, tokens in ahead) <= REPLAYED_CATCH_UP
            self.runner.forward([Chunk.chain(slot, tokens, logits="none") for slot, tokens in ahead], replay=replay)
            self.runner.commit_all([(slot, list(range(len(tokens)))) for slot, tokens in ahead])
        tails = [tokens[-width:] for tokens in catch_up]
        bases = [self.runner.num_cached(slot) for slot in slots]
        self.record_chains(slots, [len(tail) for tail in tails])
        padding = (self._bucket(len(slots)) or len(slots)) - len(slots)  # rows that write into the scratch slot
        # One row per field (the chain's tokens, slot, cached entries, chain length), a column per request:
        # attention reads slots and prefix lengths as contiguous vectors.
        inputs = torch.tensor([tail + [0] * (width - len(tail)) + [slot, base, len(tail)]
                               for slot, base, tail in zip(slots, bases, tails)]
                              + [[0] * width + [self.cache.scratch_slot, 0, 1]] * padding).T.contiguous()
        return self._run(upload(inputs, self.device), bases, len(slots)), [len(tail) for tail in tails]

    @torch.inference_mode()
    def draft_from(self, chains: torch.Tensor, lengths: torch.Tensor, slots: list[int], bases: list[int]) -> torch.Tensor:
        """`draft` from chains on the device, which the host has not seen: `chains` [B, catch_up] (each
        request's chain left-aligned, padded) and `lengths` [B], fed after each slot's `bases[b]` cached
        entries. Records nothing with the runner: once the host knows the lengths, `record_chains` does."""
        place = upload(torch.tensor([slots, bases]), self.device)
        inputs = torch.cat([chains.T, place, lengths[None]]).contiguous()
        return self._run(inputs, bases, len(slots))

    def record_chains(self, slots: list[int], lengths: list[int]) -> None:
        """Record with the runner the speculative entries a draft wrote: each chain, then the fed nodes."""
        # Entries are laid out for every node above the deepest level; those of leaves stay unwritten
        # and are never kept (the request manager marks them not cached).
        fed = self.shape.depths[1 : self.shape.level_starts[-2]]
        for slot, n in zip(slots, lengths):
            self.runner.extend_speculative(slot, list(range(n)) + [n - 1 + d for d in fed])

    def _run(self, inputs: torch.Tensor, bases: list[int], batch: int) -> torch.Tensor:
        """The draft of `inputs` [catch_up + 3, B or the batch bucket] on the device (see `_draft`) for
        `batch` requests, replayed from the batch bucket's graph where there is one: token ids
        [batch, len(shape)], the root first."""
        bucket = self._bucket(batch)
        if bucket is None:
            kv_len = min(self.cache.capacity, max(bases) + self.catch_up + len(self.shape))
            return self._draft(inputs, kv_len)
        graph = self.graphs.get(bucket) or self._capture(bucket)
        graph.inputs[:, : inputs.shape[1]].copy_(inputs)
        if inputs.shape[1] < bucket:  # padding columns write into the scratch slot, from entry 0
            graph.inputs[:, inputs.shape[1] :].copy_(graph.padding[:, : bucket - inputs.shape[1]])
        graph.graph.replay()
        return graph.tokens[:batch]

    @torch.inference_mode()
    def capture(self, batch: int) -> None:
        """Capture the graph that drafts for `batch` requests, if there is none yet (no-op without graphs)."""
        bucket = self._bucket(batch)
        if bucket is not None and bucket not in self.graphs:
            self._capture(bucket)

    def _bucket(self, batch: int) -> int | None:
        """The captured batch size that serves `batch` requests, or None to draft eagerly."""
        graphs = self.runner.graphs
        return next((b for b in graphs.batch_buckets if b >= batch), None) if graphs is not None else None

    def _draft(self, inputs: torch.Tensor, kv_len: int) -> torch.Tensor:
        """`inputs` [catch_up + 3, B]: the chain (padded), then slot, cached entries and chain length."""
        width = self.catch_up
        chain, (slots, bases, counts) = inputs[:width].T, inputs[width:]
        batch = chain.shape[0]
        offsets = bases[:, None] + self.chain_steps[None, :]
        hidden = self.model(chain, self.cache, AttentionMetadata(
            positions=offsets, write_slots=slots[:, None].expand(batch, width), write_offsets=offsets,
            read_slots=slots, prefix_lens=bases, tree_mask=self.chain_mask[None].expand(batch, -1, -1), kv_len=kv_len,
        ))
        last = (counts - 1)[:, None]
        hidden = hidden.gather(1, last[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, 1, hidden]: the roots
        levels = [chain.gather(1, last)]  # [B, 1]: the root tokens
        starts = bases + counts  # node 1's entry
        for depth in range(1, self.shape.depth + 1):
            if depth > 1:
                feeds = self.level_feeds[depth - 2]
                tokens = levels[-1] if feeds is None else levels[-1][:, feeds]
                hidden = self.model(tokens, self.cache, self._metadata(depth - 1, slots, starts, kv_len))
            top = self._top_tokens(hidden, self.shape.level_width(depth)).reshape(batch, -1)
            picks = self.level_picks[depth - 1]
            levels.append(top if picks is None else top[:, picks])  # [B, nodes at depth]
        return torch.cat(levels, dim=1)

    def _top_tokens(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """The SSM's k best tokens after each of `hidden` [..., hidden]: [..., k]. A draft vocabulary is
        ranked in its own columns (no full-vocabulary logits), and k = 1 takes one reduction, not a top-k
        (spec/top_k.py)."""
        head = self.model.lm_head
        if isinstance(head, DraftVocabularyHead):
            scores, ids = head.scores(hidden), head.token_ids
        else:
            scores, ids = self.model.compute_logits(hidden), None
        top = top_k_indices(scores, k)
        return top if ids is None else ids[top]

    def _metadata(self, depth: int, slots: torch.Tensor, starts: torch.Tensor, kv_len: int) -> AttentionMetadata:
        """Feeding the nodes at `depth`: they see every entry before `start` (the committed prefix and the
        catch-up chain ending at the root) and, after it, their own ancestors in the tree."""
        nodes, mask = self.level_nodes[depth - 1], self.level_masks[depth - 1]  # [n], [n, tree]
        batch, n = slots.shape[0], nodes.shape[0]
        return AttentionMetadata(
            positions=(starts - 1 + depth)[:, None].expand(batch, n),
            write_slots=slots[:, None].expand(batch, n),
            write_offsets=starts[:, None] + nodes[None, :],
            read_slots=slots,
            prefix_lens=starts,
            tree_mask=mask[None].expand(batch, -1, -1),
            kv_len=kv_len,
        )

    def _capture(self, batch: int) -> "_DraftGraph":
        one_off.note()
        inputs = torch.zeros(self.catch_up + 3, batch, dtype=torch.long, device=self.device)
        inputs[self.catch_up:] = torch.tensor([[self.cache.scratch_slot], [0], [1]], device=self.device)
        capacity = self.cache.capacity

        stream = torch.cuda.Stream(self.device)  # warm up off the capture (lazy initialisation)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._draft(inputs, capacity)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            tokens = self._draft(inputs, capacity)
        self.pool = graph.pool()
        graph.replay()  # a graph's first launch uploads it: paid here, in the step that is not timed
        freeze_long_lived_objects(collect=False)  # what compiling and capturing made lives on with the graph
        self.graphs[batch] = _DraftGraph(graph, inputs, tokens, inputs.clone())
        return self.graphs[batch]


class _DraftGraph:
    def __init__(self, graph, inputs, tokens, padding) -> None:
        # `padding`: the inputs the graph was captured with, every column a padding request's
        self.graph, self.inputs, self.tokens, self.padding = graph, inputs, tokens, padding
