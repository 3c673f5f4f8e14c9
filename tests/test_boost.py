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
    fitted = "merged set, fitted tree of 20 nodes (tree.json)"
    assert set(rows) == {"untrained draft", "ssm1", "ssm2", "merged set", fitted}
    # The fitted tree (20 nodes per SSM) beats the 3-node expansion it is compared with.
    assert rows[fitted]["mean_tokens_per_step"] > rows["merged set"]["mean_tokens_per_step"]
    assert json.loads((boosted / "out" / "tree.json").read_text())["ssms"] == ["ssm1", "ssm2"]
    assert json.loads((boosted / "out" / "draft_vocab.json").read_text())["ranked"]  # for --draft-vocab-file
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


def test_self_init_ssm_ships_without_embeddings_and_shares_the_llms(tmp_path):
    from safetensors import safe_open

    from specinfer.boost.train import causal_logits, make_ssm, save_ssm, shares_embeddings
    from specinfer.errors import SpecInferError

    from .test_speculative import PROMPTS

    save_random_llama(tmp_path / "llm", num_hidden_layers=3)
    llm = load_model(tmp_path / "llm")
    ssm = make_ssm(llm, "self:2")
    assert shares_embeddings(ssm)  # frozen by default: training leaves them the LLM's
    with torch.no_grad():  # stand-in for training: the layers move, the embeddings stay
        for p in ssm.layers.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_ssm(ssm, tmp_path / "ssm", dtype=torch.float32, share_embeddings=True, max_shard_bytes=40_000)
    files = sorted(p.name for p in (tmp_path / "ssm").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "ssm" / "model.safetensors.index.json").is_file()
    names = {n for f in files for n in safe_open(tmp_path / "ssm" / f, "pt").keys()}
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)

    with pytest.raises(SpecInferError, match="uses its LLM's embeddings"):
        load_model(tmp_path / "ssm")
    loaded = load_model(tmp_path / "ssm", shared_from=llm)
    assert loaded.embed_tokens.weight is llm.embed_tokens.weight  # shared, not copied
    tokens = torch.tensor([[5, 17, 3, 42]])
    rows = torch.tensor([[0, 3]])
    torch.testing.assert_close(causal_logits(loaded, tokens, rows), causal_logits(ssm.eval(), tokens, rows))
    expected = generate(llm, [], PROMPTS, mode="incremental", max_new=16)
    got = generate(llm, [loaded], PROMPTS, max_new=16)
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)


def test_answer_oracle_measures_what_the_llm_accepts(boosted):
    """Acceptance measured with the recorded answers standing in for the LLM equals the engine's with the
    LLM itself, for one SSM and for the merged pair."""
    from specinfer.boost.evaluate import mean_tokens_per_step
    from specinfer.boost.oracle import oracle_tokens_per_step

    llm = load_model(boosted / "llm")
    ssms = [load_model(boosted / "out" / f"ssm{k}", dtype=torch.float32) for k in (1, 2)]
    examples = read_examples(boosted / "out" / "data" / "held_out.jsonl")[:8]
    for group in ([ssms[0]], ssms):
        real = mean_tokens_per_step(llm, group, examples, (2, 1, 1), max_new_tokens=24)
        oracle = oracle_tokens_per_step(llm.config, group, examples, (2, 1, 1), max_new_tokens=24)
        assert real > 1.2 and abs(oracle - real) < 0.02, (real, oracle)


def test_replayed_ranks_give_what_the_engine_accepts(boosted):
    """A shape's tokens per step replayed from teacher-forced ranks (spec/tree_fit.py) equal the engine's,
    served with the answers standing in for the LLM: for a uniform and a fitted shape, one SSM and two."""
    from specinfer.boost.fit_tree import answer_ranks
    from specinfer.boost.oracle import oracle_tokens_per_step
    from specinfer.spec.tree import TreeShape
    from specinfer.spec.tree_fit import fit_tree, tokens_per_step

    llm = load_model(boosted / "llm")
    ssms = [load_model(boosted / "out" / f"ssm{k}", dtype=torch.float32) for k in (1, 2)]
    train = read_examples(boosted / "out" / "data" / "train.jsonl")[:40]
    held_out = read_examples(boosted / "out" / "data" / "held_out.jsonl")[:8]
    for group in ([ssms[0]], ssms):
        fitted = fit_tree([answer_ranks(s, train) for s in group], num_nodes=6)
        held_ranks = [answer_ranks(s, held_out) for s in group]
        for shape in (TreeShape.from_widths((2, 1, 1)), fitted):
            replayed = tokens_per_step(shape, held_ranks, max_new_tokens=24)
            served = oracle_tokens_per_step(llm.config, group, held_out, (1,), 24, tree=shape.paths[1:])
            assert served > 1.2 and abs(replayed - served) < 0.02, (shape.paths, replayed, served)


def test_fit_tree_command_writes_a_tree_that_serves_exactly(boosted, tmp_path):
    from specinfer.spec.tree_fit import load_tree_file

    out = tmp_path / "fit"
    llm_dir, ssm_dir = boosted / "llm", boosted / "out" / "ssm1"
    code = main(["fit-tree", "--llm", str(llm_dir), "--ssm", str(ssm_dir), "--out", str(out), "--nodes", "4",
                 "--max-prompts", "40", "--max-held-out", "8", "--max-new-tokens", "24", "--eval-new-tokens", "24",
                 "--max-sequence-length", "200",
                 "--expansion", "2,1,1", "--engine-check"])
    assert code == 0
    record = json.loads((out / "tree.json").read_text())
    assert record["nodes"] == len(record["paths"]) <= 4 and record["ssms"] == [str(ssm_dir)]
    report = (out / "fit_tree.md").read_text()
    assert "fitted, 4 nodes" in report and "expansion 2,1,1" in report
    # The answers' tokens, most used first, for --draft-vocab-file.
    from collections import Counter

    from specinfer.models.draft_vocab import read_ranking

    ranked = read_ranking(out / "draft_vocab.json")
    counts = Counter(t for e in read_examples(out / "data" / "fit_held-out.jsonl") for t in e.tokens[e.answer_start:])
    assert set(ranked) == set(counts) and [counts[t] for t in ranked] == sorted(counts.values(), reverse=True)
    tree = load_tree_file(out / "tree.json")
    llm = load_model(llm_dir)
    prompts = [e.tokens[: e.answer_start] for e in read_examples(out / "data" / "held_out.jsonl")[:4]]
    expected = generate(llm, [], prompts, mode="incremental", max_new=16)
    got = generate(llm, [load_model(ssm_dir)], prompts, tree=tree, max_new=16)
    for prompt, g, e in zip(prompts, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)
    assert sum(r.stats.num_accepted for r in got) > 0
