"""Weight-only int8/int4: layers against fp32 within stated error, and a quantized LLaMA still gives greedy
speculative output equal to its own incremental decoding."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from specinfer.cli import main
from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.errors import SpecInferError
from specinfer.models.loader import load_model
from specinfer.quant import QuantizedLinear, quantize_model

from .conftest import save_random_llama
from .test_cli import VOCAB, write_byte_level_tokenizer
from .test_speculative import PROMPTS, assert_greedy_equivalent, generate

# Relative output error ||y_q - y|| / ||y|| on Gaussian weights and inputs. Expected values: int8 per
# channel ~0.6% (step max|w|/127), int4 in groups of 32 ~8% (step range/15); the bounds leave headroom.
BOUNDS = {"int8": 0.01, "int4": 0.12}
# On the same text, the share of next-token argmaxes equal to the fp32 model's, and the mean cosine
# similarity of the logits (a tiny random model amplifies int4's ~8% per-layer error).
AGREEMENT = {"int8": 0.9, "int4": 0.3}
SIMILARITY = {"int8": 0.99, "int4": 0.9}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linear_within_stated_error(mode):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(7, 3, 256)
    q = QuantizedLinear(linear, mode, group_size=32)
    w = q.dequantized(torch.float32)
    # Every weight lies within half a quantization step of the original.
    if mode == "int8":
        step = q.scale[:, None]
    else:
        step = q.scale.repeat_interleave(32, dim=1)
    assert ((w - linear.weight).abs() <= step / 2 + 1e-6).all()
    with torch.no_grad():
        expected = linear(x)
        got = q(x)
    assert got.shape == expected.shape
    error = float((got - expected).norm() / expected.norm())
    assert error < BOUNDS[mode], error
    # Whatever kernel runs (int8 reads its weights directly on CPU), it computes the dequantized layer.
    torch.testing.assert_close(got, nn.functional.linear(x, w, linear.bias).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_quantized_layers_compute_the_separate_ones(mode):
    """Fusing q/k/v after quantizing (models/fuse.py) gives each part's own output."""
    from specinfer.models.fuse import concat_linears

    torch.manual_seed(0)
    parts = [QuantizedLinear(nn.Linear(128, n), mode, group_size=32) for n in (64, 32, 32)]
    fused = concat_linears(parts)
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_int4_needs_a_dividing_group():
    with pytest.raises(SpecInferError, match="multiple of the group size"):
        QuantizedLinear(nn.Linear(100, 8), "int4", group_size=64)


@pytest.mark.parametrize("mode, head", [("int8", False), ("int4", False), ("int4", True)],
                         ids=["int8", "int4", "int4-lm-head"])
def test_quantized_llama_speculates_exactly(tmp_path, mode, head):
    full = save_random_llama(tmp_path / "llm")
    save_random_llama(tmp_path / "ssm", noise_from=full)
    llm = quantize_model(load_model(tmp_path / "llm"), mode, group_size=32, lm_head=head)
    assert any(isinstance(m, QuantizedLinear) for m in llm.modules())
    assert isinstance(llm.lm_head, QuantizedLinear) == head
    assert llm.embed_tokens.weight.is_floating_point()  # a tied head's quantized copy leaves the embedding be
    ssm = load_model(tmp_path / "ssm")
    expected = generate(llm, [], PROMPTS, mode="incremental", max_new=20)
    got = generate(llm, [ssm], PROMPTS, expansion=(1, 2, 1, 1), max_new=20)
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert_greedy_equivalent(llm, prompt, g.output_tokens, e.output_tokens)
    # Quantization changes the model a little, not into another one: teacher-forced on the same tokens,
    # the quantized model's next-token choices mostly agree with the full-precision model's.
    tokens = [t for r in expected for t in r.prompt_tokens + r.output_tokens]
    chunk = [Chunk.chain(0, tokens, logits="all")]
    quantized = ModelRunner(llm, 1, len(tokens) + 1).forward(chunk)[0]
    full_precision = ModelRunner(load_model(tmp_path / "llm"), 1, len(tokens) + 1).forward(chunk)[0]
    agree = float((quantized.argmax(-1) == full_precision.argmax(-1)).float().mean())
    similarity = float(torch.nn.functional.cosine_similarity(quantized, full_precision, dim=-1).mean())
    assert agree >= AGREEMENT[mode] and similarity >= SIMILARITY[mode], (agree, similarity)


def test_cli_quantization_flag(tmp_path, capsys):
    llm = save_random_llama(tmp_path / "llm", vocab_size=VOCAB)
    write_byte_level_tokenizer(tmp_path / "llm")
    code = main(["--llm", str(tmp_path / "llm"), "--ssm", "self:1", "--quantization", "int4", "--quant-group-size",
                 "32", "--prompt", "hello", "--max-new-tokens", "6", "--max-sequence-length", "128", "--quiet", "--output", str(tmp_path / "o.jsonl")])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads((tmp_path / "o.jsonl").read_text())["tokens"]) == 6
    assert main(["--llm", str(tmp_path / "llm"), "--quantization", "int4", "--quant-group-size", "48",
                 "--prompt", "hello", "--max-new-tokens", "2", "--max-sequence-length", "128", "--quiet"]) == 2
    del llm


@pytest.mark.slow
def test_gguf_q4_1_blocks_become_int4_layers_exactly(default_gguf):
    """int4 from a Q4_1 GGUF keeps the file's own values and scales (the weights gguf dequantizes),
    where re-quantizing the dequantized weights would move some of them; the engine serves it."""
    from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig
    from specinfer.models.gguf_file import read_q4_1_blocks
    from specinfer.models.loader import load_model

    model = load_model(default_gguf)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"]
    dense = {(i, n): model.layers[i].get_submodule(n).weight.detach().clone() for i in (0, 29) for n in names}
    quantize_model(model, "int4", 64, read_q4_1_blocks(default_gguf))
    for (i, name), weight in dense.items():
        layer = model.layers[i].get_submodule(name)
        assert layer.group_size == 32
        assert torch.equal(layer.dequantized(torch.float32), weight), f"layer {i} {name}"

    llm = LLM(engine=EngineConfig(max_sequence_length=64, max_batch_size=1, quantization="int4"),
              speculation=SpeculationConfig(mode="incremental"))
    reference = LLM(engine=EngineConfig(max_sequence_length=64, max_batch_size=1),
                    speculation=SpeculationConfig(mode="incremental"))
    config = GenerationConfig(max_new_tokens=12)
    prompt = "Write a short poem about the ocean."
    # The same values in the same dtype: int4 serving gives the fp32 model's tokens.
    assert llm.generate([prompt], config)[0].output_tokens == reference.generate([prompt], config)[0].output_tokens


def check_gemv_kernels(device: str, dtype: torch.dtype, tolerance: float) -> None:
    """The one-row matrix-vector kernel (layers/decode_gemv.py, nothing folded in) computes the half-precision
    or dequantized layer, with row counts and widths that leave partial blocks."""
    from specinfer.layers.decode_gemv import decode_product

    torch.manual_seed(0)
    for out_features, in_features, group in [(96, 256, 32), (50, 192, 64), (33, 384, 128)]:
        linear = nn.Linear(in_features, out_features, bias=False)
        x = torch.randn(1, in_features).to(device, dtype)
        layers = [linear.to(device, dtype)] + [QuantizedLinear(linear, mode, group).to(device) for mode in ("int8", "int4")]
        for layer in layers:
            weight = layer.weight if isinstance(layer, nn.Linear) else layer.dequantized(torch.float32)
            expected = x.float() @ weight.float().T
            got = decode_product(x, layer)
            assert got.dtype == dtype and got.shape == expected.shape
            error = float((got.float() - expected).abs().max() / expected.abs().max())
            assert error < tolerance, (type(layer).__name__, getattr(layer, "mode", None), out_features, in_features, error)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_gemv_kernels_in_triton_interpreter():
    code = "import torch; from tests.test_quantization import check_gemv_kernels; check_gemv_kernels('cpu', torch.float32, 1e-5)"
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=Path(__file__).parent.parent,
                            env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_kernels_on_gpu(dtype):
    check_gemv_kernels("cuda", dtype, 1e-2)
