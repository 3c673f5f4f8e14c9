"""Plain greedy steps queued ahead of their read-back (engine/in_flight.py) give exactly what plain steps
read back one by one give: EOS learned a step late, requests joining, ending by length and aborted while
a step is in flight."""

from __future__ import annotations

import pytest

from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.engine.request_manager import RequestManager

from .test_speculative import FITTED_TREE, PROMPTS, CyclingSizes, assert_greedy_equivalent, random_models  # noqa: F401

MORE_PROMPTS = PROMPTS + [[9, 8, 7, 6], [33, 34]]
MAX_NEW = [7, 20, 13, 1, 16, 2]  # 1 and 2: a request that ends at its prefill, and one after a single step


def serve(llm, ssms, overlap: bool, eos=(), cycling=False, abort_after=None):
    """Serve MORE_PROMPTS three at a time (the rest join as others end); returns the requests, and how
    many steps were queued from the step before's device tokens."""
    manager = RequestManager(llm, ssms, EngineConfig(max_batch_size=3, max_sequence_length=128, overlap_plain_steps=overlap),
                             SpeculationConfig(mode="tree" if ssms else "incremental", tree=FITTED_TREE if ssms else None),
                             eos_token_ids=list(eos))
    if cycling:
        manager.controller = CyclingSizes((0, *manager.ladder.sizes))  # two plain steps, then each size in turn
    chained = []
    chain = manager._chain
    manager._chain = lambda step: chained.append(chain(step)) or chained[-1]
    ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=n)) for p, n in zip(MORE_PROMPTS, MAX_NEW)]
    steps, aborted = 0, None
    while manager.has_work():
        manager.step()
        steps += 1
        if steps == abort_after:
            assert manager._in_flight is not None  # the abort falls while a step is in flight
            aborted = manager.abort_request(manager._in_flight.requests[0].id)
    requests = [manager.requests.get(i) or aborted for i in ids]
    return requests, sum(step is not None for step in chained)


def test_incremental_decoding_in_flight_gives_the_same_tokens(random_models):
    llm, _ = random_models
    reference, _ = serve(llm, [], overlap=False)
    # An EOS token that some request produces mid-way: that request ends a step before the engine knows.
    eos = reference[1].output_tokens[4]
    reference, none_chained = serve(llm, [], overlap=False, eos=[eos])
    got, chained = serve(llm, [], overlap=True, eos=[eos])
    assert none_chained == 0 and chained > 10
    for g, r in zip(got, reference):
        assert (g.output_tokens, g.finish_reason, g.stats.num_llm_steps) == (r.output_tokens, r.finish_reason,
                                                                            r.stats.num_llm_steps)
    assert reference[1].finish_reason == "stop" and len(reference[1].output_tokens) <= 5
    assert [len(r.output_tokens) for r in got if r.finish_reason == "length"] == [
        n for r, n in zip(got, MAX_NEW) if r.finish_reason == "length"]


def test_plain_steps_in_flight_between_drafts_keep_outputs_exact(random_models):
    """The adaptive engine's plain steps go in flight; a draft due ends the chain, and the controller's
    choice made while chaining serves the step it was made for."""
    llm, ssms = random_models
    expected, _ = serve(llm, [], overlap=False)
    got, chained = serve(llm, ssms[:1], overlap=True, cycling=True)
    assert chained > 0
    assert sum(r.stats.num_accepted for r in got) > 0
    for prompt, g, e in zip(MORE_PROMPTS, got, expected):
        assert len(g.output_tokens) == len(e.output_tokens)
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)


@pytest.mark.parametrize("abort_after", [3, 6])
def test_a_request_aborted_while_its_step_is_in_flight_leaves_the_others_unchanged(random_models, abort_after):
    llm, _ = random_models
    reference, _ = serve(llm, [], overlap=False)
    got, _ = serve(llm, [], overlap=True, abort_after=abort_after)
    aborted = [g for g in got if g.finish_reason == "abort"]
    assert len(aborted) == 1
    for g, r in zip(got, reference):
        if g.finish_reason == "abort":
            assert r.output_tokens[: len(g.output_tokens)] == g.output_tokens
        else:
            assert g.output_tokens == r.output_tokens


@pytest.mark.parametrize("sampled_children", [False, True])
def test_sampled_plain_steps_in_flight_draw_the_same_tokens(random_models, sampled_children):
    """Sampled requests' plain steps go in flight too: each token is drawn on the device at the uniform of
    its output position, which the host knows ahead, so a seed gives the same tokens either way. With
    nothing to draft (incremental decoding), children drawn on the host change nothing: there are none."""
    llm, _ = random_models

    def run(overlap: bool):
        manager = RequestManager(llm, [], EngineConfig(max_batch_size=3, max_sequence_length=128, overlap_plain_steps=overlap),
                                 SpeculationConfig(mode="incremental", sampled_children=sampled_children), eos_token_ids=[])
        chained = []
        chain = manager._chain
        manager._chain = lambda step: chained.append(chain(step)) or chained[-1]
        ids = [manager.register_new_request(p, sampling=GenerationConfig(
            do_sample=i % 2 == 0, temperature=0.8, top_p=0.9, seed=i, max_new_tokens=n))
            for i, (p, n) in enumerate(zip(MORE_PROMPTS, MAX_NEW))]
        manager.run()
        return [manager.requests[i].output_tokens for i in ids], sum(step is not None for step in chained)

    (reference, _), (got, chained) = run(False), run(True)
    assert got == reference and chained > 10


class RecordingSizes(CyclingSizes):
    """CyclingSizes that keeps what the engine tells it of each step: ("step" | "refill", size)."""

    def __init__(self, sizes):
        super().__init__(sizes)
        self.records = []

    def record_step(self, seconds, batch_size, size):
        self.records.append(("step", size))

    def record_refill(self, seconds, batch_size, size):
        self.records.append(("refill", size))


def test_a_plain_step_queued_after_a_draft_is_charged_to_the_draft(random_models):
    """With plain steps in flight, the plain step right after a speculative one starts with nothing queued
    ahead of it: its time goes to the controller as that tree size's refill, not as a plain step's."""
    llm, ssms = random_models
    manager = RequestManager(llm, ssms[:1], EngineConfig(max_batch_size=1, max_sequence_length=128, overlap_plain_steps=True),
                             SpeculationConfig(tree=FITTED_TREE), eos_token_ids=[])
    full = manager.ladder.sizes[-1]
    # A plain step, then the whole tree twice (a draft right after plain steps has the SSM catch up on
    # their tokens, one-off work that is not timed; the second is timed).
    manager.controller = RecordingSizes((0, full, full))
    manager.register_new_request(PROMPTS[0], sampling=GenerationConfig(max_new_tokens=40))
    manager.run()
    records = manager.controller.records
    refills = [i for i, (kind, _) in enumerate(records) if kind == "refill"]
    assert len(refills) >= 3
    assert all(records[i] == ("refill", full) and records[i - 1] == ("step", full) for i in refills)
    assert not any(a == ("step", full) and b == ("step", 0) for a, b in zip(records, records[1:]))
