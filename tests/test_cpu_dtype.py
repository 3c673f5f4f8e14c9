"""`--dtype auto` on a CPU (layers/cpu_dtype.py): bf16 where the products measure faster, else fp32."""

from __future__ import annotations

import math

import pytest
import torch

from specinfer.layers import cpu_dtype


@pytest.fixture
def fresh_choice():
    """The choice is made once per process: made afresh in the test and forgotten after it."""
    cpu_dtype.auto_cpu_dtype.cache_clear()
    yield
    cpu_dtype.auto_cpu_dtype.cache_clear()


def test_the_measurement_compares_both_dtypes():
    speedup = cpu_dtype.bf16_speedup(rows=1, repeats=1)
    assert math.isfinite(speedup) and speedup > 0


def test_the_measurement_streams_the_models_own_weights_within_limits():
    """Over the model's layers (a cache that holds a small chain in both dtypes hides bf16's gain), but
    never less than WORKING_SET nor more than MAX_WORKING_SET fp32 bytes."""
    layer = cpu_dtype.DEFAULT_LAYER
    layer_bytes = 4 * sum(k * n for k, n in layer)

    def chained(num_layers):
        return 4 * sum(k * n for k, n in cpu_dtype.chain_shapes(layer, num_layers))

    assert cpu_dtype.WORKING_SET <= chained(None) < cpu_dtype.WORKING_SET + layer_bytes
    assert 30 * layer_bytes <= chained(30) < 31 * layer_bytes  # the default model: 405 MiB
    assert cpu_dtype.MAX_WORKING_SET <= chained(1000) < cpu_dtype.MAX_WORKING_SET + layer_bytes


@pytest.mark.parametrize("native,speedup,expected", [
    (False, 3.0, torch.float32), (True, 1.1, torch.float32), (True, 1.9, torch.bfloat16)])
def test_auto_takes_bf16_only_where_native_and_measured_faster(monkeypatch, fresh_choice, native, speedup, expected):
    monkeypatch.delenv("SPECINFER_CPU_DTYPE", raising=False)
    monkeypatch.setattr(cpu_dtype, "native_bf16", lambda: native)
    monkeypatch.setattr(cpu_dtype, "bf16_speedup", lambda *args, **kwargs: speedup)
    dtype, why = cpu_dtype.auto_cpu_dtype()
    assert dtype == expected
    assert ("measured" in why) == native


def test_the_environment_fixes_the_choice(monkeypatch, fresh_choice, tmp_path):
    from specinfer import LLM, EngineConfig
    from specinfer.errors import SpecInferError

    from .conftest import save_random_llama
    from .test_cli import VOCAB, write_byte_level_tokenizer

    save_random_llama(tmp_path / "llm", vocab_size=VOCAB)
    write_byte_level_tokenizer(tmp_path / "llm")
    for name in ("bfloat16", "float32"):
        monkeypatch.setenv("SPECINFER_CPU_DTYPE", name)
        cpu_dtype.auto_cpu_dtype.cache_clear()
        llm = LLM(str(tmp_path / "llm"), ["self:1"], engine=EngineConfig(max_sequence_length=64))
        assert llm.dtype == getattr(torch, name) and next(llm.model.parameters()).dtype == llm.dtype
        assert llm.dtype_reason == "auto: SPECINFER_CPU_DTYPE"
        cpu_dtype.auto_cpu_dtype.cache_clear()
    monkeypatch.setenv("SPECINFER_CPU_DTYPE", "int3")
    with pytest.raises(SpecInferError, match="expected float32 or bfloat16"):
        cpu_dtype.auto_cpu_dtype()
