"""Offloading on the CPU: the streaming code path (host copies into two slots, weights swapped per block)
gives logits identical to the resident model, and speculation on top stays exact."""

from __future__ import annotations

import pytest
import torch

from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.engine.offload import _nbytes, offload
from specinfer.errors import SpecInferError
from specinfer.models.early_exit import early_exit_draft
from specinfer.models.loader import load_model

from .conftest import save_random_llama
from .test_speculative import PROMPTS, assert_greedy_equivalent, generate


def _budget_for(model, resident_layers: int) -> int:
    blocks = list(model.layers)
    others = _nbytes(model) - sum(_nbytes(b) for b in blocks)
    return others + (resident_layers + 2) * _nbytes(blocks[0])


@pytest.mark.parametrize("num_layers, resident", [(6, 2), (5, 0), (4, 1)])
def test_streamed_layers_give_identical_logits(tmp_path, num_layers, resident):
    save_random_llama(tmp_path / "llm", num_hidden_layers=num_layers)
    resident_model = load_model(tmp_path / "llm")
    streamed_model = offload(load_model(tmp_path / "llm"), torch.device("cpu"), _budget_for(resident_model, resident))
    assert streamed_model.streamer is not None and len(streamed_model.streamer.blocks) == num_layers - resident
    chunks = [Chunk.chain(0, [3, 14, 15, 92, 65]), Chunk.chain(1, [35, 89, 79])]
    a, b = ModelRunner(resident_model, 2, 32), ModelRunner(streamed_model, 2, 32)
    for _ in range(3):  # several passes: the prefetch wraps around to the first streamed layer
        for x, y in zip(a.forward(chunks), b.forward(chunks)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        for runner in (a, b):
            for c in chunks:
                runner.commit(c.slot, list(range(len(c.tokens))))
        chunks = [Chunk.chain(0, [7]), Chunk.chain(1, [8])]
    # Speculation on top, with an early-exit draft that runs only some of the (partly streamed) layers.
    draft = early_exit_draft(streamed_model, 2)
    expected = generate(resident_model, [], PROMPTS, mode="incremental", max_new=16)
    got = generate(streamed_model, [draft], PROMPTS, expansion=(1, 2, 1), max_new=16)
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert_greedy_equivalent(resident_model, prompt, g.output_tokens, e.output_tokens)


def test_budgets_that_cannot_work_are_refused(tmp_path):
    save_random_llama(tmp_path / "llm", num_hidden_layers=4)
    model = load_model(tmp_path / "llm")
    with pytest.raises(SpecInferError, match="cannot hold"):
        offload(model, torch.device("cpu"), _budget_for(model, 0) - 1)
    with pytest.raises(SpecInferError, match="pinned host memory"):
        offload(load_model(tmp_path / "llm"), torch.device("cpu"), _budget_for(model, 1), pinned_budget_bytes=1)
    everything = offload(load_model(tmp_path / "llm"), torch.device("cpu"), 10 * _nbytes(model))
    assert everything.streamer is None
