"""Greedy tree steps whose next draft is launched from the device before the step is read back
(`EngineConfig.overlap_tree_steps`) give exactly the tokens of steps drafted after their read-back."""

from __future__ import annotations

import pytest

from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.engine.request_manager import RequestManager

from .test_speculative import FITTED_TREE, PROMPTS, random_models  # noqa: F401

MORE_PROMPTS = PROMPTS + [[9, 8, 7, 6], [33, 34]]
MAX_NEW = [60, 81, 13, 1, 76, 54]


def serve(llm, ssms, overlap: bool, eos=(), batch=3):
    manager = RequestManager(llm, ssms, EngineConfig(max_batch_size=batch, max_sequence_length=200, overlap_tree_steps=overlap),
                             SpeculationConfig(tree=FITTED_TREE, adaptive=False), eos_token_ids=list(eos))
    ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=n)) for p, n in zip(MORE_PROMPTS, MAX_NEW)]
    manager.run()
    return [manager.requests[i] for i in ids], manager


@pytest.mark.parametrize("num_ssms", [1, 2])
def test_drafts_launched_ahead_give_the_same_tokens(random_models, num_ssms):
    llm, ssms = random_models
    reference, _ = serve(llm, ssms[:num_ssms], overlap=False)
    eos = reference[1].output_tokens[50]  # a request ending mid-way, a step before the engine knows
    reference, plain = serve(llm, ssms[:num_ssms], overlap=False, eos=[eos])
    got, manager = serve(llm, ssms[:num_ssms], overlap=True, eos=[eos])
    assert plain.next_drafts_taken == 0 and manager.next_drafts_taken > 5
    for g, r in zip(got, reference):
        assert (g.output_tokens, g.finish_reason, g.stats.num_accepted, g.stats.num_llm_steps) == (
            r.output_tokens, r.finish_reason, r.stats.num_accepted, r.stats.num_llm_steps)


def test_alone_every_draft_launched_ahead_is_taken(random_models):
    llm, ssms = random_models
    reference, _ = serve(llm, ssms[:1], overlap=False, batch=1)
    got, manager = serve(llm, ssms[:1], overlap=True, batch=1)
    assert [g.output_tokens for g in got] == [r.output_tokens for r in reference]
    # One request at a time, no EOS: a draft launched ahead is dropped only where a request ends.
    assert manager.next_drafts_taken > 10 and manager.next_draft_misses <= len(MORE_PROMPTS)


def test_under_the_adaptive_controller_drafts_launched_ahead_keep_outputs_exact(random_models):
    """The controller's choice for the next step is made before the read-back and kept for that step;
    sizes change from step to step (CyclingSizes), so drafts ahead of every size are taken."""
    from .test_speculative import CyclingSizes, assert_greedy_equivalent

    llm, ssms = random_models

    def run(overlap: bool):
        manager = RequestManager(llm, ssms[:1], EngineConfig(max_batch_size=3, max_sequence_length=200, overlap_tree_steps=overlap),
                                 SpeculationConfig(tree=FITTED_TREE), eos_token_ids=[])
        manager.controller = AlwaysDrafting(manager.ladder.sizes)
        ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=n)) for p, n in zip(MORE_PROMPTS, MAX_NEW)]
        manager.run()
        return [manager.requests[i] for i in ids], manager

    class AlwaysDrafting(CyclingSizes):
        def choose(self, request_ids):  # each size of the ladder in turn, for every request
            self.step += 1
            size = self.sizes[1:][self.step % (len(self.sizes) - 1)]
            return size, set(request_ids)

    expected, _ = run(False)
    got, manager = run(True)
    assert manager.next_drafts_taken > 5
    for prompt, g, e in zip(MORE_PROMPTS, got, expected):
        assert len(g.output_tokens) == len(e.output_tokens)
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)


def test_sampled_requests_with_drafts_launched_ahead_draw_the_same_tokens(random_models):
    """Sampled requests on top-k trees: each token is drawn at its output position's uniform, whatever the
    draft, so a seed gives the same tokens with drafts launched ahead or not (and with greedy ones beside)."""
    llm, ssms = random_models

    def run(overlap: bool):
        manager = RequestManager(llm, ssms[:1], EngineConfig(max_batch_size=3, max_sequence_length=200, overlap_tree_steps=overlap),
                                 SpeculationConfig(tree=FITTED_TREE, adaptive=False), eos_token_ids=[])
        ids = [manager.register_new_request(p, sampling=GenerationConfig(
            do_sample=i % 3 != 1, temperature=0.8, top_p=0.9, seed=i, max_new_tokens=n))
            for i, (p, n) in enumerate(zip(MORE_PROMPTS, MAX_NEW))]
        manager.run()
        return [manager.requests[i].output_tokens for i in ids], manager

    (expected, _), (got, manager) = run(False), run(True)
    assert manager.next_drafts_taken > 5 and got == expected
