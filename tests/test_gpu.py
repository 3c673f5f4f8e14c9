"""On a CUDA GPU: greedy speculative output equals incremental decoding in the same dtype.

bf16 rounds far more coarsely than fp32, so a divergence is accepted only where the LLM's top-two logit
margin at the first differing position is within the dtype's bound in `specinfer.exactness`.
"""

from __future__ import annotations

import pytest
import torch

from specinfer.exactness import ROUNDING_BOUNDS
from specinfer.models.early_exit import early_exit_draft
from specinfer.models.loader import load_model

from .conftest import save_random_llama
from .test_speculative import FITTED_TREE, PROMPTS, assert_greedy_equivalent, generate


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,compiled", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                                            (torch.bfloat16, "fold-rows")])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("tree", [None, FITTED_TREE], ids=["expansion", "fitted-tree"])
def test_gpu_greedy_equals_incremental(tmp_path, dtype, compiled, batch, tree):
    """Compiled: both runs use the fused blocks (models/compile.py), as the engine does with --compile;
    "fold-rows": with fused projections, one-token passes folded (decode_gemv.py) and passes of several
    tokens too (rows_product.py). The fitted tree's levels are gathered from each parent's top-k inside
    the drafter's CUDA graph."""
    from specinfer.models.compile import compile_blocks
    from specinfer.models.fuse import fuse_projections

    bound = ROUNDING_BOUNDS[dtype]
    reference = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=reference)
    llm = load_model(tmp_path / "llm", "cuda", dtype)
    ssms = [load_model(tmp_path / "ssm", "cuda", dtype), early_exit_draft(llm, 1)]
    if compiled:
        for model in [llm, *ssms]:
            if compiled == "fold-rows":
                fuse_projections(model)
            compile_blocks(model, fold_rows=compiled == "fold-rows")
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]  # 8 requests, served in batches of `batch`
    expected = generate(llm, [], prompts, mode="incremental", batch=batch)
    got = generate(llm, ssms, prompts, expansion=(1, 2, 1, 1), batch=batch, tree=tree)
    for prompt, g, e in zip(prompts, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens, bound)
    assert sum(r.stats.num_accepted for r in got) > 0
    if compiled == "fold-rows":
        assert llm._every_block["rows_folded"] and ssms[0]._every_block["rows_folded"]  # the folded path was taken


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4", "int4-pairs"])
def test_gpu_quantized_greedy_equals_incremental(tmp_path, monkeypatch, mode):
    """Quantized layers and LM head in compiled bf16, as `--quantization ... --quantize-lm-head --compile`
    runs them: greedy speculation gives incremental decoding's tokens within bf16's rounding bound, the
    incremental steps through the batch-1 product kernels (decode_gemv.py), the verifications through the
    kernels of several rows. int4-pairs: int4 through the experimental bf16-pair kernel
    (SPECINFER_INT4_PAIRS=1), whose products round in bf16."""
    from specinfer.models.compile import compile_blocks
    from specinfer.models.fuse import fuse_projections
    from specinfer.quant.linear import quantize_model

    monkeypatch.setenv("SPECINFER_INT4_PAIRS", "1" if mode == "int4-pairs" else "0")
    bound = ROUNDING_BOUNDS[torch.bfloat16]
    reference = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=reference)
    llm = quantize_model(load_model(tmp_path / "llm", "cuda", torch.bfloat16), mode.split("-")[0], group_size=32,
                         lm_head=True)
    ssm = load_model(tmp_path / "ssm", "cuda", torch.bfloat16)
    for model in (llm, ssm):
        compile_blocks(fuse_projections(model))
    expected = generate(llm, [], PROMPTS, mode="incremental", batch=1)
    got = generate(llm, [ssm], PROMPTS, expansion=(1, 2, 1, 1), batch=1)
    for prompt, g, e in zip(PROMPTS, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens, bound)
    assert sum(r.stats.num_accepted for r in got) > 0
    assert llm._every_block["decodes_folded"]  # the incremental steps took the batch-1 kernels


@pytest.mark.gpu
def test_cuda_graph_forward_matches_eager(tmp_path):
    from specinfer.engine.model_runner import Chunk, ModelRunner

    save_random_llama(tmp_path)
    model = load_model(tmp_path, "cuda", torch.float32)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6]
    tree = Chunk(0, [7, 8, 9, 10, 11], [-1, 0, 0, 1, 3], list(range(5)))
    outputs = []
    for graphs in (False, True):
        runner = ModelRunner(model, num_slots=3, capacity=64, use_cuda_graphs=graphs)
        runner.forward([Chunk.chain(0, prefix, logits="none")])
        runner.commit(0, list(range(len(prefix))))
        outputs.append(runner.forward([tree])[0])
        runner.commit(0, [0, 1, 3])
        outputs.append(runner.forward([Chunk.chain(0, [12])])[0])
        assert (runner.graphs is not None) == graphs and (not graphs or runner.graphs.graphs)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-4, atol=1e-4)
    # A cache smaller than the token bucket (here 5 tokens, bucket 8) must not write out of bounds.
    small = ModelRunner(model, num_slots=1, capacity=6, use_cuda_graphs=True)
    small.forward([Chunk.chain(0, [1, 2, 3, 4, 5])])
    torch.cuda.synchronize()
    torch.testing.assert_close(outputs[3], outputs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_gpu_quantized_kernels_match_dequantized_weights(mode, rows):
    """The packed GPU kernels compute with the same quantized weights as the dequantize-and-multiply path."""
    from specinfer.quant.linear import QuantizedLinear

    torch.manual_seed(rows)
    for in_features, out_features in [(256, 512), (4096, 1024), (1536, 576)]:
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = QuantizedLinear(linear, mode, group_size=64)
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        reference = x.double() @ layer.dequantized(torch.float64).T
        out = layer(x)
        assert out.shape == (rows, out_features) and torch.isfinite(out).all()
        error = (out.double() - reference).norm() / reference.norm()
        assert error < 1e-2, f"{mode} {in_features}x{out_features}, {rows} rows: relative error {error:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_switching_tree_sizes_keeps_outputs_exact(tmp_path, batch):
    """The adaptive engine keeps one drafter (with its CUDA graphs) per tree size of the ladder; sizes
    switch every step here, for all requests or every other one."""
    from .test_speculative import generate_switching_sizes

    reference = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=reference)
    llm = load_model(tmp_path / "llm", "cuda", torch.bfloat16)
    ssms = [load_model(tmp_path / "ssm", "cuda", torch.bfloat16), early_exit_draft(llm, 1)]
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    expected = generate(llm, [], prompts, mode="incremental", batch=batch, device="cuda", max_new=30)
    got = generate_switching_sizes(llm, ssms, prompts, tree=FITTED_TREE, batch=batch, device="cuda", max_new=30)
    for prompt, g, e in zip(prompts, got, expected):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens, ROUNDING_BOUNDS[torch.bfloat16])
    assert sum(r.stats.num_accepted for r in got) > 0


@pytest.mark.gpu
def test_gpu_tree_sizes_switching_capture_no_graph_after_the_first_draft(tmp_path):
    """Every size of the ladder in turn, for all 4 requests or every other one: every graph the run
    replays while the 4 requests decode (each size's drafter at batch buckets 2 and 4, verification of
    whole and cut trees, plain steps, the SSM's catch-ups) exists once the first step has drafted."""
    from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
    from specinfer.engine.request_manager import RequestManager

    from .test_speculative import CyclingSizes

    reference = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=reference)
    llm = load_model(tmp_path / "llm", "cuda", torch.bfloat16)
    ssm = load_model(tmp_path / "ssm", "cuda", torch.bfloat16)
    manager = RequestManager(llm, [ssm], EngineConfig(max_batch_size=4, max_sequence_length=128, device="cuda"),
                             SpeculationConfig(tree=FITTED_TREE), eos_token_ids=[])
    manager.controller = CyclingSizes(manager.ladder.sizes)  # the first draft is for every request
    for prompt in PROMPTS[:4]:
        manager.register_new_request(prompt, sampling=GenerationConfig(max_new_tokens=40))

    def graphs():
        drafters = {(len(d.shape), b) for d in manager._drafters.values() for b in d.graphs}
        llm, ssm = (set(runner.graphs.graphs) for runner in (manager.llm, *manager.ssms))
        return llm, drafters, ssm

    manager.step_log = []
    while not any(size for _, size, _, _ in manager.step_log):
        manager.step()
    after_first_draft = graphs()
    # While all 4 decode (requests that finish early leave smaller batches, captured when they first draft).
    while len([r for r in manager.scheduler.running if r.num_remaining > 1]) == 4:
        manager.step()
        assert graphs() == after_first_draft
    assert set(manager.controller.ran) == {0, *manager.ladder.sizes}
    assert {b for _, b in after_first_draft[1]} == {1, 2, 4}


@pytest.mark.gpu
def test_gpu_device_drafter_batch_matches_host_drafting(tmp_path):
    """A batch of requests (padded to the graph's bucket) drafts in one CUDA graph exactly the trees that
    host drafting grows one request at a time: every row reads its own slot and cache length."""
    from specinfer.config import GenerationConfig
    from specinfer.engine.model_runner import ModelRunner
    from specinfer.spec.device_draft import DeviceTreeDrafter
    from specinfer.spec.draft import DraftRequest, expand
    from specinfer.spec.tree import TreeShape

    save_random_llama(tmp_path)
    ssm = load_model(tmp_path, "cuda", torch.float32)
    shape = TreeShape.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
    expected = [expand(ModelRunner(ssm, num_slots=1, capacity=64), [DraftRequest(0, p, 8, GenerationConfig(), None)],
                       shape)[0].tree.tokens for p in prompts]
    runner = ModelRunner(ssm, num_slots=4, capacity=64)
    drafter = DeviceTreeDrafter(runner, shape)
    slots = [3, 0, 2]
    for _ in range(2):  # the first call captures the graph (batch bucket 4: one padding row)
        for slot in slots:
            runner.release(slot)
        got = drafter.draft(prompts, slots)[0].tolist()
        assert drafter.graphs and got == expected


@pytest.mark.gpu
def test_gpu_plain_steps_in_flight_give_the_tokens_of_steps_read_back_one_by_one(tmp_path):
    """On the GPU (CUDA graphs, the pinned copy of each step's tokens, its event): plain steps queued
    ahead of their read-back, with requests joining, ending at EOS a step before the host knows, and by
    length, give bit for bit what steps read back one by one give (the same passes, the same shapes)."""
    from .test_in_flight import serve

    save_random_llama(tmp_path / "llm")
    llm = load_model(tmp_path / "llm", "cuda", torch.bfloat16)
    reference, _ = serve(llm, [], overlap=False)
    eos = reference[1].output_tokens[4]
    reference, _ = serve(llm, [], overlap=False, eos=[eos])
    got, chained = serve(llm, [], overlap=True, eos=[eos])
    assert chained > 10
    assert [g.output_tokens for g in got] == [r.output_tokens for r in reference]
    assert [g.finish_reason for g in got] == [r.finish_reason for r in reference]


@pytest.mark.gpu
def test_gpu_drafts_launched_ahead_give_the_tokens_of_drafts_after_the_read_back(tmp_path):
    """On the GPU (CUDA graphs, the drafter fed from the device): greedy fixed-tree steps whose next draft
    is launched before the step is read back (`overlap_tree_steps`) give the tokens of steps drafted
    after it. The SSM's catch-up pass is wider there (the whole accepted path), so in bf16 its drafts, and
    with them the tokens accepted per step, may differ by rounding; the LLM's outputs only within the
    rounding bound."""
    from .test_overlap_tree_steps import serve

    reference = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=reference)
    llm = load_model(tmp_path / "llm", "cuda", torch.bfloat16)
    ssm = load_model(tmp_path / "ssm", "cuda", torch.bfloat16)
    expected, _ = serve(llm, [ssm], overlap=False)
    got, manager = serve(llm, [ssm], overlap=True)
    assert manager.next_drafts_taken > 5
    from .test_overlap_tree_steps import MORE_PROMPTS
    for prompt, g, e in zip(MORE_PROMPTS, got, expected):  # same passes per row: identical, as a rule
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens, ROUNDING_BOUNDS[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_sampled_requests_draw_on_the_device_the_tokens_incremental_sampling_draws(tmp_path):
    """Sampled requests through the device path (top-k trees, the LLM's tokens drawn at every node on the
    GPU, no distribution copied to the host): with the same seeds, the tokens of incremental sampling
    (fp32, where rounding moves a draw only at a CDF step's very edge)."""
    import dataclasses

    from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
    from specinfer.engine.request_manager import RequestManager

    reference = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=reference)
    llm = load_model(tmp_path / "llm", "cuda", torch.float32)
    ssm = load_model(tmp_path / "ssm", "cuda", torch.float32)
    config = GenerationConfig(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=24)

    def serve(ssms, speculation):
        manager = RequestManager(llm, ssms, EngineConfig(max_batch_size=4, max_sequence_length=128, device="cuda"),
                                 speculation, eos_token_ids=[])
        ids = [manager.register_new_request(p, sampling=dataclasses.replace(config, seed=seed))
               for seed, p in enumerate(PROMPTS * 2)]
        manager.run()
        return [manager.requests[i] for i in ids]

    incremental = serve([], SpeculationConfig(mode="incremental"))
    tree = serve([ssm], SpeculationConfig(tree=FITTED_TREE, adaptive=False))
    assert [r.output_tokens for r in tree] == [r.output_tokens for r in incremental]
    assert sum(r.stats.num_accepted for r in tree) > 0
