"""The token tree and tree attention: each node's logits equal those of its path run alone."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.models.loader import load_model
import pytest

from specinfer.errors import SpecInferError
from specinfer.spec.tree import TokenTree, TreeShape, ancestor_mask, merge_trees

from .conftest import save_random_llama, save_random_opt


def test_ancestor_mask_and_paths():
    tree = TokenTree(tokens=[5, 6, 7, 8, 9], parents=[-1, 0, 0, 1, 3])
    mask = ancestor_mask(tree.parents)
    assert mask[4].tolist() == [True, True, False, True, True]
    assert mask[2].tolist() == [True, False, True, False, False]
    assert tree.path_to(4) == [0, 1, 3, 4]
    assert tree.depths() == [0, 1, 1, 2, 3]
    assert tree.children(0) == [1, 2]


def test_tree_shapes_from_widths_and_rank_paths():
    uniform = TreeShape.from_widths((2, 1))
    assert uniform.parents == (-1, 0, 0, 1, 2)
    assert uniform.paths == ((), (0,), (1,), (0, 0), (1, 0))
    assert uniform == TreeShape.from_paths([[1, 0], [0], [0, 0], [1]])  # any order in, level order out
    fitted = TreeShape.from_paths([[0], [1], [0, 0], [0, 1], [0, 0, 0], [1, 0]])
    assert fitted.parents == (-1, 0, 0, 1, 1, 2, 3)
    assert fitted.ranks == (0, 0, 1, 0, 1, 0, 0)
    assert fitted.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())
    assert fitted.level_starts == (0, 1, 3, 6, 7) and fitted.depth == 3
    assert [fitted.level_width(d) for d in (1, 2, 3)] == [2, 2, 1]
    assert fitted.num_nodes_within(1) == 3
    for bad, message in [([[0, 0]], "lacks its parent"), ([[1]], "better-ranked sibling"), ([], "at least one"),
                         ([[0], [-1]], "negative"), ([[0], ["x"]], "rank paths")]:
        with pytest.raises(SpecInferError, match=message):
            TreeShape.from_paths(bad)


def test_merge_shares_prefixes():
    a = TokenTree(tokens=[1, 2, 3], parents=[-1, 0, 1])
    b = TokenTree(tokens=[1, 2, 4, 5], parents=[-1, 0, 1, 0])
    merged, maps = merge_trees([a, b])
    assert merged.tokens == [1, 2, 3, 4, 5]
    assert merged.parents == [-1, 0, 1, 1, 0]
    assert maps == [[0, 1, 2], [0, 1, 3, 4]]


def _check_tree_against_paths(model, prefix, tree):
    runner = ModelRunner(model, num_slots=2, capacity=64)
    n = len(prefix)
    runner.forward([Chunk.chain(0, prefix, logits="none")])
    runner.commit(0, list(range(n)))
    # Verify the tree in one pass, in two chunks to exercise appending to existing speculative entries.
    half = len(tree) // 2
    first = runner.forward([Chunk(0, tree.tokens[:half], tree.parents[:half], list(range(half)))])[0]
    second = runner.forward([Chunk(0, tree.tokens[half:], tree.parents[half:], list(range(len(tree) - half)))])[0]
    tree_logits = torch.cat([first, second])
    for node in range(len(tree)):
        path = [tree.tokens[u] for u in tree.path_to(node)]
        alone = ModelRunner(model, num_slots=1, capacity=64)
        seq = prefix + path
        expected = alone.forward([Chunk.chain(0, seq)])[0][0]
        torch.testing.assert_close(tree_logits[node], expected, rtol=1e-4, atol=1e-4)


def test_tree_logits_equal_paths_alone(tmp_path):
    tree = TokenTree(tokens=[3, 10, 11, 12, 20, 21, 22, 30], parents=[-1, 0, 0, 0, 1, 1, 3, 4])
    save_random_llama(tmp_path / "llama")
    save_random_opt(tmp_path / "opt")
    for name in ("llama", "opt"):
        _check_tree_against_paths(load_model(tmp_path / name), [1, 2, 3, 4, 5, 6], tree)


def test_commit_compacts_accepted_path(tmp_path):
    save_random_llama(tmp_path)
    model = load_model(tmp_path)
    runner = ModelRunner(model, num_slots=2, capacity=64)
    prefix = [4, 5, 6]
    runner.forward([Chunk.chain(0, prefix, logits="none")])
    runner.commit(0, [0, 1, 2])
    tree = TokenTree(tokens=[7, 8, 9, 10], parents=[-1, 0, 0, 2])
    runner.forward([Chunk(0, tree.tokens, tree.parents, [])])
    runner.commit(0, [0, 2, 3])  # accept 7 -> 9 -> 10
    assert runner.num_cached(0) == 6
    after = runner.forward([Chunk(0, [11], [-1], [0])])[0][0]
    alone = ModelRunner(model, num_slots=1, capacity=64)
    seq = prefix + [7, 9, 10, 11]
    expected = alone.forward([Chunk.chain(0, seq)])[0][0]
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def test_one_buffer_inputs_spell_out_the_prefix_and_tree_mask(tmp_path):
    """A pass's inputs (engine/host_batch.py): one byte buffer whose views hold, per row, positions, cache
    places, the prefix every new token sees, the tree mask over the speculative entries and the flat
    indexes of the rows whose logits are wanted; padding writes to the scratch slot and sees one entry."""
    from specinfer.engine.host_batch import Layout
    from specinfer.layers.attention import dense_mask

    save_random_llama(tmp_path)
    runner = ModelRunner(load_model(tmp_path), num_slots=3, capacity=32)
    runner.forward([Chunk.chain(1, [3, 1, 4, 1, 5], logits="none")])
    runner.commit(1, list(range(5)))
    runner.forward([Chunk(1, [9, 2], [-1, 0], [])])  # two speculative entries to extend
    chunks = [Chunk(1, [6, 5, 3], [0, 1, 0], [0, 2]), Chunk.chain(2, [7, 7], logits="last")]
    layout = Layout(batch=4, tokens=4, width=8)
    host = runner._prepare(chunks, layout)
    assert host.buffer.numel() == layout.nbytes == 8 * (5 * 16 + 2 * 4) + 4 * 4 * 8
    assert host.positions[0, :3].tolist() == [5 + 1, 5 + 2, 5 + 1]
    assert host.write_offsets[0, :3].tolist() == [7, 8, 9] and host.write_slots[0, 3] == runner.cache.scratch_slot
    assert host.prefix_lens.tolist() == [5, 0, 0, 0] and host.read_slots[2] == runner.cache.scratch_slot
    assert host.tree_mask[0, :3, :5].tolist() == [[1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 0, 0, 1]]
    assert host.tree_mask[1, :2, :2].tolist() == [[1, 0], [1, 1]] and host.tree_mask[3, :, 0].all()
    assert host.logit_rows[: host.num_logit_rows].tolist() == [0, 2, 4 + 1]
    meta = host.to_device(torch.device("cpu")).meta
    mask = dense_mask(meta)[:, 0]  # over entries 0..kv_len-1
    assert meta.kv_len == 10 and mask[0, 2].tolist() == [True] * 5 + [True, False, False, False, True]


def test_device_drafter_and_host_drafting_grow_the_same_fitted_tree(tmp_path):
    """Both drafters follow a fitted shape: every node is its parent's top-k token of the given rank."""
    from specinfer.config import GenerationConfig
    from specinfer.spec.device_draft import DeviceTreeDrafter
    from specinfer.spec.draft import DraftRequest, expand

    save_random_llama(tmp_path)
    ssm = load_model(tmp_path)
    shape = TreeShape.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0, 0]])
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    host = expand(ModelRunner(ssm, num_slots=1, capacity=64), [DraftRequest(0, prompt, 8, GenerationConfig(), None)],
                  shape)[0]
    runner = ModelRunner(ssm, num_slots=2, capacity=64)
    drafter = DeviceTreeDrafter(runner, shape)
    # Only nodes with children are fed (leaves' logits would go unused): nodes 1 and 2 of level 1, not 3.
    assert drafter.level_nodes[0].tolist() == [0, 1] and drafter.level_feeds[0].tolist() == [0, 1]
    # Slot 0: the whole prompt is the catch-up chain (all but its last CATCH_UP tokens fed ahead). Slot 1:
    # the SSM has cached all but one token, the chain a step leaves after the LLM's own token.
    runner.forward([Chunk.chain(1, prompt[:-1], logits="none")])
    runner.commit(1, list(range(len(prompt) - 1)))
    device_tokens = drafter.draft([prompt, prompt[-1:]], [0, 1])[0].tolist()
    assert host.tree.parents == list(shape.parents)
    assert host.tree.tokens == device_tokens[0] == device_tokens[1]
    # Recorded: the chain (its fed-ahead part committed), then entries for the 8 nodes above the deepest level.
    assert runner.num_cached(0) == len(prompt) - 2 and runner.num_speculative(0) == 2 + 8
    assert runner.num_cached(1) == len(prompt) - 1 and runner.num_speculative(1) == 1 + 8
    # Check a few nodes against the SSM run alone on their paths.
    for node in (2, 5, 8):
        path = [host.tree.tokens[u] for u in host.tree.path_to(shape.parents[node])][1:]
        alone = ModelRunner(ssm, num_slots=1, capacity=64).forward([Chunk.chain(0, prompt + path)])[0][0]
        assert host.tree.tokens[node] == alone.topk(shape.ranks[node] + 1).indices[-1].item()


def test_catch_up_chains_run_eagerly_not_through_a_captured_graph(tmp_path):
    """A long chain fed ahead of the drafter (a prompt) comes in every length; a CUDA graph captured for
    each would serve once and cost tens of milliseconds. Such passes skip the graphs, and short ones (the
    tokens of a few plain steps) may replay them; the host drafter's first pass does the same."""
    from specinfer.config import GenerationConfig
    from specinfer.spec.device_draft import DeviceTreeDrafter
    from specinfer.spec.draft import DraftRequest, expand

    class Graphs:  # stands in for CudaGraphs on the CPU: records the shapes asked for, captures nothing
        batch_buckets: list[int] = []

        def __init__(self):
            self.asked = []

        def bucket(self, batch, num_tokens, width):
            self.asked.append(num_tokens)
            return None

    save_random_llama(tmp_path)
    ssm = load_model(tmp_path)
    shape = TreeShape.from_paths([[0], [1], [0, 0]])
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    runner = ModelRunner(ssm, num_slots=2, capacity=64)
    runner.graphs = Graphs()
    DeviceTreeDrafter(runner, shape).draft([prompt * 3], [0])
    assert runner.graphs.asked == []  # the 22 tokens fed ahead ran eagerly
    DeviceTreeDrafter(runner, shape).draft([prompt], [1])
    assert runner.graphs.asked == [6]  # 6 tokens may replay a captured pass
    host_runner = ModelRunner(ssm, num_slots=1, capacity=64)
    host_runner.graphs = Graphs()
    expand(host_runner, [DraftRequest(0, prompt, 8, GenerationConfig(), None)], shape)
    assert 8 not in host_runner.graphs.asked and host_runner.graphs.asked  # the level passes may replay


def test_replayed_passes_take_logits_at_few_row_counts_all_warmed_ahead(tmp_path):
    """A replayed pass's LM head runs eagerly at the number of logit rows asked for, which steps where some
    requests draft vary without end; each new count's first product stalls on a GPU. With graphs the rows
    are padded to a bucket (at most an eighth more), `warm_logits` runs every bucket ahead, and the
    logits asked for are those of the unpadded pass."""
    from specinfer.engine.cuda_graphs import CudaGraphs
    from specinfer.engine.host_batch import DeviceBatch
    from specinfer.engine.model_runner import logit_rows_bucket

    assert [logit_rows_bucket(r) for r in (1, 8, 9, 17, 65, 81, 129, 4160)] == [1, 8, 9, 18, 72, 88, 144, 4608]
    assert all(r <= logit_rows_bucket(r) <= r * 9 / 8 for r in range(1, 10000))
    # A captured layout's whole batch (power-of-two rows times a token bucket) is a bucket itself.
    assert all(logit_rows_bucket(b * t) == b * t for b in (1, 2, 4, 8, 16, 32, 64) for t in (1, 2, 4, 8, *range(16, 257, 16)))

    class ReplayedEagerly(CudaGraphs):  # the graph path's bookkeeping on the CPU: "replays" run the model
        def load(self, host):
            self.graphs[host.layout] = batch = DeviceBatch(host.layout, host.buffer, host.kv_len)
            return batch

        def replay(self, layout):
            batch = self.graphs[layout]
            return self.model(batch.tokens, self.cache, batch.meta)

    save_random_llama(tmp_path)
    model = load_model(tmp_path)
    rows_seen = []
    compute_logits = model.compute_logits
    model.compute_logits = lambda hidden: rows_seen.append(hidden.shape[0]) or compute_logits(hidden)
    eager, replayed = (ModelRunner(model, num_slots=4, capacity=64) for _ in range(2))
    replayed.graphs = ReplayedEagerly(model, replayed.cache, max_batch=4)
    # Three requests: two plain, one verifying a 17-node tree: 19 logit rows, padded to 20; then 20.
    parents = [-1] + [(node - 1) // 2 for node in range(1, 17)]
    tree = TokenTree(tokens=[5 + node for node in range(17)], parents=parents)
    for runner in (eager, replayed):
        runner.forward([Chunk.chain(slot, [3, 1, 4, 1 + slot], logits="none") for slot in range(3)])
        runner.commit_all([(slot, [0, 1, 2, 3]) for slot in range(3)])
    for extra in (0, 1):
        chunks = [Chunk(0, [2], [-1], [0]), Chunk(1, [7], [-1], [0]),
                  Chunk(2, tree.tokens + [30] * extra, tree.parents + [16] * extra, list(range(17 + extra)))]
        rows_seen.clear()
        expected = eager.forward_rows(chunks)
        got = replayed.forward_rows(chunks)
        assert rows_seen == [19 + extra, 20] and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for runner in (eager, replayed):
            for slot in range(3):
                runner.commit(slot, [])
    rows_seen.clear()
    replayed.warm_logits(19)
    assert 20 in rows_seen and max(rows_seen) == 20 and len(rows_seen) == len(set(rows_seen))


def test_greedy_verification_keeps_the_deeper_of_two_side_by_side_paths():
    """Two SSMs' trees under one root, both starting with token 7: the second's path runs deeper."""
    from specinfer.spec.verify import verify_greedy_targets

    tree = TokenTree(tokens=[1, 7, 8, 7, 9, 10], parents=[-1, 0, 1, 0, 3, 4])
    targets = [7, 5, 0, 9, 10, 11]  # the LLM's argmax after each node
    result = verify_greedy_targets(tree, targets)
    assert result.accepted == [0, 3, 4, 5] and result.next_token == 11
    assert result.new_tokens(tree) == [7, 9, 10, 11]
    first_only = verify_greedy_targets(tree, [7, 8, 3, 5, 0, 0])  # now only the first tree's path matches
    assert first_only.accepted == [0, 1, 2] and first_only.next_token == 3


@pytest.mark.parametrize("num_ssms", [1, 2])
def test_a_step_with_a_large_tree_tells_what_every_nested_smaller_tree_commits(num_ssms):
    """Greedy verification of the whole tree, side by side for several SSMs, gives for every smaller tree
    of the ladder exactly what verifying that tree alone would commit."""
    import random

    from specinfer.spec.tree_ladder import TreeLadder
    from specinfer.spec.verify import verify_greedy_targets

    rng = random.Random(num_ssms)
    grown = [(0,), (0, 0), (1,), (0, 0, 0), (0, 1), (1, 0), (2,), (0, 0, 0, 0), (0, 0, 1), (1, 0, 0), (0, 2), (3,)]
    ladder = TreeLadder.from_paths(grown)
    assert ladder.sizes == (1, 3, 7, 12)
    full = ladder.full
    for _ in range(300):
        # Tokens from a small vocabulary so that paths match often, two SSMs' first tokens collide.
        tokens, parents, places = [0], [-1], [-1]
        for _ in range(num_ssms):
            offset = len(tokens) - 1
            own = [0] * len(full)
            for node in range(1, len(full)):
                siblings = [own[c] for c in full.children[full.parents[node]] if c < node]
                own[node] = rng.choice([t for t in range(4) if t not in siblings])
            tokens += own[1:]
            parents += [0 if p == 0 else offset + p for p in full.parents[1:]]
            places += list(ladder.places[-1][1:])
        tree = TokenTree(tokens, parents)
        # The LLM's choice after each node depends on the node's whole path, as a real model's does.
        choice = {}
        targets = [choice.setdefault(tuple(tree.tokens[u] for u in tree.path_to(v)), rng.randrange(4))
                   for v in range(len(tree))]
        result = verify_greedy_targets(tree, targets)
        counts = ladder.tokens_by_size(len(ladder.sizes) - 1, [(places[v], d) for v, d in result.matched])
        assert counts[ladder.sizes[-1]] == len(result.new_tokens(tree))
        for size in ladder.sizes:
            kept = [v for v in range(len(tree)) if places[v] < size]  # the smaller tree: a prefix-closed part
            index = {v: i for i, v in enumerate(kept)}
            small = TokenTree([tree.tokens[v] for v in kept], [index.get(tree.parents[v], -1) for v in kept])
            alone = verify_greedy_targets(small, [targets[v] for v in kept])
            assert counts[size] == len(alone.new_tokens(small)), (size, counts)


@pytest.mark.parametrize("columns", [96, 16384, 49152])
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_two_stage_top_k_picks_the_same_tokens_in_the_same_order(columns, k):
    """The drafter's top-k (spec/top_k.py) splits long rows into blocks; it must rank exactly as topk."""
    from specinfer.spec.top_k import top_k_indices

    torch.manual_seed(columns + k)
    scores = torch.randn(2, 4, columns)
    assert torch.equal(top_k_indices(scores, k), scores.topk(k, dim=-1).indices)
    scores[0, 0, 7] = scores[0, 0, columns - 3] = scores.max() + 1  # a tie at the top: either order, both first
    assert set(top_k_indices(scores, max(k, 2))[0, 0, :2].tolist()) == {7, columns - 3}


def check_cache_moves(device: str) -> None:
    """`KVCache.move_entries` (the commit's compaction) against the same copy spelled out per slot."""
    from types import SimpleNamespace

    from specinfer.engine.kv_cache import KVCache

    cache = KVCache(SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=4), 3, 10, device, torch.float32)
    for moves in ([(0, [2, 5, 7], 1), (2, [0, 1], 0), (1, [4, 9], 3), (3, [6, 8], 5)],  # slot 3: scratch
                  [(0, [1, 2], 2), (1, [3], 0)]):  # one moves up (overlapping): not a commit, still copied
        cache.data.copy_(torch.randn_like(cache.data))
        expected = cache.data.clone()
        for slot, entries, start in moves:
            expected[:, :, slot, :, start : start + len(entries)] = expected[:, :, slot, :, entries].clone()
        cache.move_entries(moves)
        assert torch.equal(cache.data, expected), moves


def test_cache_moves_copy_every_layer_head_and_slot():
    check_cache_moves("cpu")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_cache_moves_in_triton_interpreter():
    """The GPU's one-kernel compaction (engine/cache_moves_triton.py), run by Triton's CPU interpreter."""
    code = "from tests.test_tree import check_cache_moves; check_cache_moves('cpu')"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                            env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
def test_cache_moves_on_gpu():
    check_cache_moves("cuda")
