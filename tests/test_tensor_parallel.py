"""Tensor parallelism over 2 CPU processes (gloo): greedy speculative output equals the single-process
output, for LLaMA (GQA with KV heads split, and with one KV head replicated) and OPT, through the
engine and through the CLI; and over 8 processes for Llama-2-70B's head layout."""

from __future__ import annotations

import json

import pytest
import torch

from specinfer.cli import main
from specinfer.distributed.launch import spawn
from specinfer.exactness import ROUNDING_BOUNDS
from specinfer.models.loader import load_model

from .conftest import save_random_llama, save_random_opt
from .test_cli import VOCAB, write_byte_level_tokenizer
from .test_speculative import PROMPTS, ROUNDING_BOUND, assert_greedy_equivalent, generate

MODELS = {
    "llama-gqa": lambda d: save_random_llama(d, num_attention_heads=4, num_key_value_heads=2),
    "llama-one-kv-head": lambda d: save_random_llama(d, num_attention_heads=4, num_key_value_heads=1, vocab_size=95),
    "opt": lambda d: save_random_opt(d, vocab_size=97),
    # Llama-2-70B's layout at a small width: 64 query heads in 8 groups, MLP 3.5x the width; at tensor
    # parallelism 8 each rank holds one KV head and its 8 query heads, and 1/8 of the vocabulary.
    "llama-70b-heads": lambda d: save_random_llama(d, num_attention_heads=64, num_key_value_heads=8, hidden_size=512,
                                                    intermediate_size=1792, vocab_size=96),
}


def _serve_on_rank(argv: list[str]) -> int:
    """One rank: load its slice of the LLM and a replicated SSM, generate, write what it got."""
    from specinfer.distributed.parallel import from_environment

    llm_dir, ssm_dir, out, device, size = argv
    tp, device = from_environment(int(size), device)
    llm = load_model(llm_dir, device, tp=tp)
    ssm = load_model(ssm_dir, device)
    results = generate(llm, [ssm], PROMPTS, expansion=(1, 2, 1), batch=4, max_new=16, device=device)
    with open(f"{out}.rank{tp.rank}", "w") as f:
        json.dump([r.output_tokens for r in results], f)
    with open(f"{out}.heads{tp.rank}", "w") as f:  # the rank's share: query and KV heads
        json.dump([llm.config.num_heads, llm.config.num_kv_heads], f)
    return 0


TWO_RANKS = sorted(set(MODELS) - {"llama-70b-heads"})


@pytest.mark.parametrize("family", TWO_RANKS)
def test_two_ranks_give_the_single_process_output(tmp_path, family):
    check_ranks(tmp_path, family, "cpu", ROUNDING_BOUND)


def test_eight_ranks_split_the_70b_head_layout(tmp_path):
    """The split a 70B-shaped LLaMA takes over 8 GPUs, here over 8 gloo processes: 8 query heads and
    their one KV head a rank, a rank's share of the MLP and of the vocabulary."""
    check_ranks(tmp_path, "llama-70b-heads", "cpu", ROUNDING_BOUND, size=8)
    assert all(json.loads((tmp_path / f"tokens.heads{r}").read_text()) == [8, 1] for r in range(8))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("family", TWO_RANKS)
def test_two_gpus_give_the_single_gpu_output(tmp_path, family):
    """The same identity over NCCL, in fp32 on the GPU (the GPU rounding bound)."""
    check_ranks(tmp_path, family, "cuda", ROUNDING_BOUNDS[torch.float32])


def check_ranks(tmp_path, family: str, device: str, bound: float, size: int = 2) -> None:
    full = MODELS[family](tmp_path / "llm")
    if family == "opt":
        save_random_opt(tmp_path / "ssm", vocab_size=97, seed=1)
    else:
        save_random_llama(tmp_path / "ssm", noise_from=full, num_attention_heads=full.config.num_attention_heads,
                          num_key_value_heads=full.config.num_key_value_heads, vocab_size=full.config.vocab_size,
                          hidden_size=full.config.hidden_size, intermediate_size=full.config.intermediate_size)
    out = tmp_path / "tokens"
    assert spawn(_serve_on_rank, [str(tmp_path / "llm"), str(tmp_path / "ssm"), str(out), device, str(size)], size) == 0
    ranks = [json.loads((tmp_path / f"tokens.rank{r}").read_text()) for r in range(size)]
    assert all(rank == ranks[0] for rank in ranks)  # every rank reaches the same decisions
    llm = load_model(tmp_path / "llm", device)
    alone = generate(llm, [load_model(tmp_path / "ssm", device)], PROMPTS, expansion=(1, 2, 1), batch=4, max_new=16,
                     device=device)
    for prompt, single, split in zip(PROMPTS, alone, ranks[0]):
        assert len(split) == 16
        assert_greedy_equivalent(llm, prompt, split, single.output_tokens, bound)


def test_cli_tensor_parallel_flag_spawns_ranks_and_matches(tmp_path, capsys):
    llm = save_random_llama(tmp_path / "llm", vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2)
    save_random_llama(tmp_path / "ssm", vocab_size=VOCAB, noise_from=llm, num_attention_heads=4,
                      num_key_value_heads=2)
    write_byte_level_tokenizer(tmp_path / "llm")
    (tmp_path / "prompts.json").write_text(json.dumps(["hello there", "a b c", "tensor parallel"]))
    common = ["--llm", str(tmp_path / "llm"), "--ssm", str(tmp_path / "ssm"), "--prompt-file",
              str(tmp_path / "prompts.json"), "--max-new-tokens", "12", "--expansion", "1,2,1",
              "--max-sequence-length", "96", "--no-compare", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    assert main([*common, "--tensor-parallel-size", "2", "--output", str(tmp_path / "two.jsonl")]) == 0
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    model = load_model(tmp_path / "llm")
    from specinfer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "llm")
    assert [r["prompt"] for r in two] == [r["prompt"] for r in one]
    for a, b in zip(one, two):
        assert_greedy_equivalent(model, tokenizer.encode(a["prompt"]), b["tokens"], a["tokens"])


def test_tensor_parallel_size_must_match_the_heads(tmp_path, capsys):
    save_random_llama(tmp_path / "llm", vocab_size=VOCAB, num_attention_heads=3, num_key_value_heads=3,
                      hidden_size=48)
    write_byte_level_tokenizer(tmp_path / "llm")
    code = main(["--llm", str(tmp_path / "llm"), "--mode", "incremental", "--tensor-parallel-size", "2",
                 "--prompt", "hi", "--max-new-tokens", "2", "--no-compare", "--quiet"])
    assert code == 2


def _max_on_rank(argv: list[str]) -> int:
    from specinfer.distributed.parallel import from_environment

    tp, _ = from_environment(2, "cpu")
    with open(f"{argv[0]}.rank{tp.rank}", "w") as f:
        f.write(str(tp.max_over_ranks(1.5 + tp.rank)))
    return 0


def test_ranks_time_each_step_as_the_slowest_one(tmp_path):
    """The adaptive controller decides from step times; under tensor parallelism every rank must decide
    alike, so the engine records the slowest rank's time (max_over_ranks) on every rank."""
    from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
    from specinfer.engine.request_manager import RequestManager

    assert spawn(_max_on_rank, [str(tmp_path / "max")], 2) == 0
    assert [(tmp_path / f"max.rank{r}").read_text() for r in (0, 1)] == ["2.5", "2.5"]

    reference = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=reference)
    llm, ssm = load_model(tmp_path / "llm"), load_model(tmp_path / "ssm")
    reported = []

    class SlowestRank:  # stands in for the process group: every step "took" 7 s on some rank
        def max_over_ranks(self, seconds):
            reported.append(seconds)
            return 7.0

    manager = RequestManager(llm, [ssm], EngineConfig(max_batch_size=2, max_sequence_length=64),
                             SpeculationConfig(expansion=(1, 2)), eos_token_ids=[])
    assert manager.tp is None  # the LLM's process group: none in one process
    manager.tp = SlowestRank()
    manager.register_new_request(PROMPTS[0], sampling=GenerationConfig(max_new_tokens=8))
    manager.run()
    times = manager.controller.times
    assert reported and all(s == 7.0 for t in times.values() for s in [*t.plain, *(x for d in t.speculative.values() for x in d)])
