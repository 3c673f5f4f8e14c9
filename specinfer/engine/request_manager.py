"""The engine loop: many requests, one batched SSM expansion and one batched LLM verification per step.

A step reads: admit -> prefill newcomers -> draft -> verify -> commit -> retire. Requests join and leave
between steps (continuous batching); each keeps its own tree size, length budget and sampling settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import EngineConfig, GenerationConfig, SpeculationConfig
from ..errors import SpecInferError
from ..spec.device_accept import GreedyPaths
from ..spec.device_draft import REPLAYED_CATCH_UP, DeviceTreeDrafter
from ..spec.draft import DraftRequest, SSMDraft, expand
from ..spec.sampling import choose_tokens, draw_tokens, logits_to_probs
from ..spec.tree import TokenTree, depths_of, merge_trees
from ..spec.verify import VerifyResult, shared_draws, verify_greedy_targets, verify_stochastic
from ..tokenizer import Tokenizer
from . import one_off
from .gc_freeze import freeze_long_lived_objects
from .in_flight import InFlightStep
from .read_back import QueuedReadBack
from .model_runner import Chunk, ModelRunner
from .scheduler import Scheduler
from .sequence import Request, RequestStatus
from .speculation_controller import SpeculationController
from .upload import upload


_ROOT, _ROOT_ROWS = [-1], [0]  # a chunk of one token hanging off the prefix, its logits wanted


@dataclass(slots=True)
class _NextDraft:
    """A draft launched from the device for the step after this one (`EngineConfig.overlap_tree_steps`)."""

    request_ids: list[int]
    size_index: int
    tokens: list[torch.Tensor]  # per SSM [B, tree nodes] on the device
    bases: list[list[int]]  # per SSM, each slot's cached entries the chains follow
    lengths: list[int] | None = None  # each chain's length, from the host's verification (once read back)


class RequestManager:
    def __init__(
        self,
        llm: torch.nn.Module,
        ssms: list[torch.nn.Module],
        engine: EngineConfig,
        speculation: SpeculationConfig,
        eos_token_ids: list[int],
        tokenizer: Tokenizer | None = None,
    ) -> None:
        for i, ssm in enumerate(ssms):
            if ssm.config.vocab_size != llm.config.vocab_size:
                raise SpecInferError(
                    f"SSM {i + 1} has a vocabulary of {ssm.config.vocab_size} tokens, the LLM {llm.config.vocab_size}: "
                    "an SSM must share the LLM's tokenizer"
                )
        if speculation.mode != "incremental" and not ssms:
            raise SpecInferError(f"mode {speculation.mode!r} needs at least one SSM")
        self.engine = engine
        self.speculation = speculation
        self.eos_token_ids = eos_token_ids
        self.tokenizer = tokenizer
        if engine.max_sequence_length > llm.config.max_position_embeddings:
            raise SpecInferError(
                f"max_sequence_length {engine.max_sequence_length} exceeds the LLM's context of "
                f"{llm.config.max_position_embeddings} tokens"
            )
        # Room for the committed tokens plus one step's speculative entries (catch-up chains are
        # bounded by the sequence itself).
        capacity = engine.max_sequence_length + len(ssms) * speculation.max_tree_nodes + 1
        self.llm = ModelRunner(llm, engine.max_batch_size, capacity)
        active_ssms = ssms[:1] if speculation.mode == "sequence" else ssms
        self.ssms = [] if speculation.mode == "incremental" else [
            # Cached entries plus the catch-up chain never exceed the sequence; the tree adds its nodes.
            ModelRunner(ssm, engine.max_batch_size, engine.max_sequence_length + speculation.max_tree_nodes)
            for ssm in active_ssms
        ]
        # The trees it may draft: nested ones of growing size under the adaptive controller, else one.
        self.ladder = speculation.tree_ladder if self.ssms else None
        self._drafters: dict[tuple[int, int], DeviceTreeDrafter] = {}  # (SSM, ladder size index), made on first use
        self._size_index = 0  # this step's tree in the ladder
        self._index_lists: dict[tuple, tuple] = {}  # see _verified_tree and _draft_indexes
        self._ladder_captured: set[int] = set()  # batch sizes whose graphs are captured: see _capture_ladder
        self.controller = SpeculationController(self.ladder.sizes) if speculation.adaptive and self.ssms else None
        # Set to a list to record every decoding step as (batch size, tree size drafted or 0, seconds,
        # tokens committed): what benchmarks/step_profile.py reads to see what the controller chose.
        self.step_log: list[tuple[int, int, float, int]] | None = None
        self.tp = getattr(llm, "tp", None)  # tensor parallelism: the LLM's process group, or None
        # Plain steps queued ahead of their read-back (engine/in_flight.py); ranks under tensor
        # parallelism stay in lockstep, step for step.
        overlap = engine.overlap_plain_steps
        self.overlap = (self.llm.device.type == "cuda" if overlap is None else overlap) and self.tp is None
        self._in_flight: InFlightStep | None = None  # a plain step queued, its tokens not yet read
        self._chosen_ahead: tuple[list[int], int, set[int]] | None = None  # see _chain
        # The requests and tree size of the step just run, where it drafted: the plain step queued after it
        # refills the pipeline (see `_land`).
        self._last_draft: tuple[list[int], int] | None = None
        overlap_trees = engine.overlap_tree_steps  # None: see EngineConfig.overlap_tree_steps
        self.overlap_trees = (self.llm.device.type == "cuda" and self.controller is None
                              if overlap_trees is None else overlap_trees) and self.tp is None
        self._next_draft: _NextDraft | None = None  # the next step's draft, launched from the device
        self._drafting_ahead = False  # this step launched the next one's draft (its SSM commits keep the chain only)
        self._paths: dict[tuple, GreedyPaths] = {}  # by (tree size index, SSMs): the verified whole trees
        # Chain tokens the drafters fed from the device take: the deepest tree's path and the LLM's token.
        self._ahead_width = self.ladder.shapes[-1].depth + 1 if self.ladder else 0
        self.next_drafts_taken = self.next_draft_misses = 0  # drafts launched ahead, taken or not by the step after
        self.scheduler = Scheduler(engine.max_batch_size)
        self.requests: dict[int, Request] = {}
        self._next_id = 0
        freeze_long_lived_objects()

    def register_new_request(
        self,
        prompt: str | list[int],
        max_sequence_length: int | None = None,
        sampling: GenerationConfig | None = None,
        prompt_text: str | None = None,
    ) -> int:
        """Queue a prompt (text, or token ids); returns the request id. `max_sequence_length` counts prompt
        and output tokens, as in the original, and defaults to the engine's. `prompt_text` labels a
        token-id prompt with the text it came from (e.g. before a chat template was applied)."""
        max_len = max_sequence_length or self.engine.max_sequence_length
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SpecInferError("a text prompt needs a tokenizer; pass token ids instead")
            tokens = self.tokenizer.encode(prompt)
        else:
            tokens = list(prompt)
        if not tokens:
            raise SpecInferError("the prompt is empty")
        if max_len > self.engine.max_sequence_length:
            raise SpecInferError(
                f"max_sequence_length {max_len} exceeds the engine's {self.engine.max_sequence_length}"
            )
        if len(tokens) >= max_len:
            raise SpecInferError(
                f"the prompt has {len(tokens)} tokens, which leaves no room under max_sequence_length {max_len}"
            )
        vocab = self.llm.model.config.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise SpecInferError(f"prompt token ids must lie in [0, {vocab})")
        sampling = sampling or GenerationConfig()
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.do_sample else None
        text = prompt if isinstance(prompt, str) else prompt_text
        request = Request(self._next_id, tokens, max_len, sampling, generator, text)
        self._next_id += 1
        self.requests[request.id] = request
        self.scheduler.add(request)
        return request.id

    def pop_request(self, request_id: int) -> Request:
        """Hand a finished request over to the caller and forget it (the manager keeps results until then)."""
        request = self.requests[request_id]
        if request.status is not RequestStatus.FINISHED:
            raise SpecInferError(f"request {request_id} has not finished")
        return self.requests.pop(request_id)

    def abort_request(self, request_id: int, reason: str = "abort") -> Request:
        """Stop a request wherever it is (queued or running), free its cache slots, forget it and return it
        with `finish_reason` set to `reason`. Call between steps."""
        request = self.requests.pop(request_id, None)
        if request is None:
            raise SpecInferError(f"no request {request_id}")
        if request.status is RequestStatus.RUNNING:
            self._release(request)
        self.scheduler.remove(request)
        if request.status is not RequestStatus.FINISHED:
            request.finish_reason = reason
            request.status = RequestStatus.FINISHED
            request.stats.finish_time = time.perf_counter()
        return request

    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def step(self) -> list[Request]:
        """One engine step; returns the requests that finished in it. A plain step may be left in
        flight (`overlap`): its tokens arrive with the next call, which queues the step after it first."""
        if self._in_flight is not None:
            return self._land(self._in_flight)
        admitted = self.scheduler.admit()
        if admitted:
            self._prefill(admitted)
        newcomers = {r.id for r in admitted}
        decoding = [r for r in self.scheduler.running if r.id not in newcomers and r.status is RequestStatus.RUNNING]
        # A draft launched ahead serves the step right after the one that launched it, or none.
        ahead, self._next_draft = self._next_draft, None
        if decoding:
            one_offs, start = one_off.count(), time.perf_counter()
            sampled = any(r.sampling.do_sample for r in decoding)
            host_drafting = sampled and self.speculation.sampled_children and bool(self.ssms)
            drafting = None if host_drafting else self._choose_drafting(decoding)
            if drafting == [] and self.overlap:
                refills = self._last_draft[1] if self._last_draft and self._last_draft[0] == [r.id for r in decoding] else 0
                self._in_flight = self._queue_plain(decoding, one_offs, start, refills=refills)
            else:
                if host_drafting:
                    trees, drafts = self._draft(decoding)
                    results = self._verify(decoding, trees)
                else:
                    trees, drafts, results = self._speculate_top_k(decoding, drafting, ahead)
                drafted = self._commit(decoding, trees, drafts, results)
                self._record(decoding, trees, drafted, results, one_offs, start)
        return self._retire()

    def _record(self, requests: list[Request], trees: list[TokenTree], drafted: list[tuple[int, dict[int, int]]],
                results: list[VerifyResult], one_offs: int, start: float) -> None:
        """The step's log entry, and its time and each drafting request's tokens for the controller."""
        if self.step_log is not None:
            tree_size = self.ladder.sizes[self._size_index] if any(len(t) > 1 for t in trees) else 0
            self.step_log.append((len(requests), tree_size, time.perf_counter() - start,
                                  sum(len(r.accepted) for r in results)))
        if self.controller is not None:
            seconds = time.perf_counter() - start
            if self.tp is not None:  # ranks must speculate alike, so they all take the slowest rank's time
                seconds = self.tp.max_over_ranks(seconds)
            # The step's time first: a request's verdict then weighs its tokens against this step too.
            # Not that of a step that captured a graph or caught an SSM up: the next ones will not.
            size = self.ladder.sizes[self._size_index] if drafted else 0
            self._last_draft = ([r.id for r in requests], size) if size else None
            if one_off.count() == one_offs:
                self.controller.record_step(seconds, len(requests), size)
            for request_id, tokens in drafted:
                self.controller.record_request(request_id, tokens, len(requests))

    def _retire(self) -> list[Request]:
        finished = self.scheduler.retire_finished()
        for request in finished:
            self._release(request)
        return finished

    # --- plain steps in flight (engine/in_flight.py) ----------------------------------------------

    def _queue_plain(self, requests: list[Request], one_offs: int, start: float,
                     device_tokens: torch.Tensor | None = None, refills: int = 0) -> InFlightStep:
        """Queue a plain step (from the requests' last tokens, or from `device_tokens` [B, 1], the
        step before's, not yet on the host) and return it in flight. `refills`: the tree size of the
        speculative step just before, for the same requests (0: none)."""
        targets = self._plain_pass(requests, device_tokens)
        # A plain step's one new entry is kept whatever its token turns out to be: committed now, so that
        # the next step can be queued behind it.
        self.llm.commit_all([(r.slot, [0]) for r in requests])
        return InFlightStep(requests, targets, one_offs, start, refills=refills)

    def _land(self, step: InFlightStep) -> list[Request]:
        """Read `step` back and commit its tokens, having queued the step after it where that one follows on."""
        self._in_flight = None
        following = self._chain(step)
        live = 0
        for r, token in zip(step.requests, step.tokens()):
            if r.status is not RequestStatus.RUNNING:
                continue  # ended a step ago (EOS) or aborted since: one token too many
            r.stats.num_llm_steps += 1
            r.append([token], self.eos_token_ids)
            live += 1
        seconds = time.perf_counter() - step.start
        if self.step_log is not None:
            self.step_log.append((len(step.requests), 0, seconds, live))
        if self.controller is not None and one_off.count() == step.one_offs:
            if step.refills:
                # Queued after a speculative step, with nothing ahead of it on the device: it takes longer
                # than the plain steps chained in flight, and the difference is the speculative step's.
                self.controller.record_refill(seconds, len(step.requests), step.refills)
            else:
                self.controller.record_step(seconds, len(step.requests), 0)
        finished = self._retire()
        if following is not None:
            following.start = time.perf_counter()  # until now the device was busy with `step`
            self._in_flight = following
        return finished

    def _chain(self, step: InFlightStep) -> InFlightStep | None:
        """Queue the plain step after `step` from its device tokens, where one follows: the same requests
        running, each with a token to go after `step`'s, nobody waiting for a free slot, and no draft due
        (the controller's choice for that step is made here and kept for it)."""
        requests, running = step.requests, self.scheduler.running
        if self.scheduler.waiting and self.scheduler.free_slots:
            return None
        if len(running) != len(requests) or any(a is not b for a, b in zip(running, requests)):
            return None
        if any(r.num_remaining < 2 for r in requests):
            return None
        one_offs, start = one_off.count(), time.perf_counter()
        # Those that may draft once `step`'s token is in (as `_choose_drafting` will see them).
        eligible = [r.id for r in requests if self.ssms and r.num_remaining > 2]
        if eligible:
            if self.controller is None:
                return None  # a fixed tree drafts whenever it can
            size, chosen = self.controller.choose(eligible)
            if size:
                self._chosen_ahead = (eligible, size, chosen)
                return None
        return self._queue_plain(requests, one_offs, start, step.targets[:, None])

    def _release(self, request: Request) -> None:
        self.llm.release(request.slot)
        for ssm in self.ssms:
            ssm.release(request.slot)
        if self.controller is not None:
            self.controller.forget(request.id)

    def run(self) -> None:
        """Step until every registered request has finished."""
        while self.has_work():
            self.step()

    # --- the step's stages -------------------------------------------------------------------------

    def _prefill(self, requests: list[Request]) -> None:
        chunks = [Chunk.chain(r.slot, r.prompt_tokens) for r in requests]
        logits = self.llm.forward(chunks)
        tokens = self._node_targets(torch.cat(logits), requests, [_ROOT] * len(requests)).tolist()
        self.llm.commit_all([(r.slot, list(range(len(chunk.tokens)))) for r, chunk in zip(requests, chunks)])
        for r, token in zip(requests, tokens):
            r.append([token], self.eos_token_ids)

    def _choose_drafting(self, requests: list[Request]) -> list[int]:
        """Indexes of the requests that speculate this step; sets the tree they draft (`_size_index`)."""
        # The tree may be as deep as the tokens still allowed, minus the LLM's own token.
        drafting = [i for i, r in enumerate(requests) if self.ssms and r.num_remaining > 1]
        self._size_index = len(self.ladder.sizes) - 1 if self.ladder else 0
        if self.controller is not None and drafting:
            ids = [requests[i].id for i in drafting]
            ahead, self._chosen_ahead = self._chosen_ahead, None
            size, chosen = ahead[1:] if ahead is not None and ahead[0] == ids else self.controller.choose(ids)
            drafting = [i for i in drafting if requests[i].id in chosen] if size else []
            self._size_index = self.ladder.sizes.index(size) if size else self._size_index
        return drafting

    def _drafter(self, ssm_index: int, size_index: int | None = None, catch_up: int | None = None) -> DeviceTreeDrafter:
        """SSM `ssm_index`'s drafter of this step's tree, or of the ladder's `size_index` (each size keeps
        its own CUDA graphs); `catch_up`: chain tokens it feeds in its graph (default: the drafter's)."""
        key = (ssm_index, self._size_index if size_index is None else size_index, catch_up)
        if key not in self._drafters:
            shape = self.ladder.shapes[key[1]]
            self._drafters[key] = (DeviceTreeDrafter(self.ssms[ssm_index], shape) if catch_up is None
                                   else DeviceTreeDrafter(self.ssms[ssm_index], shape, catch_up))
        return self._drafters[key]

    def _capture_ladder(self, num_requests: int) -> None:
        """Under the adaptive controller, capture at once the CUDA graphs of every tree size of the ladder
        the first time all of this many requests draft: each size's drafter, verification at every token
        bucket up to the whole tree's (trees cut short near a request's end, plain steps, steps where some
        requests draft), and the SSMs' catch-up passes after plain steps; drafters and catch-ups at every
        smaller batch bucket too, for steps where only some of the requests draft (the controller drafts
        for those a tree pays for, and probes a few); and run the LLM's eager logits once at every row
        count these passes produce. Captured on first use instead, each size's first step would capture
        inside whatever run the controller first tries it in, a timed one after a benchmark's warm-up as
        likely as not (on an H200, 19 graphs were captured inside the timed runs at batch 4). This step
        captures them all and is not timed (`one_off`)."""
        if self.llm.graphs is None or num_requests in self._ladder_captured:
            return
        self._ladder_captured.add(num_requests)
        batches = [b for b in self.llm.graphs.batch_buckets if b < num_requests] + [num_requests]
        for batch in batches:
            for size_index in range(len(self.ladder.sizes)):
                for s in range(len(self.ssms)):
                    self._drafter(s, size_index).capture(batch)
                    if self.overlap_trees and batch == num_requests:  # drafts launched ahead (`_draft_ahead`)
                        self._drafter(s, size_index, catch_up=self._ahead_width).capture(batch)
            for runner in [r for r in self.ssms if r.graphs is not None]:
                runner.graphs.capture_up_to(batch, REPLAYED_CATCH_UP)
        # The LLM verifies for every request of the step, drafting or not, and holds no speculative
        # entries before it does.
        whole_tree = 1 + len(self.ssms) * self.ladder.sizes[-1]
        self.llm.graphs.capture_up_to(num_requests, whole_tree)
        self.llm.warm_logits(num_requests * whole_tree)

    def _speculate_top_k(
        self, requests: list[Request], drafting: list[int], ahead: "_NextDraft | None" = None
    ) -> tuple[list[TokenTree], list[list[SSMDraft]], list[VerifyResult]]:
        """Draft (every SSM a full top-k tree, on the device), verify and read back with one host sync:
        greedy requests take the LLM's argmax at every node, sampled ones a draw (`_node_targets`).

        The SSMs' trees are verified side by side under the shared root, not merged: merging needs the
        tokens on the host. A token both SSMs proposed is verified twice, which changes nothing but cost.
        `drafting`: the requests that draft (`_choose_drafting`); `ahead`: a draft launched for this step
        by the one before (`_draft_ahead`)."""
        if not drafting:
            return self._plain_step(requests)
        if self.controller is not None and len(drafting) == len(requests):
            self._capture_ladder(len(requests))
        shape = self.ladder.shapes[self._size_index]
        device = self.llm.device
        # per SSM: token ids [len(drafting), len(shape)], root first; chain lengths
        drafted, catch_up = self._take_next_draft(requests, drafting, ahead) or ([], [])
        for s, runner in enumerate(self.ssms if not drafted else []):
            slots = [requests[i].slot for i in drafting]
            chains = [requests[i].tokens[runner.num_cached(slot) :] for i, slot in zip(drafting, slots)]
            tokens, chain_lengths = self._drafter(s).draft(chains, slots)
            drafted.append(tokens)
            catch_up.append(chain_lengths)
        num_ssms = len(drafted)
        per_tree = len(shape) - 1 if num_ssms else 0
        keeps, chunks = [], []
        draft_row = {i: k for k, i in enumerate(drafting)}
        for i, r in enumerate(requests):
            # The tree may be as deep as the tokens still allowed, minus the LLM's own token.
            keep = shape.num_nodes_within(r.num_remaining - 1) - 1 if i in draft_row else 0
            parents, rows = self._verified_tree(num_ssms, keep)
            keeps.append(keep)
            # The root's id is known here; drafted ids come from the device (placeholders on the host).
            chunks.append(Chunk(r.slot, [r.last_token] + [0] * (len(parents) - 1), parents, rows))
        device_tokens = None
        if num_ssms and len(drafting) == len(requests) and min(keeps) == per_tree:
            # Every request verifies every SSM's whole tree under the shared root: the drafts, side by side.
            device_tokens = torch.cat([drafted[0]] + [tokens[:, 1:] for tokens in drafted[1:]], dim=1)
        elif num_ssms:  # some trees cut short or missing: gather each request's row from the drafts
            sources = [upload(torch.tensor([r.last_token for r in requests]), device)]
            sources += [tokens.flatten() for tokens in drafted]
            gather = []
            for i in range(len(requests)):
                index = [i]
                for s in range(num_ssms if i in draft_row else 0):
                    first = len(requests) + (s * len(drafting) + draft_row[i]) * len(shape) + 1
                    index += range(first, first + keeps[i])
                gather.append(index)
            width = max(len(g) for g in gather)
            index = torch.tensor([g + [0] * (width - len(g)) for g in gather])
            device_tokens = torch.cat(sources)[upload(index, device)]
        logits = self.llm.forward_rows(chunks, device_tokens)  # one LLM pass over every node of every tree
        targets = self._node_targets(logits, requests, [chunk.parents for chunk in chunks])
        plan = self._plan_draft_ahead(requests, drafting, keeps, device_tokens, targets, chunks[0].parents)
        readback, launched = self._read_back(requests, targets, drafted, plan, catch_up)
        self._next_draft = launched
        if launched:
            readback, device_lengths = readback[: -len(requests)], readback[-len(requests) :]
        targets, tokens = readback[: len(targets)], readback[len(targets) :]

        trees, drafts, results, offset = [], [], [], 0
        for i, (r, chunk, keep) in enumerate(zip(requests, chunks, keeps)):
            ssm_drafts = []
            tree_tokens = [r.last_token]
            for s in range(num_ssms if i in draft_row else 0):
                first = (s * len(drafting) + draft_row[i]) * len(shape) + 1
                own_parents, cache_index, merged_index, own_nodes = self._draft_indexes(keep, catch_up[s][draft_row[i]], s)
                own = TokenTree([r.last_token] + tokens[first : first + keep], own_parents)
                ssm_drafts.append(SSMDraft(own, catch_up[s][draft_row[i]], cache_index, merged_index, own=own_nodes))
                tree_tokens += own.tokens[1:]
            tree = TokenTree(tree_tokens, chunk.parents)
            trees.append(tree)
            drafts.append(ssm_drafts)
            own_targets = targets[offset : offset + len(tree)]
            if r.sampling.do_sample and num_ssms > 1:
                own_targets = shared_draws(tree, own_targets)
            results.append(verify_greedy_targets(tree, own_targets))
            offset += len(tree)
        if launched:
            lengths = [len(result.accepted) for result in results]
            if lengths == device_lengths:
                launched.lengths = lengths
            else:  # cannot happen unless the device's walk and the host's part ways: drop the draft
                self._next_draft = None
                self.next_draft_misses += 1
        return trees, drafts, results

    def _read_back(self, requests: list[Request], targets: torch.Tensor, drafted: list[torch.Tensor],
                   plan: tuple | None, catch_up: list[list[int]]) -> tuple[list[int], "_NextDraft | None"]:
        """The step's one host sync: the LLM's targets, then the drafts, read back. With a `plan`
        (`_plan_draft_ahead`) the read-back is queued first, then the next step's draft launched behind
        it, and the device's chain lengths come last; returns the values and that draft."""
        flat = torch.cat([targets, *[tokens.flatten() for tokens in drafted]] + ([plan[2]] if plan else []))
        if not plan:
            return flat.tolist(), None
        queued = QueuedReadBack(flat)
        launched = self._draft_ahead(requests, plan, catch_up)
        return queued.tolist(), launched

    def _plan_draft_ahead(self, requests: list[Request], drafting: list[int], keeps: list[int],
                          device_tokens: torch.Tensor | None, targets: torch.Tensor,
                          parents: list[int]) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """Whether to launch the next step's draft now, from this step's verification still on the device
        (`EngineConfig.overlap_tree_steps`), and what from: the tree size it drafts, and the accepted path
        and the LLM's token, found there (spec/device_accept.py), each SSM's next catch-up chain
        ([B, tree depth + 1] tokens, [B] lengths). Only where the next step will surely
        draft for the same requests (the fixed tree, or the controller's choice for the next step, made
        now; a token left to draft for after this step's; nobody waiting for a slot);
        `_take_next_draft` checks the rest once this step is read back."""
        shape = self.ladder.shapes[self._size_index]
        if not (self.overlap_trees and self.ssms and len(drafting) == len(requests)
                and min(keeps) == len(shape) - 1 and device_tokens is not None
                # Sampled requests' draws are the targets as they are for a single SSM (several share
                # draws along repeated paths on the host: `shared_draws`).
                and (len(self.ssms) == 1 or not any(r.sampling.do_sample for r in requests))
                and not (self.scheduler.waiting and self.scheduler.free_slots)):
            return None
        size_index = self._size_index
        if self.controller is not None:  # the next step's choice, made now (and kept for it: `_chosen_ahead`)
            ids = [r.id for r in requests]
            size, chosen = self.controller.choose(ids)
            self._chosen_ahead = (ids, size, chosen)
            if not size or len(chosen) != len(ids):
                return None
            size_index = self.ladder.sizes.index(size)
        if not all(r.num_remaining - (shape.depth + 1) > 1 for r in requests):
            return None  # some request may have no token left to draft for after this step
        key = (self._size_index, len(self.ssms))  # every request verifies every SSM's whole tree
        paths = self._paths.get(key)
        if paths is None:
            paths = self._paths[key] = GreedyPaths(parents, self.llm.device)
        chains, lengths, _ = paths.chains(device_tokens, targets.view(len(requests), -1))
        return size_index, chains, lengths

    def _draft_ahead(self, requests: list[Request], plan: tuple[int, torch.Tensor, torch.Tensor],
                     catch_up: list[list[int]]) -> "_NextDraft":
        """Launch the next step's draft planned by `_plan_draft_ahead`: each SSM fed its chain after the
        entries this step's commit keeps."""
        size_index, chains, lengths = plan
        slots = [r.slot for r in requests]
        tokens, bases = [], []
        width = self._ahead_width
        if chains.shape[1] < width:
            chains = torch.cat([chains, chains.new_zeros(len(requests), width - chains.shape[1])], dim=1)
        for s, runner in enumerate(self.ssms):
            # This step's commit keeps the SSM's chain only (`_commit`): the next chain follows it.
            slot_bases = [runner.num_cached(slot) + n for slot, n in zip(slots, catch_up[s])]
            drafter = self._drafter(s, size_index, catch_up=width)
            tokens.append(drafter.draft_from(chains, lengths, slots, slot_bases))
            bases.append(slot_bases)
        self._drafting_ahead = True
        return _NextDraft([r.id for r in requests], size_index, tokens, bases)

    def _take_next_draft(self, requests: list[Request], drafting: list[int],
                         ahead: "_NextDraft | None") -> tuple[list, list] | None:
        """`ahead`, the draft launched for this step, if it still is this step's: the same requests, all
        drafting the same tree (cut short where a request has few tokens left), each SSM's cache where the
        draft assumed. Records its entries."""
        if ahead is None:
            return None
        slots = [r.slot for r in requests]
        if not (ahead.lengths is not None and ahead.request_ids == [r.id for r in requests]
                and ahead.size_index == self._size_index and len(drafting) == len(requests)
                and all([runner.num_cached(slot) for slot in slots] == bases
                        for runner, bases in zip(self.ssms, ahead.bases))):
            self.next_draft_misses += 1
            return None
        for s in range(len(self.ssms)):
            self._drafter(s, catch_up=self._ahead_width).record_chains(slots, ahead.lengths)
        self.next_drafts_taken += 1
        return ahead.tokens, [ahead.lengths] * len(self.ssms)

    @staticmethod
    def _node_targets(logits: torch.Tensor, requests: list[Request], trees: list[list[int]],
                      ahead: int = 0) -> torch.Tensor:
        """The LLM's token at every node of every request's tree (`trees`: their parent lists; `logits`
        [nodes, V], request after request), on the device: its argmax, or for a sampled request a draw from
        its sampling distribution at the uniform of the output position the node's token would take
        (`Request.position_uniforms`, `ahead` positions on). Verification then descends where a node's
        token is a child's: for top-k children that is rule 3 of spec/verify.py (each visited node's draw
        is a fresh draw from its distribution; the nodes of one depth, of which the walk visits one, share
        a uniform), and a sampled request's tokens are those incremental sampling would draw."""
        if not any(r.sampling.do_sample for r in requests):
            return logits.argmax(-1)
        uniforms, depths_by_tree = [], {}  # the requests of a step mostly share one parent list
        for r, parents in zip(requests, trees):
            if r.sampling.do_sample:
                depths = depths_by_tree.get(id(parents))
                if depths is None:
                    depths = depths_by_tree[id(parents)] = depths_of(parents)
                at = r.position_uniforms(max(depths) + 1, ahead)
                uniforms += [at[depth] for depth in depths]
            else:
                uniforms += [0.0] * len(parents)
        return draw_tokens(logits, [(r.sampling, len(parents)) for r, parents in zip(requests, trees)],
                           torch.tensor(uniforms))

    # Index lists that depend only on this step's tree and a request's cut of it, the same for most requests
    # of most steps: built once (read-only; at batch 64, 20 nodes, they were a tenth of the step's host work).

    def _verified_tree(self, num_ssms: int, keep: int) -> tuple[list[int], list[int]]:
        """Parents of the tree a request verifies (every SSM's first `keep` nodes under one root), and its
        logit rows (every node)."""
        key = ("verified", self._size_index, num_ssms, keep)
        if key not in self._index_lists:
            shape = self.ladder.shapes[self._size_index]
            parents = [-1]
            for _ in range(num_ssms):
                offset = len(parents) - 1
                parents += [0 if p == 0 else offset + p for p in shape.parents[1 : keep + 1]]
            self._index_lists[key] = (parents, list(range(len(parents))))
        return self._index_lists[key]

    def _draft_indexes(self, keep: int, num_catch_up: int, ssm: int) -> tuple[list[int], list[int], list[int], dict]:
        """For SSM `ssm`'s draft cut to `keep` nodes after a catch-up chain of `num_catch_up`: its tree's
        parents, each node's cache entry (-1: a leaf, never fed), its index in the verified tree, and the
        inverse of that (verified node -> the draft's)."""
        key = ("draft", self._size_index, keep, num_catch_up, ssm)
        if key not in self._index_lists:
            shape, n = self.ladder.shapes[self._size_index], num_catch_up
            # The drafter fed the nodes with children: their entries follow the catch-up chain.
            cache_index = [n - 1] + [n + j - 1 if shape.children[j] else -1 for j in range(1, keep + 1)]
            first = 1 + ssm * keep  # the SSMs' trees sit side by side under the root
            merged = [0] + list(range(first, first + keep))
            self._index_lists[key] = (list(shape.parents[: keep + 1]), cache_index, merged,
                                      {m: o for o, m in enumerate(merged)})
        return self._index_lists[key]

    def _plain_pass(self, requests: list[Request], device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One LLM pass over each request's last token (or `device_tokens` [B, 1], a step in flight's, not
        yet on the host); returns each request's next token on the device."""
        tokens = [[r.last_token] for r in requests] if device_tokens is None else [[0]] * len(requests)
        # One parent list for every chunk: the runner sees at once that all rows are alike.
        logits = self.llm.forward_rows([Chunk(r.slot, t, _ROOT, _ROOT_ROWS) for r, t in zip(requests, tokens)],
                                       device_tokens)
        # Sampled requests draw at the uniform of the position after the token still in flight, if any.
        return self._node_targets(logits, requests, [_ROOT] * len(requests), ahead=int(device_tokens is not None))

    def _plain_step(self, requests: list[Request]) -> tuple[list[TokenTree], list[list[SSMDraft]], list[VerifyResult]]:
        """One token per request (the argmax, or a draw), nothing drafted: incremental decoding, and the
        controller's plain steps. Host work here is every plain step's overhead on top of the LLM's pass, so none is spent
        on trees."""
        roots = [r.last_token for r in requests]
        targets = self._plain_pass(requests).tolist()  # the step's one host sync
        trees = [TokenTree([token], [-1]) for token in roots]
        return trees, [[] for _ in requests], [VerifyResult([0], target, []) for target in targets]

    def _draft(self, requests: list[Request]) -> tuple[list[TokenTree], list[list[SSMDraft]]]:
        """Per request: the merged tree, and per SSM its own draft (for cache bookkeeping)."""
        drafting = self._choose_drafting(requests)
        per_ssm: list[list[SSMDraft]] = []
        for runner in self.ssms:
            draft_requests = [
                DraftRequest(requests[i].slot, requests[i].tokens, requests[i].num_remaining - 1,
                             requests[i].sampling, requests[i].generator)
                for i in drafting
            ]
            per_ssm.append(expand(runner, draft_requests, self.ladder.shapes[self._size_index]))
        trees = [TokenTree.root_only(r.last_token) for r in requests]
        drafts: list[list[SSMDraft]] = [[] for _ in requests]
        for k, i in enumerate(drafting):
            drafts[i] = [ssm_drafts[k] for ssm_drafts in per_ssm]
            trees[i], node_maps = merge_trees([d.tree for d in drafts[i]])
            for draft, node_map in zip(drafts[i], node_maps):
                draft.merged_index = node_map
        return trees, drafts

    def _verify(self, requests: list[Request], trees: list[TokenTree]) -> list[VerifyResult]:
        chunks = [Chunk(r.slot, t.tokens, t.parents, list(range(len(t)))) for r, t in zip(requests, trees)]
        logits = self.llm.forward(chunks)  # one LLM pass over every node of every tree
        # Greedy trees and bare roots (plain decoding, sampled or not) need one token per node: chosen for
        # all of them at once, with one host sync. Sampled trees go through speculative sampling.
        batched = [i for i, (r, t) in enumerate(zip(requests, trees)) if not r.sampling.do_sample or len(t) == 1]
        targets = choose_tokens(
            torch.cat([logits[i] for i in batched]),
            [requests[i].sampling for i in batched for _ in range(len(trees[i]))],
            [requests[i].generator for i in batched for _ in range(len(trees[i]))],
        ) if batched else []
        per_request: dict[int, list[int]] = {}
        offset = 0
        for i in batched:
            per_request[i] = targets[offset : offset + len(trees[i])]
            offset += len(trees[i])
        results = []
        for i, (r, tree) in enumerate(zip(requests, trees)):
            if i in per_request:
                results.append(verify_greedy_targets(tree, per_request[i]))
            else:
                probs = logits_to_probs(logits[i], r.sampling).cpu()
                results.append(verify_stochastic(tree, probs, r.generator))
        return results

    def _commit(
        self, requests: list[Request], trees: list[TokenTree], drafts: list[list[SSMDraft]], results: list[VerifyResult]
    ) -> list[tuple[int, dict[int, int]]]:
        """Keep every request's accepted tokens; returns, for those that drafted (under the adaptive controller),
        (request id, tokens committed by tree size: the size drafted and the smaller ones of the ladder)."""
        # Tree nodes were fed to the LLM in node order, so node index == speculative cache entry. Each
        # model compacts the kept entries of every request in one move; the LLM's waits for its next pass,
        # so that the next step's drafting is launched first (the move's host work, ~60 us on an H200's
        # host, then runs while the device drafts).
        self.llm.commit_all([(r.slot, result.accepted) for r, result in zip(requests, results)], defer_moves=True)
        owns = [[d.own_nodes() for d in ssm_drafts] for ssm_drafts in drafts]  # merged node -> SSM's node
        ahead, self._drafting_ahead = self._drafting_ahead, False
        for s, runner in enumerate(self.ssms if any(drafts) else []):
            # With the next draft launched ahead, its chain (the accepted path) follows this step's chain.
            runner.commit_all([(r.slot, list(range(ssm_drafts[s].num_catch_up)) if ahead
                                else ssm_drafts[s].entries_to_keep(result.accepted, own[s]))
                               for r, ssm_drafts, result, own in zip(requests, drafts, results, owns) if ssm_drafts])
        drafted = []
        for r, tree, ssm_drafts, result, own in zip(requests, trees, drafts, results, owns):
            r.stats.num_llm_steps += 1
            r.stats.num_speculated += len(tree) - 1
            r.stats.num_accepted += len(result.accepted) - 1
            new_tokens = result.new_tokens(tree)
            if ssm_drafts and self.controller is not None:
                drafted.append((r.id, self._tokens_by_size(ssm_drafts, own, result)))
            r.append(new_tokens, self.eos_token_ids)
        return drafted

    def _tokens_by_size(self, ssm_drafts: list[SSMDraft], owns: list[dict[int, int]],
                        result: VerifyResult) -> dict[int, int]:
        """Tokens this step committed and, by the nesting of the ladder's trees, what each smaller tree would
        have committed: exact under greedy verification, an estimate under sampling."""
        places = self.ladder.places[self._size_index]
        matched = []
        for node, depth in result.matched:
            place = min(places[d.shape_nodes[own[node]] if d.shape_nodes else own[node]]
                        for d, own in zip(ssm_drafts, owns) if node in own)
            matched.append((place, depth))
        return self.ladder.tokens_by_size(self._size_index, matched)

