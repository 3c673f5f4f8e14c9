"""Our models give the logits `transformers` gives, on small random checkpoints and on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.models.fuse import fuse_projections
from specinfer.models.loader import load_model

from .conftest import save_random_llama, save_random_opt


def prefill_logits(model, tokens: list[int]) -> torch.Tensor:
    runner = ModelRunner(model, num_slots=1, capacity=len(tokens) + 1)
    chunk = Chunk.chain(0, tokens, logits="all")
    return runner.forward([chunk])[0]


LLAMA_VARIANTS = {
    "gqa-untied": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}),
}

OPT_VARIANTS = {
    "pre-norm": {},
    "post-norm": dict(do_layer_norm_before=False),
    "project-in-out": dict(word_embed_proj_dim=32),
}


VARIANTS = [("llama", name, kw) for name, kw in LLAMA_VARIANTS.items()] + [
    ("opt", name, kw) for name, kw in OPT_VARIANTS.items()
]


@pytest.mark.parametrize("family,variant,overrides", VARIANTS, ids=[f"{f}-{v}" for f, v, _ in VARIANTS])
def test_logits_match_transformers(tmp_path, family, variant, overrides):
    """As loaded (Hugging Face's layout), and with fused projections (as the engine serves it)."""
    save = save_random_llama if family == "llama" else save_random_opt
    ref = save(tmp_path, **overrides)
    ours = load_model(tmp_path)
    tokens = torch.randint(0, 96, (40,)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits(ours, tokens), expected, rtol=1e-4, atol=1e-4)
    fuse_projections(ours)
    assert not any(name.split(".")[-1] in ("q_proj", "up_proj") for name, _ in ours.named_modules())
    torch.testing.assert_close(prefill_logits(ours, tokens), expected, rtol=1e-4, atol=1e-4)


def test_pytorch_bin_checkpoint(tmp_path):
    ref = save_random_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    tokens = list(range(10))
    with torch.no_grad():
        expected = ref(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits(load_model(tmp_path), tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(default_gguf):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    ours = load_model(default_gguf)
    prompt = [1, 504, 3458, 282, 4649, 314, 253, 1789, 28]
    with torch.no_grad():
        expected_logits = ref(torch.tensor([prompt])).logits[0]
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    torch.testing.assert_close(prefill_logits(ours, prompt), expected_logits, rtol=1e-3, atol=1e-3)
    # Greedy tokens through our engine's incremental path.
    from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
    from specinfer.engine.request_manager import RequestManager

    manager = RequestManager(ours, [], EngineConfig(max_sequence_length=64, max_batch_size=1),
                             SpeculationConfig(mode="incremental"), eos_token_ids=[])
    rid = manager.register_new_request(prompt, sampling=GenerationConfig(max_new_tokens=24))
    manager.run()
    assert manager.requests[rid].output_tokens == expected


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compiled_blocks_match_eager(tmp_path, family):
    """`--compile` (models/compile.py) fuses each block's halves, the cache write and the residual adds
    included: the logits and every cache entry written match the eager model's, over a prefill and a
    tree step that reads it back."""
    from specinfer.models.compile import compile_blocks

    (save_random_llama if family == "llama" else save_random_opt)(tmp_path)
    eager = fuse_projections(load_model(tmp_path))
    compiled = compile_blocks(fuse_projections(load_model(tmp_path)))
    prompt = torch.randint(0, 96, (12,)).tolist()
    tree = Chunk(0, [5, 6, 7, 8], [-1, 0, 0, 1], [0, 1, 2, 3])
    runs = []
    for model in (eager, compiled):
        runner = ModelRunner(model, num_slots=2, capacity=32)
        logits = runner.forward([Chunk.chain(0, prompt, logits="all")])
        runner.commit(0, list(range(len(prompt))))
        logits += runner.forward([tree])
        runs.append((torch.cat(logits), runner.cache.data.clone()))
    (eager_logits, eager_cache), (compiled_logits, compiled_cache) = runs
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_cache, eager_cache, rtol=1e-5, atol=1e-5)
    assert eager_cache.abs().sum() > 0
