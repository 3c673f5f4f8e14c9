"""Boost-tuning on a tiny random LLM: training raises held-out acceptance, the second SSM is trained on a
different token weighting, and saved SSMs load and keep greedy output exact."""

from __future__ import annotations

import json

import pytest
import torch

from specinfer.boost.data import read_examples
from specinfer.boost.train import coverage
from specinfer.cli import main
from specinfer.models.loader import load_model

from .conftest import save_random_llama
from .test_cli import VOCAB, write_byte_level_tokenizer
from .test_speculative import assert_greedy_equivalent, generate


def save_learnable_llm(folder):
    """A random LLaMA whose attention output is damped, so its next token depends mostly on the current
    one: structure a small SSM can learn from a few dozen answers (a random network is otherwise a hash)."""
    model = save_random_llama(folder, vocab_size=VOCAB, num_hidden_layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.05)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def boosted(tmp_path_factory):
    root = tmp_path_factory.mktemp("boost")
    save_learnable_llm(root / "llm")
    write_byte_level_tokenizer(root / "llm")
    code = main(["boost-tune", "--llm", str(root / "llm"), "--out", str(root / "out"), "--num-ssms", "2",
                 "--init", "random:1,64", "--steps", "250", "--batch-size", "8", "--max-prompts", "80", "--max-held-out", "20",
                 "--max-new-tokens", "24", "--max-sequence-length", "200", "--expansion", "1,1,1", "--learning-rate", "3e-3"])
    assert code == 0
    return root


def test_training_raises_held_out_acceptance(boosted):
    rows = {r["label"]: r for r in json.loads((boosted / "out" / "evaluation.json").read_text())}
    assert set(rows) == {"untrained draft", "ssm1", "ssm2", "merged set"}
    assert rows["ssm1"]["mean_tokens_per_step"] > rows["untrained draft"]["mean_tokens_per_step"] + 0.5
    assert rows["ssm1"]["coverage"] > rows["untrained draft"]["coverage"] + 0.3
    for key in ("coverage", "mean_tokens_per_step"):
        assert rows["merged set"][key] >= max(rows["ssm1"][key], rows["ssm2"][key])
    prompts = json.loads((boosted / "out" / "prompts.json").read_text())
    assert not set(prompts["train"]) & set(prompts["held_out"])


def test_second_ssm_weights_what_the_first_misses(boosted):
    train = read_examples(boosted / "out" / "data" / "train.jsonl")
    ssm1 = load_model(boosted / "out" / "ssm1")
    covered = torch.cat(coverage([ssm1], train, top_k=1, max_length=384))
    # SSM 1 trained on uniform weights; SSM 2's weights single out the tokens SSM 1 misses.
    assert 0 < covered.float().mean() < 1


def test_saved_ssms_keep_greedy_output_exact(boosted):
    llm = load_model(boosted / "llm")
    ssms = [load_model(boosted / "out" / f"ssm{k}", dtype=torch.float32) for k in (1, 2)]
    prompts = [e.tokens[: e.answer_start] for e in read_examples(boosted / "out" / "data" / "held_out.jsonl")[:4]]
    expected = generate(llm, [], prompts, mode="incremental", max_new=16)
    got = generate(llm, ssms, prompts, expansion=(1, 1, 2), max_new=16)
    for prompt, g, e in zip(prompts, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)
    assert sum(r.stats.num_accepted for r in got) > 0
