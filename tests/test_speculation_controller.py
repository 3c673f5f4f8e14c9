"""The adaptive controller speculates where the draft pays and backs off where it does not."""

from __future__ import annotations

from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.engine.request_manager import RequestManager
from specinfer.engine.speculation_controller import MAX_BACKOFF, SpeculationController
from specinfer.models.loader import load_model

from .conftest import save_random_llama
from .test_speculative import PROMPTS, assert_greedy_equivalent, generate


def drive(controller: SpeculationController, tokens_per_speculative_step: int, steps: int) -> int:
    speculated = 0
    for _ in range(steps):
        if controller.should_speculate(0):
            speculated += 1
            controller.record_request(0, tokens_per_speculative_step)
    return speculated


def test_backs_off_a_draft_that_does_not_pay():
    speculated = drive(SpeculationController(cost_ratio=3.0), tokens_per_speculative_step=1, steps=400)
    # Probes at growing intervals (4, 16, 64, MAX_BACKOFF), then one every MAX_BACKOFF steps.
    assert speculated <= 5 + 400 // MAX_BACKOFF


def test_keeps_a_draft_that_pays():
    assert drive(SpeculationController(cost_ratio=2.0), tokens_per_speculative_step=4, steps=100) == 100


def test_measures_cost_ratio_from_step_times():
    controller = SpeculationController()
    assert controller.cost_ratio == 1.0
    controller.record_step(0.010, speculative=False)
    controller.record_step(0.030, speculative=True)
    assert abs(controller.cost_ratio - 3.0) < 1e-9


def test_adaptive_engine_skips_a_useless_draft_and_stays_exact(tmp_path):
    save_random_llama(tmp_path / "llm", seed=0)
    save_random_llama(tmp_path / "unrelated", seed=5)
    llm, ssm = load_model(tmp_path / "llm"), load_model(tmp_path / "unrelated")
    manager = RequestManager(llm, [ssm], EngineConfig(max_batch_size=4, max_sequence_length=128),
                             SpeculationConfig(expansion=(1, 1, 1)), eos_token_ids=[])
    manager.controller = SpeculationController(cost_ratio=2.0)
    ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=40)) for p in PROMPTS]
    manager.run()
    expected = generate(llm, [], PROMPTS, mode="incremental", max_new=40)
    for i, prompt, e in zip(ids, PROMPTS, expected):
        r = manager.requests[i]
        assert_greedy_equivalent(llm, prompt, r.output_tokens, e.output_tokens)
        assert r.stats.num_speculated < 3 * 12  # speculated on a handful of the ~40 steps only
