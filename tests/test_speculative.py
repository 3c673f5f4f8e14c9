"""Greedy speculative inference gives what incremental decoding gives, token for token.

Where the two differ, the test accepts it only if the LLM's top-two logit margin at the first differing
position is within ROUNDING_BOUND: scoring several tokens in one pass rounds differently (fp32 here).
"""

from __future__ import annotations

import pytest
import torch

from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.engine.request_manager import RequestManager
from specinfer.exactness import divergence_margin
from specinfer.models.early_exit import early_exit_draft
from specinfer.models.loader import load_model

from .conftest import save_random_llama, save_random_opt

ROUNDING_BOUND = 1e-4  # fp32 on CPU (tighter than the library-wide fp32 bound, which covers GPUs)

EXPANSIONS = [(1, 1, 3, 1, 1), (2, 2, 1), (3,), (1, 1, 1, 1, 1, 1)]
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [40], [2, 90, 3, 80, 4, 70]]


def assert_greedy_equivalent(llm, prompt, got, expected, bound=ROUNDING_BOUND):
    margin = divergence_margin(llm, prompt, expected, got)
    assert margin is None or margin <= bound, f"outputs diverge where the top-2 margin is {margin} > {bound}"


def generate(llm, ssms, prompts, mode="tree", expansion=(1, 1, 3, 1, 1), batch=4, max_new=20, eos=(), device="cpu",
             tree=None, sampled_neighbour=False, top_k_neighbour=False):
    """Serve `prompts` greedily. `sampled_neighbour`: one sampled request rides along, drafting sampled
    children, which sends the whole batch through host drafting (spec/draft.py) instead of the device
    drafter. `top_k_neighbour`: one rides along drafting top-k children, on the device with the rest."""
    manager = RequestManager(llm, ssms, EngineConfig(max_batch_size=batch, max_sequence_length=128, device=device),
                             SpeculationConfig(mode=mode, expansion=expansion, adaptive=False, tree=tree,
                                               sampled_children=sampled_neighbour),
                             eos_token_ids=list(eos))
    ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=max_new)) for p in prompts]
    if sampled_neighbour or top_k_neighbour:
        manager.register_new_request(prompts[0], sampling=GenerationConfig(do_sample=True, max_new_tokens=max_new))
    manager.run()
    return [manager.requests[i] for i in ids]


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    reference = save_random_llama(root / "llm")
    for k in range(2):
        torch.manual_seed(100 + k)
        save_random_llama(root / f"ssm{k}", noise_from=reference)
    llm = load_model(root / "llm")
    ssms = [load_model(root / "ssm0"), load_model(root / "ssm1"), early_exit_draft(llm, 1)]
    return llm, ssms


# An irregular shape, as tree fitting makes them: a deep first-choice chain, side branches of other widths.
FITTED_TREE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (0, 0, 0, 0), (0, 0, 0, 1),
               (0, 0, 0, 0, 0))


@pytest.mark.parametrize("num_ssms", [1, 2])
@pytest.mark.parametrize("neighbour", ["none", "host-drafting", "top-k"])
def test_fitted_tree_greedy_equals_incremental(random_models, num_ssms, neighbour):
    """Greedy requests alone, beside a sampled one that sends the batch through host drafting, and beside
    one drafting top-k children on the device with them (its rows draw, theirs take the argmax)."""
    llm, ssms = random_models
    expected = generate(llm, [], PROMPTS, mode="incremental")
    got = generate(llm, ssms[:num_ssms], PROMPTS, tree=FITTED_TREE, batch=5,
                   sampled_neighbour=neighbour == "host-drafting", top_k_neighbour=neighbour == "top-k")
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert len(g.output_tokens) == 20
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)
    assert sum(r.stats.num_accepted for r in got) > 0
    # The drafts followed the shape: no step speculated more nodes than the shape has per SSM.
    assert all(r.stats.num_speculated <= r.stats.num_llm_steps * num_ssms * len(FITTED_TREE) for r in got)


@pytest.mark.parametrize("expansion", EXPANSIONS)
@pytest.mark.parametrize("num_ssms", [1, 2, 3])
def test_tree_greedy_equals_incremental(random_models, expansion, num_ssms):
    llm, ssms = random_models
    expected = generate(llm, [], PROMPTS, mode="incremental")
    got = generate(llm, ssms[:num_ssms], PROMPTS, expansion=expansion)
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert len(g.output_tokens) == 20
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)
    # The noisy copies agree with the LLM often: speculation must actually be accepted.
    assert sum(r.stats.num_accepted for r in got) > 0


@pytest.mark.parametrize("batch", [1, 4])
def test_sequence_mode_and_batch_sizes(random_models, batch):
    llm, ssms = random_models
    expected = generate(llm, [], PROMPTS, mode="incremental", batch=batch)
    got = generate(llm, ssms[:1], PROMPTS, mode="sequence", batch=batch, expansion=(1, 1, 1, 1))
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)


def test_requests_join_and_leave(random_models):
    """More requests than slots, different budgets: later ones join as earlier ones finish."""
    llm, ssms = random_models
    manager = RequestManager(llm, ssms[:2], EngineConfig(max_batch_size=2, max_sequence_length=64),
                             SpeculationConfig(expansion=(2, 1, 1), adaptive=False), eos_token_ids=[])
    budgets = [3, 17, 1, 9, 25]
    ids = [manager.register_new_request(PROMPTS[i % 4], sampling=GenerationConfig(max_new_tokens=b))
           for i, b in enumerate(budgets)]
    manager.run()
    for i, budget in zip(ids, budgets):
        r = manager.requests[i]
        assert len(r.output_tokens) == budget and r.finish_reason == "length"
        alone = generate(llm, [], [r.prompt_tokens], mode="incremental", batch=1, max_new=budget)[0]
        assert_greedy_equivalent(llm, r.prompt_tokens, r.output_tokens, alone.output_tokens)


def test_eos_and_max_sequence_length(random_models):
    llm, ssms = random_models
    free = generate(llm, [], PROMPTS[:1], mode="incremental", max_new=20)[0].output_tokens
    eos = free[7]
    got = generate(llm, ssms[:2], PROMPTS[:1], eos=[eos], max_new=20)[0]
    cut = free.index(eos) + 1
    assert got.output_tokens == free[:cut] and got.finish_reason == "stop"
    manager = RequestManager(llm, ssms[:1], EngineConfig(max_batch_size=1, max_sequence_length=128),
                             SpeculationConfig(), eos_token_ids=[])
    rid = manager.register_new_request(PROMPTS[1], max_sequence_length=15)
    manager.run()
    assert len(manager.requests[rid].tokens) == 15


def test_opt_tree_greedy_equals_incremental(tmp_path):
    save_random_opt(tmp_path / "llm")
    llm = load_model(tmp_path / "llm")
    ssms = [early_exit_draft(llm, 1)]
    expected = generate(llm, [], PROMPTS, mode="incremental")
    got = generate(llm, ssms, PROMPTS, expansion=(2, 2, 1))
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)


@pytest.mark.slow
@pytest.mark.parametrize("expansion,ssms,batch", [
    ((1, 1, 3, 1, 1, 1, 1, 1), ["self:4"], 1),
    ((2, 2, 1, 1), ["self:4", "self:8"], 4),
    ((1, 1, 1, 1), ["self:4", "self:8", "self:12"], 4),
    ((2, 2, 1), None, 4),  # the default: the shipped boost-tuned SSM
    ((1, 1, 3, 1, 1, 1, 1, 1), ["tuned:1", "tuned:2"], 2),
])
def test_smollm2_greedy_equals_incremental(default_gguf, expansion, ssms, batch):
    from specinfer import LLM

    llm = LLM(ssms=ssms, engine=EngineConfig(max_sequence_length=256, max_batch_size=batch),
              speculation=SpeculationConfig(expansion=expansion, adaptive=False))
    prompts = ["What is the capital of France?", "Write a haiku about autumn.", "Name three colors.",
               "Explain gravity to a child in one sentence."][:batch]
    config = GenerationConfig(max_new_tokens=16)
    expected = llm.generate(prompts, config, mode="incremental")
    got = llm.generate(prompts, config)
    for prompt, g, e in zip(prompts, got, expected):
        assert_greedy_equivalent(llm.model, llm.encode_prompt(prompt, True), g.output_tokens, e.output_tokens)
    # The tuned SSMs score the default draft vocabulary; early-exit drafts, the LLM's whole one.
    tuned = ssms is None or ssms[0].startswith("tuned")
    assert all(hasattr(ssm.lm_head, "token_ids") == tuned for ssm in llm.ssms)
    assert not hasattr(llm.model.lm_head, "token_ids")
    if tuned:
        assert llm.ssms[0].lm_head.token_ids.numel() == 16384


@pytest.mark.slow
def test_shipped_tuned_ssm_is_the_default_and_beats_the_early_exit_draft(default_gguf):
    """With the default model and no --ssm, the engine drafts with the shipped boost-tuned SSM, which
    the LLM accepts far more often than its own first layers (boost_tuning.md: 1.92 against 1.05
    tokens per step on held-out prompts)."""
    from specinfer import LLM
    from specinfer.default_model import tuned_ssm_path

    def tokens_per_step(llm) -> float:
        prompts = ["Give me three tips for staying focused while studying.", "What is photosynthesis?"]
        results = llm.generate(prompts, GenerationConfig(max_new_tokens=32))
        steps = sum(r.num_llm_steps for r in results)
        return (sum(r.num_accepted for r in results) + steps) / steps

    engine = EngineConfig(max_sequence_length=256, max_batch_size=2)
    speculation = SpeculationConfig(expansion=(1, 1, 3, 1, 1, 1, 1, 1), adaptive=False)
    tuned = LLM(engine=engine, speculation=speculation)
    assert len(tuned.ssms) == 1 and tuned.ssms[0].config.num_layers == 3
    assert (tuned_ssm_path("tuned:1") / "model.safetensors").is_file()
    early_exit = LLM(ssms=["self:4"], engine=engine, speculation=speculation)
    assert tokens_per_step(tuned) > tokens_per_step(early_exit) + 0.4


def test_tuned_ssms_belong_to_the_default_model(tmp_path):
    from specinfer import LLM
    from specinfer.default_model import tuned_ssm_path
    from specinfer.errors import SpecInferError

    from .test_cli import VOCAB, write_byte_level_tokenizer

    with pytest.raises(SpecInferError, match="tuned:1, tuned:2"):
        tuned_ssm_path("tuned:7")
    save_random_llama(tmp_path / "llm", vocab_size=VOCAB)
    write_byte_level_tokenizer(tmp_path / "llm")
    with pytest.raises(SpecInferError, match="tuned for the default model"):
        LLM(str(tmp_path / "llm"), ssms=["tuned:1"])


def test_a_draft_vocabulary_scores_only_its_tokens_and_keeps_outputs_exact(random_models):
    import copy

    from specinfer.models.draft_vocab import use_draft_vocabulary

    llm, ssms = random_models
    ssm = copy.deepcopy(ssms[0])
    keep = list(range(0, 96, 3)) + [95]
    full_head = ssm.lm_head
    use_draft_vocabulary(ssm, keep)
    hidden = torch.randn(5, llm.config.hidden_size)
    logits = ssm.lm_head(hidden)
    assert logits.shape == (5, 96)
    assert torch.equal(logits[:, keep], full_head(hidden)[:, keep])
    outside = [t for t in range(96) if t not in keep]
    assert torch.isneginf(logits[:, outside]).all()
    expected = generate(llm, [], PROMPTS, mode="incremental")
    got = generate(llm, [ssm], PROMPTS, tree=FITTED_TREE)
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)
    assert sum(r.stats.num_accepted for r in got) > 0


class CyclingSizes:
    """Stands in for the adaptive controller: each step another tree of the ladder (or none), for every
    request or every other one, so that the drafters of all sizes and their caches interleave."""

    def __init__(self, sizes):
        self.sizes, self.step, self.ran = (0, *sizes), 0, []

    def choose(self, request_ids):
        self.step += 1
        size = self.sizes[self.step % len(self.sizes)]
        self.ran.append(size)
        chosen = request_ids if self.step % 3 else request_ids[::2]
        return size, set(chosen) if size else set()

    def record_step(self, *args):
        pass

    def record_refill(self, *args):
        pass

    def record_request(self, *args):
        pass

    def forget(self, request_id):
        pass


def generate_switching_sizes(llm, ssms, prompts, tree=None, batch=4, max_new=20, device="cpu", sampled_neighbour=False):
    manager = RequestManager(llm, ssms, EngineConfig(max_batch_size=batch, max_sequence_length=128, device=device),
                             SpeculationConfig(expansion=(1, 1, 3, 1, 1), tree=tree, sampled_children=sampled_neighbour),
                             eos_token_ids=[])
    manager.controller = CyclingSizes(manager.ladder.sizes)
    ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=max_new)) for p in prompts]
    if sampled_neighbour:
        manager.register_new_request(prompts[0], sampling=GenerationConfig(do_sample=True, max_new_tokens=max_new))
    manager.run()
    assert set(manager.controller.ran) == {0, *manager.ladder.sizes}
    return [manager.requests[i] for i in ids]


def test_adaptive_engine_captures_every_tree_size_when_a_batch_first_drafts(random_models, monkeypatch):
    """The controller moves between the ladder's sizes; graphs captured on first use would land in
    whichever step first tries a size. The first step that drafts for a batch captures them all: each
    size's drafter and the SSMs' catch-up passes at every batch bucket up to the batch (steps where some
    requests draft), and verification at every token bucket up to the whole tree's (the plain step's too)."""
    from specinfer.engine.cuda_graphs import CudaGraphs
    from specinfer.engine.host_batch import Layout
    from specinfer.spec.device_draft import DeviceTreeDrafter

    llm, ssms = random_models
    manager = RequestManager(llm, ssms[:2], EngineConfig(max_batch_size=4, max_sequence_length=128),
                             SpeculationConfig(tree=FITTED_TREE), eos_token_ids=[])
    captured = []

    class Graphs:  # stands in for CudaGraphs on the CPU: records what is captured, serves nothing
        batch_buckets: list[int] = []  # the SSMs' drafters then run eagerly
        graphs: dict = {}

        def bucket(self, *shape):
            return None

        def capture_up_to(self, batch, num_tokens):
            captured.append(("verify" if self is manager.llm.graphs else "catch up", batch, num_tokens))

    for runner in (manager.llm, *manager.ssms):
        runner.graphs = Graphs()
    manager.llm.graphs.batch_buckets = [1, 2, 4]
    monkeypatch.setattr(DeviceTreeDrafter, "capture",
                        lambda drafter, batch: captured.append(("draft", len(drafter.shape) - 1, batch)))
    for prompt in PROMPTS[:3]:
        manager.register_new_request(prompt, sampling=GenerationConfig(max_new_tokens=20))
    manager.step_log = []
    while not any(size for _, size, _, _ in manager.step_log):  # prefill, a plain step, the first draft
        manager.step()
    assert manager.ladder.sizes == (1, 3, 7, 11)
    whole = 1 + 2 * 11
    assert sorted(captured) == sorted(
        [("draft", size, batch) for batch in (1, 2, 3) for size in manager.ladder.sizes for _ in range(2)]
        + [("verify", 3, whole)] + [("catch up", batch, 16) for batch in (1, 2, 3)] * 2)
    # Verification of 1 to 23 tokens: every token bucket up to the one that serves 23, at batch bucket 4.
    graphs = CudaGraphs(llm, manager.llm.cache, max_batch=4)
    graphs._capture = lambda layout: layout  # records, captures nothing
    graphs.capture_up_to(3, whole)
    assert set(graphs.graphs) == {Layout(4, t, t) for t in (1, 2, 4, 8, 16, 32)}
    captured.clear()
    manager._capture_ladder(3)
    assert captured == []  # once per batch


@pytest.mark.parametrize("num_ssms", [1, 2])
@pytest.mark.parametrize("host_drafting", [False, True])
def test_switching_tree_sizes_every_step_keeps_outputs_exact(random_models, num_ssms, host_drafting):
    llm, ssms = random_models
    expected = generate(llm, [], PROMPTS, mode="incremental", max_new=30)
    got = generate_switching_sizes(llm, ssms[:num_ssms], PROMPTS, tree=FITTED_TREE, batch=5, max_new=30,
                                   sampled_neighbour=host_drafting)
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert len(g.output_tokens) == 30
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)
    assert sum(r.stats.num_accepted for r in got) > 0


@pytest.mark.parametrize("config", [GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=24),
                                    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=24)],
                         ids=["temperature-1", "temperature-0.7-top-p"])
def test_a_seed_samples_the_same_tokens_with_or_without_speculation(random_models, config):
    """Output token i of a sampled request is drawn at its generator's i-th uniform, however the steps
    fall: incremental decoding, a fixed tree and trees switching size every step (every request or every
    other) give the same tokens for the same seeds (the draws' distributions agree up to rounding, which
    moves a draw only where a uniform falls on a CDF step's edge)."""
    import dataclasses

    llm, ssms = random_models

    def serve(manager):
        ids = [manager.register_new_request(p, sampling=dataclasses.replace(config, seed=seed))
               for seed, p in enumerate(PROMPTS * 2)]
        manager.run()
        return [manager.requests[i].output_tokens for i in ids]

    engine = EngineConfig(max_batch_size=4, max_sequence_length=128)
    incremental = serve(RequestManager(llm, [], engine, SpeculationConfig(mode="incremental"), eos_token_ids=[]))
    fixed_manager = RequestManager(llm, ssms[:2], engine, SpeculationConfig(tree=FITTED_TREE, adaptive=False), eos_token_ids=[])
    fixed = serve(fixed_manager)
    switching_manager = RequestManager(llm, ssms[:1], engine, SpeculationConfig(tree=FITTED_TREE), eos_token_ids=[])
    switching_manager.controller = CyclingSizes(switching_manager.ladder.sizes)
    switching = serve(switching_manager)
    assert fixed == incremental and switching == incremental
    assert sum(fixed_manager.requests[i].stats.num_accepted for i in fixed_manager.requests) > 0


def test_bf16_tree_greedy_equals_incremental_on_cpu(tmp_path):
    """bf16 on a CPU (what `--dtype auto` picks where bf16 products are faster): tree speculation with a
    fitted shape and two SSMs gives the tokens of incremental decoding within bf16's rounding bound. Its
    products round each row alike at any row count, and attention runs in fp64 (layers/attention.py),
    where the CPU's bf16 SDPA rounded a row differently with the rows and cache length around it."""
    from specinfer.exactness import ROUNDING_BOUNDS

    reference = save_random_llama(tmp_path / "llm")
    for k in range(2):
        torch.manual_seed(100 + k)
        save_random_llama(tmp_path / f"ssm{k}", noise_from=reference)
    llm = load_model(tmp_path / "llm", "cpu", torch.bfloat16)
    ssms = [load_model(tmp_path / f"ssm{k}", "cpu", torch.bfloat16) for k in range(2)]
    expected = generate(llm, [], PROMPTS, mode="incremental", max_new=40)
    got = generate(llm, ssms, PROMPTS, tree=FITTED_TREE, batch=4, max_new=40)
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens, bound=ROUNDING_BOUNDS[torch.bfloat16])
    assert sum(r.stats.num_accepted for r in got) > 0
