"""Fitting a tree's shape to recorded ranks (spec/tree_fit.py), on ranks made up to have a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from specinfer.config import SpeculationConfig
from specinfer.errors import SpecInferError
from specinfer.spec.tree import TreeShape
from specinfer.spec.tree_fit import fit_tree, tokens_per_step


def test_an_always_right_ssm_gets_a_chain_and_accepts_all_of_it():
    ranks = [[np.zeros(40, dtype=np.int64)]]
    shape = fit_tree(ranks, num_nodes=5)
    assert shape.paths[1:] == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0))
    # 40 tokens: the prefill's first, then steps of 5 accepted + 1: 39 tokens over 7 steps (the last short).
    assert tokens_per_step(shape, ranks) == pytest.approx(39 / 7)


def test_fitted_shape_follows_the_ranks_and_beats_the_uniform_tree_it_replaces():
    rng = np.random.default_rng(0)
    # First choice right 60% of the time, the second 25%, the third 10%.
    ranks = [[rng.choice(4, size=200, p=[0.6, 0.25, 0.1, 0.05]) for _ in range(20)]]
    uniform = TreeShape.from_widths((2, 2, 1))
    fitted = fit_tree(ranks, num_nodes=len(uniform) - 1)
    assert (0,) in fitted.paths and (1,) in fitted.paths and fitted.depth > uniform.depth
    assert tokens_per_step(fitted, ranks) > tokens_per_step(uniform, ranks) + 0.1
    # Two SSMs side by side: a step accepts the longer of their paths, so a second SSM that is right where
    # the first is wrong adds tokens (not all: a path runs within one SSM's tree), and one never removes any.
    other = [np.where(r == 0, 3, 0) for r in ranks[0]]
    assert tokens_per_step(fitted, [ranks[0], other]) > tokens_per_step(fitted, ranks) + 0.1
    assert tokens_per_step(fitted, [ranks[0], ranks[0]]) == tokens_per_step(fitted, ranks)


def test_fitting_stops_when_nothing_more_is_accepted():
    ranks = [[np.array([0, 0, 5, 5, 5, 5])]]  # after the first token only rank 5: out of reach past depth 1
    assert len(fit_tree(ranks, num_nodes=50, max_rank=4)) - 1 <= 4


def test_speculation_config_takes_a_tree():
    config = SpeculationConfig(tree=[[1], [0], [0, 0]])
    assert config.tree == ((0,), (1,), (0, 0)) and config.max_tree_nodes == 4
    assert SpeculationConfig(mode="sequence", tree=((0,), (0, 0))).tree_shape.paths[1:] == ((0,), (0, 0))
    with pytest.raises(SpecInferError, match="lacks its parent"):
        SpeculationConfig(tree=[[0, 0]])
    with pytest.raises(SpecInferError, match="at most 1024 nodes"):
        SpeculationConfig(tree=[(0,) * d for d in range(1, 33)] + [(r,) for r in range(1, 1000)])


def test_the_default_model_drafts_the_tree_fitted_to_its_tuned_ssms():
    from specinfer.cli import build_parser, engine_configs
    from specinfer.config import DEFAULT_EXPANSION
    from specinfer.default_model import default_tree
    from specinfer.spec.tree_fit import load_tree_file

    for ssms, name in [(None, "tuned1_20.json"), (["tuned:1", "tuned:2"], "tuned1-2_20.json")]:
        path = default_tree(None, ssms)
        assert path.name == name and len(load_tree_file(path)) == 20
    assert default_tree("/models/llama-7b", None) is None and default_tree(None, ["self:4"]) is None
    # On a GPU the wide, shallow tree: a level costs an SSM pass, a verified node almost nothing.
    assert default_tree(None, None, "cuda").name == "tuned1_d4_64.json"
    assert default_tree(None, ["tuned:1", "tuned:2"], "cuda:0").name == "tuned1-2_20.json"
    _, speculation = engine_configs(build_parser().parse_args(["--device", "cuda"]))
    assert speculation.tree == load_tree_file(default_tree(None, None, "cuda"))
    # The shipped files are prefixes of one growth: the 512-node tree cut to 256 and 20 nodes.
    trees = default_tree(None, None).parent
    assert load_tree_file(trees / "tuned1-2_512.json", nodes=256) == load_tree_file(trees / "tuned1-2_256.json")
    assert load_tree_file(trees / "tuned1-2_512.json", nodes=20) == load_tree_file(trees / "tuned1-2_20.json")
    _, speculation = engine_configs(build_parser().parse_args([]))
    assert speculation.tree == load_tree_file(default_tree(None, None))
    _, speculation = engine_configs(build_parser().parse_args(["--expansion", "2,2,1"]))
    assert speculation.tree is None and speculation.expansion == (2, 2, 1)
    _, speculation = engine_configs(build_parser().parse_args(["--llm", "/models/llama-7b"]))
    assert speculation.tree is None and speculation.expansion == DEFAULT_EXPANSION


def test_a_grown_tree_file_cuts_to_every_smaller_fitted_tree(tmp_path):
    from specinfer.spec.tree_fit import grow_tree, load_tree_file, write_tree

    rng = np.random.default_rng(1)
    ranks = [[rng.choice(4, size=120, p=[0.6, 0.25, 0.1, 0.05]) for _ in range(10)]]
    grown = grow_tree(ranks, num_nodes=30)
    write_tree(tmp_path / "tree.json", grown, ["ssm"], "made-up ranks")
    for n in (1, 7, 30):
        cut = load_tree_file(tmp_path / "tree.json", nodes=n)
        assert cut == tuple(grown[:n])  # in growth order, so that the engine can nest smaller trees in it
        assert TreeShape.from_paths(cut).paths == fit_tree(ranks, num_nodes=n).paths
    (tmp_path / "plain.json").write_text("[[0], [1], [0, 0]]")
    with pytest.raises(SpecInferError, match="growth order"):
        load_tree_file(tmp_path / "plain.json", nodes=2)
    with pytest.raises(SpecInferError, match="holds 30 nodes"):
        load_tree_file(tmp_path / "tree.json", nodes=31)


def test_the_default_model_drafts_with_its_draft_vocabulary():
    from specinfer.cli import build_parser, engine_configs
    from specinfer.default_model import DEFAULT_GGUF_NAME, default_draft_vocab_size, draft_vocab_ranking
    from specinfer.models.draft_vocab import draft_vocabulary

    assert default_draft_vocab_size(None, None) == 16384 == default_draft_vocab_size(None, ["tuned:1", "tuned:2"])
    assert default_draft_vocab_size(None, ["self:4"]) == 0 == default_draft_vocab_size("/models/llama-7b", None)
    ids = draft_vocabulary(draft_vocab_ranking(Path(DEFAULT_GGUF_NAME)), 16384, 49152)
    assert len(set(ids)) == 16384 and ids[:3] != [0, 1, 2]  # the answers' most used tokens come first
    assert draft_vocabulary(draft_vocab_ranking(Path("/models/llama-7b")), 5, 100) == [0, 1, 2, 3, 4]
    engine, _ = engine_configs(build_parser().parse_args(["--draft-vocab", "0"]))
    assert engine.draft_vocab_size == 0
    assert engine_configs(build_parser().parse_args([]))[0].draft_vocab_size is None
    with pytest.raises(SpecInferError, match="draft_vocab_size must be >= 0"):
        engine_configs(build_parser().parse_args(["--draft-vocab", "-1"]))


def test_a_renamed_copy_of_the_default_model_is_still_the_default_model(tmp_path):
    """Its tuned SSMs, fitted tree and draft vocabulary follow the file, not its name."""
    from specinfer.default_model import default_model_path, default_tree, is_default_model

    shipped = default_model_path()
    renamed = tmp_path / "smollm.gguf"
    renamed.symlink_to(shipped)
    assert is_default_model(renamed) and default_tree(renamed, None).name == "tuned1_20.json"
    other = tmp_path / "other.gguf"
    with open(other, "wb") as f:  # same size, other bytes (sparse: nothing written past the magic)
        f.write(b"GGUF")
        f.truncate(shipped.stat().st_size)
    assert not is_default_model(other) and not is_default_model(tmp_path / "missing.gguf")
