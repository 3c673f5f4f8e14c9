"""Stochastic verification samples exactly the LLM's distribution (chi-square tests at ALPHA).

Each test also runs a deliberately wrong verifier and requires the same test to reject it, so a pass
means the test had the power to see a biased rule.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import specinfer.spec.verify as verify_module
from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.engine.request_manager import RequestManager
from specinfer.models.loader import load_model
from specinfer.spec.sampling import logits_to_probs
from specinfer.spec.tree import TokenTree
from specinfer.spec.verify import verify_stochastic

from .conftest import save_random_llama

ALPHA = 1e-3
VOCAB = 6
NEW_TOKENS = 3
PROMPT = [1, 2, 3]


def chi_square_p_value(counts: dict, expected_probs: dict, total: int) -> float:
    """Pearson chi-square; cells expected below 5 are pooled into one."""
    observed, expected, pooled_o, pooled_e = [], [], 0.0, 0.0
    for cell, p in expected_probs.items():
        e = p * total
        if e < 5:
            pooled_o += counts.get(cell, 0)
            pooled_e += e
        else:
            observed.append(counts.get(cell, 0))
            expected.append(e)
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    statistic = ((o - e) ** 2 / e).sum()
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def exact_sequence_probs(llm, config: GenerationConfig) -> dict:
    """P(x1..xn) under plain sampling from the LLM, by enumerating every sequence."""
    def next_probs(prefix):
        tokens = PROMPT + list(prefix)
        runner = ModelRunner(llm, num_slots=1, capacity=len(tokens) + 1)
        logits = runner.forward([Chunk.chain(0, tokens)])[0][0]
        return logits_to_probs(logits, config)

    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW_TOKENS):
        p = 1.0
        for i in range(NEW_TOKENS):
            p *= float(next_probs(seq[:i])[seq[i]])
        probs[seq] = p
    return probs


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, initializer_range=0.3)
    reference = save_random_llama(root / "llm", seed=0, **shape)
    save_random_llama(root / "ssm0", seed=7, **shape)  # an unrelated draft: many rejections
    torch.manual_seed(8)
    save_random_llama(root / "ssm1", noise_from=reference, **shape)  # a close draft: many acceptances
    return load_model(root / "llm"), [load_model(root / "ssm0"), load_model(root / "ssm1")]


def sample_sequences(llm, ssms, config: GenerationConfig, num: int, tree=None, sampled_children=True,
                     extra_tokens: int = 0) -> dict:
    """Counts of the first NEW_TOKENS tokens of `num` seeded generations of NEW_TOKENS + `extra_tokens`
    (with extra tokens, the step after the prefill may draft a tree as deep as 1 + extra_tokens), and the
    tokens accepted."""
    manager = RequestManager(llm, ssms, EngineConfig(max_batch_size=256, max_sequence_length=16),
                             SpeculationConfig(expansion=(2, 2), adaptive=False, tree=tree,
                                               sampled_children=sampled_children), eos_token_ids=[])
    ids = [manager.register_new_request(PROMPT, sampling=GenerationConfig(
        do_sample=True, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        seed=seed, max_new_tokens=NEW_TOKENS + extra_tokens)) for seed in range(num)]
    manager.run()
    counts: dict = {}
    for i in ids:
        seq = tuple(manager.requests[i].output_tokens[:NEW_TOKENS])
        counts[seq] = counts.get(seq, 0) + 1
    accepted = sum(manager.requests[i].stats.num_accepted for i in ids)
    return counts, accepted


def _no_residual_step(tree, node, p, generator):
    """Wrong on purpose: after a rejection keep testing the next draw against p, not the residual."""
    for proposal in tree.proposals[node]:
        token, q = tree.tokens[proposal.child], proposal.q
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[token] / q[token])):
            return proposal.child, p
    return None, p


CONFIGS = {
    "temperature-1": GenerationConfig(do_sample=True),
    "temperature-0.7-top-k-4": GenerationConfig(do_sample=True, temperature=0.7, top_k=4),
    "top-p-0.8": GenerationConfig(do_sample=True, top_p=0.8),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_tree_sampling_matches_llm_distribution(tiny_models, name, monkeypatch):
    llm, ssms = tiny_models
    config = CONFIGS[name]
    exact = exact_sequence_probs(llm, config)
    num = 6000
    counts, accepted = sample_sequences(llm, ssms, config, num)
    assert accepted > num // 4, "the drafts must be accepted often for the test to mean anything"
    p_value = chi_square_p_value(counts, exact, num)
    assert p_value > ALPHA, f"speculative samples differ from the LLM's distribution (p = {p_value:.2e})"
    if name == "temperature-1":
        monkeypatch.setattr(verify_module, "_speculative_sampling_step", _no_residual_step)
        wrong_counts, _ = sample_sequences(llm, ssms, config, num)
        wrong_p = chi_square_p_value(wrong_counts, exact, num)
        assert wrong_p < ALPHA, f"the test failed to reject a biased verifier (p = {wrong_p:.2e})"


def test_sampling_along_a_fitted_tree_matches_llm_distribution(tiny_models):
    """A fitted shape gives each node its own number of draws (here 3 under the root, 1 or 2 below)."""
    llm, ssms = tiny_models
    config = CONFIGS["temperature-1"]
    num = 6000
    counts, accepted = sample_sequences(llm, ssms, config, num, tree=((0,), (1,), (2,), (0, 0), (0, 1), (1, 0)))
    assert accepted > num // 4
    p_value = chi_square_p_value(counts, exact_sequence_probs(llm, config), num)
    assert p_value > ALPHA, f"speculative samples differ from the LLM's distribution (p = {p_value:.2e})"


def test_top_k_children_rule():
    """A tree of deterministic (top-k) children: each child is a point mass (rule 3)."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 5) * 2, -1)  # LLM distributions at root, child a, child b
    tree = TokenTree(tokens=[0, 1, 3], parents=[-1, 0, 0])
    generator = torch.Generator().manual_seed(0)
    num = 20000
    counts: dict = {}
    for _ in range(num):
        result = verify_stochastic(tree, p, generator)
        seq = tuple(result.new_tokens(tree))[:2]
        seq = seq if len(seq) == 2 else (seq[0], None)
        counts[seq] = counts.get(seq, 0) + 1
    # Exact: first token ~ p_root; the second exists only after a child, drawn from that child's p.
    exact = {}
    for x in range(5):
        child = {1: 1, 3: 2}.get(x)
        if child is None:
            exact[(x, None)] = float(p[0, x])
        else:
            for y in range(5):
                exact[(x, y)] = float(p[0, x] * p[child, y])
    assert chi_square_p_value(counts, exact, num) > ALPHA


def test_sampling_with_a_draft_vocabulary_matches_llm_distribution(tiny_models):
    """A close SSM scoring only half the vocabulary: its draws never leave that half (q is exactly 0
    outside it), and the LLM's distribution still comes out, tokens outside the half included."""
    import copy

    from specinfer.models.draft_vocab import use_draft_vocabulary

    llm, ssms = tiny_models
    ssm = use_draft_vocabulary(copy.deepcopy(ssms[1]), list(range(0, VOCAB, 2)))
    config = CONFIGS["temperature-1"]
    num = 6000
    counts, accepted = sample_sequences(llm, [ssm], config, num)
    assert accepted > num // 8
    assert any(t % 2 for seq in counts for t in seq)  # the LLM's own tokens cover the other half
    p_value = chi_square_p_value(counts, exact_sequence_probs(llm, config), num)
    assert p_value > ALPHA, f"speculative samples differ from the LLM's distribution (p = {p_value:.2e})"


def _one_uniform_a_step(request, count, ahead=0):
    """Wrong on purpose: one uniform for every output position a step may fill, so the tokens of one
    step are drawn together, not independently."""
    return [float(torch.rand((), generator=request.generator))] * count


@pytest.mark.parametrize("name", CONFIGS)
def test_top_k_trees_drafted_on_the_device_sample_the_llm_distribution(tiny_models, name, monkeypatch):
    """Sampled requests drafting top-k children (the default): every SSM's greedy tree from the device
    drafter, side by side under the root, the LLM's token drawn at every node at the uniform of its output
    position and descended into where it is a child (rule 3). One token more than judged, so that the
    step after the prefill drafts two levels."""
    from specinfer.engine.sequence import Request

    llm, ssms = tiny_models
    config = CONFIGS[name]
    exact = exact_sequence_probs(llm, config)
    num = 6000
    counts, accepted = sample_sequences(llm, ssms, config, num, sampled_children=False, extra_tokens=1)
    assert accepted > num // 4, "the drafts must be accepted often for the test to mean anything"
    p_value = chi_square_p_value(counts, exact, num)
    assert p_value > ALPHA, f"speculative samples differ from the LLM's distribution (p = {p_value:.2e})"
    if name == "temperature-1":
        # The same SSM twice: every drafted path twice over, which must not give a path two chances.
        twice = [ssms[1], ssms[1]]
        counts, _ = sample_sequences(llm, twice, config, num, sampled_children=False, extra_tokens=1)
        p_value = chi_square_p_value(counts, exact, num)
        assert p_value > ALPHA, f"speculative samples differ from the LLM's distribution (p = {p_value:.2e})"
        monkeypatch.setattr(Request, "position_uniforms", _one_uniform_a_step)
        wrong_counts, _ = sample_sequences(llm, ssms, config, num, sampled_children=False, extra_tokens=1)
        wrong_p = chi_square_p_value(wrong_counts, exact, num)
        assert wrong_p < ALPHA, f"the test failed to reject a biased verifier (p = {wrong_p:.2e})"
