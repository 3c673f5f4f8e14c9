"""Greedy tree drafting that stays on the device from the root's logits to the last level's tokens.

With top-k children the tree's shape depends on the children's ranks alone (`TreeShape`), so every SSM
pass of an expansion has static shapes: positions, cache offsets and tree masks follow from where each
request's tree starts in its cache, and each level's tokens are the previous level's top-k, never read
by the host. On a GPU the whole expansion (all levels) is captured once per batch bucket and replayed
as one CUDA graph; elsewhere the same code runs eagerly. The host first sees the tokens when the step's
verification is read back, together with the LLM's choices: one synchronisation per step.
"""

from __future__ import annotations

import torch

from ..engine.model_runner import ModelRunner
from ..engine.upload import upload
from ..layers.attention import AttentionMetadata
from .tree import TreeShape


class DeviceTreeDrafter:
    def __init__(self, runner: ModelRunner, shape: TreeShape) -> None:
        self.runner, self.shape = runner, shape
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
        self.graphs: dict[int, _ExpansionGraph] = {}
        self.pool = None

    @torch.inference_mode()
    def expand(self, root_logits: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        """Tokens of nodes 1.. of each request's tree, [B, len(shape) - 1] on the device.

        `root_logits` [B, V]: the SSM's logits at each root; `starts[b]`: the cache entry right after the
        root in slot `slots[b]`, where node 1 goes. Records the new entries with the runner."""
        batch = len(slots)
        # Entries are laid out for every node above the deepest level; those of leaves stay unwritten
        # and are never kept (the request manager marks them not cached).
        fed = self.shape.depths[1 : self.shape.level_starts[-2]]
        for slot in slots:
            root_depth = self.runner.num_speculative(slot) - 1  # the root ends the catch-up chain
            self.runner.extend_speculative(slot, [root_depth + d for d in fed])
        graphs = self.runner.graphs
        bucket = next((b for b in graphs.batch_buckets if b >= batch), None) if graphs is not None else None
        if bucket is None:
            slots_t, starts_t = upload(torch.tensor([slots, starts]), self.device)
            kv_len = max(starts) + len(self.shape) - 1
            return self._expand(root_logits, slots_t, starts_t, kv_len)
        padding = bucket - batch  # padding rows write into the scratch slot, from entry 0
        graph = self.graphs.get(bucket) or self._capture(bucket)
        graph.root_logits[:batch].copy_(root_logits)
        where = upload(torch.tensor([slots + [self.cache.scratch_slot] * padding, starts + [0] * padding]), self.device)
        graph.slots.copy_(where[0])
        graph.starts.copy_(where[1])
        graph.graph.replay()
        return graph.tokens[:batch]

    def _expand(self, root_logits: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, kv_len: int) -> torch.Tensor:
        batch = root_logits.shape[0]
        logits = root_logits[:, None]  # [B, nodes of the level above, V]
        levels = []
        for depth in range(1, self.shape.depth + 1):
            if depth > 1:
                feeds = self.level_feeds[depth - 2]
                tokens = levels[-1] if feeds is None else levels[-1][:, feeds]
                hidden = self.model(tokens, self.cache, self._metadata(depth - 1, slots, starts, kv_len))
                logits = self.model.compute_logits(hidden)
            top = logits.topk(self.shape.level_width(depth), dim=-1).indices.reshape(batch, -1)
            picks = self.level_picks[depth - 1]
            levels.append(top if picks is None else top[:, picks])  # [B, nodes at depth]
        return torch.cat(levels, dim=1)

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

    def _capture(self, batch: int) -> "_ExpansionGraph":
        vocab = self.model.config.vocab_size
        root_logits = torch.zeros(batch, vocab, device=self.device)
        slots = torch.full((batch,), self.cache.scratch_slot, dtype=torch.long, device=self.device)
        starts = torch.zeros(batch, dtype=torch.long, device=self.device)
        capacity = self.cache.capacity

        def run() -> torch.Tensor:
            return self._expand(root_logits, slots, starts, capacity)

        stream = torch.cuda.Stream(self.device)  # warm up off the capture (lazy initialisation)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            tokens = run()
        self.pool = graph.pool()
        self.graphs[batch] = _ExpansionGraph(graph, root_logits, slots, starts, tokens)
        return self.graphs[batch]


class _ExpansionGraph:
    def __init__(self, graph, root_logits, slots, starts, tokens) -> None:
        self.graph, self.root_logits, self.slots, self.starts, self.tokens = graph, root_logits, slots, starts, tokens
