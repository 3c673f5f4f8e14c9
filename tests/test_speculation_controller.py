"""The adaptive controller speculates where the draft pays and backs off where it does not."""

from __future__ import annotations

from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.engine.request_manager import RequestManager
from specinfer.engine.speculation_controller import FIRST_BACKOFF, MAX_BACKOFF, SpeculationController
from specinfer.models.loader import load_model

from .conftest import save_random_llama
from .test_speculative import PROMPTS, assert_greedy_equivalent, generate


def drive(controller: SpeculationController, tokens_per_speculative_step: int, steps: int) -> int:
    speculated = 0
    for _ in range(steps):
        if controller.choose([0]):
            speculated += 1
            controller.record_request(0, tokens_per_speculative_step)
    return speculated


def test_backs_off_a_draft_that_does_not_pay():
    speculated = drive(SpeculationController(fixed_cost_ratio=3.0), tokens_per_speculative_step=1, steps=400)
    # Probes at growing intervals (4, 16, 64, MAX_BACKOFF), then one every MAX_BACKOFF steps.
    assert speculated <= 5 + 400 // MAX_BACKOFF


def test_keeps_a_draft_that_pays():
    assert drive(SpeculationController(fixed_cost_ratio=2.0), tokens_per_speculative_step=4, steps=100) == 100


def test_a_large_batch_with_a_useless_draft_runs_almost_only_plain_steps():
    controller = SpeculationController(fixed_cost_ratio=2.0)
    ids = list(range(16))
    speculative_steps = 0
    for _ in range(400):
        chosen = controller.choose(ids)
        speculative_steps += bool(chosen)
        for rid in chosen:
            controller.record_request(rid, 1, len(ids))
    # Probes of the 16 requests fall on the same few steps instead of making every step speculative.
    assert speculative_steps <= 5 + 400 // MAX_BACKOFF
    # A request arriving now starts from the pooled gain: it does not force a speculative step.
    assert not controller.choose(ids[1:] + [99]) or controller.step % FIRST_BACKOFF == 0


def test_speculates_at_small_batches_and_stops_where_compute_is_no_longer_free():
    controller = SpeculationController()
    for batch, ratio in ((1, 1.5), (64, 4.0)):  # a tree step costs 1.5 plain steps at batch 1, 4 at batch 64
        for _ in range(3):
            controller.record_step(0.01, batch, speculative=False)
            controller.record_step(0.01 * ratio, batch, speculative=True)
    for rid in range(64):
        controller.record_request(rid, 3, 1)  # drafts giving 3 tokens per step
    assert controller.choose([0]) == {0}  # 3 - 1 > 1.5 - 1
    assert controller.choose(list(range(64))) == set() or controller.step % FIRST_BACKOFF == 0  # 64*2 < 64*3


def test_measures_cost_ratio_from_step_times():
    controller = SpeculationController()
    assert controller.cost_ratio(1) == 1.0
    controller.record_step(0.010, 1, speculative=False)
    controller.record_step(0.030, 1, speculative=True)
    assert abs(controller.cost_ratio(1) - 3.0) < 1e-9
    controller.record_step(0.010, 32, speculative=False)
    controller.record_step(0.050, 32, speculative=True)
    assert abs(controller.cost_ratio(32) - 5.0) < 1e-9 and abs(controller.cost_ratio(2) - 3.0) < 1e-9


def test_adaptive_engine_skips_a_useless_draft_and_stays_exact(tmp_path):
    save_random_llama(tmp_path / "llm", seed=0)
    save_random_llama(tmp_path / "unrelated", seed=5)
    llm, ssm = load_model(tmp_path / "llm"), load_model(tmp_path / "unrelated")
    manager = RequestManager(llm, [ssm], EngineConfig(max_batch_size=4, max_sequence_length=128),
                             SpeculationConfig(expansion=(1, 1, 1)), eos_token_ids=[])
    manager.controller = SpeculationController(fixed_cost_ratio=2.0)
    ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=40)) for p in PROMPTS]
    manager.run()
    expected = generate(llm, [], PROMPTS, mode="incremental", max_new=40)
    for i, prompt, e in zip(ids, PROMPTS, expected):
        r = manager.requests[i]
        assert_greedy_equivalent(llm, prompt, r.output_tokens, e.output_tokens)
        assert r.stats.num_speculated < 3 * 12  # speculated on a handful of the ~40 steps only


def test_a_draft_far_from_paying_waits_the_longest_back_off_at_once():
    """A CPU-like cost: a speculative step costs 6.5 plain steps and yields 2 tokens. After the first
    plain step and two timed speculative ones the controller stops probing for MAX_BACKOFF steps."""
    controller = SpeculationController()
    speculative_steps = []
    for step in range(1, 101):
        chosen = controller.choose([0])
        controller.record_step(0.65 if chosen else 0.1, 1, speculative=bool(chosen))
        if chosen:
            speculative_steps.append(step)
            controller.record_request(0, 2, 1)
    assert speculative_steps[0] == 2  # the first step is plain: the speculative one is weighed against it
    assert len(speculative_steps) == 2, speculative_steps


def test_a_draft_that_pays_is_not_written_off_by_one_slow_first_step():
    """The first speculative step may capture CUDA graphs (100x slower once): no verdict from it alone."""
    controller = SpeculationController()
    speculated = 0
    for _ in range(60):
        chosen = controller.choose([0])
        seconds = (1.0 if speculated == 0 else 0.015) if chosen else 0.01  # then 1.5 plain steps, for 3 tokens
        controller.record_step(seconds, 1, speculative=bool(chosen))
        if chosen:
            speculated += 1
            controller.record_request(0, 3, 1)
    assert speculated > 40
