"""One-token passes with norms, SwiGLU and residual adds folded into the products (layers/decode_gemv.py)
give the unfolded block's logits, in plain, int8 and int4 layers, and so do passes of several tokens
through layers/rows_product.py; on the CPU through Triton's interpreter."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import save_random_llama


def check_folded_decode(device: str, dtype: torch.dtype, tolerance: float, folder: str) -> None:
    """Decode 12 tokens greedily after a prompt unfolded, then feed the folded path the same tokens, with
    plain, int8 and int4 layers (group size 32): the same choice wherever the unfolded top two are further apart than the
    dtype's rounding bound (exactness.py), logits as close to the fp32 model's as the unfolded path's
    (within 1.5 times its error, or `tolerance` relative to the largest logit), and the folded path
    really taken. In half precision the two paths round differently (the unfolded one stores the
    normalised row in the activation dtype), so they are held to the fp32 model, not to each other."""
    import specinfer.models.llama as llama
    from specinfer.engine.model_runner import Chunk, ModelRunner
    from specinfer.exactness import ROUNDING_BOUNDS
    from specinfer.models.loader import load_model
    from specinfer.models.fuse import fuse_projections
    from specinfer.quant.linear import quantize_model

    calls = []
    product = llama.decode_product
    llama.decode_product = lambda *args, **kwargs: calls.append(1) or product(*args, **kwargs)
    prompt = [5, 17, 3, 44, 29, 8]
    for quantization in (None, "int8", "int4"):
        model = load_model(Path(folder), device, dtype)
        if quantization:
            quantize_model(model, quantization, group_size=32)
        fuse_projections(model)
        logits, tokens = {}, []
        reference = None
        if dtype != torch.float32:  # the same weights (and quantized values), computed in fp32
            reference = copy.deepcopy(model).float()
        for fold in (False, True, "reference"):
            if fold == "reference" and reference is None:
                break
            if fold == "reference":
                model = reference
            model.fold_decode = fold is True
            runner = ModelRunner(model, num_slots=2, capacity=64)
            steps = [runner.forward([Chunk.chain(1, prompt)])[0][0]]
            runner.commit(1, list(range(len(prompt))))
            for i in range(12):
                if not fold:
                    tokens.append(int(steps[-1].argmax()))
                steps.append(runner.forward([Chunk.chain(1, [tokens[i]])])[0][0])
                runner.commit(1, [0])
            logits[fold] = torch.stack(steps).float()
        assert calls, "the folded path was not taken"
        top = logits[False].topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > ROUNDING_BOUNDS[dtype]
        assert clear.any() and torch.equal(logits[True].argmax(-1)[clear], logits[False].argmax(-1)[clear]), quantization
        exact = logits.get("reference", logits[False])
        error = {fold: float((logits[fold] - exact).abs().max() / exact.abs().max()) for fold in (False, True)}
        assert error[True] <= max(tolerance, 1.5 * error[False]), (quantization, error)
        calls.clear()


def check_in_interpreter(check: str, dtype: str, tolerance: float, folder: Path) -> None:
    """Run `check` (a function of this file) on the CPU in a process of its own under Triton's interpreter
    (set before Triton is imported), on a small random LLaMA saved in `folder`."""
    save_random_llama(folder, vocab_size=64, hidden_size=64, intermediate_size=96)
    code = (f"import torch; from tests.test_decode_gemv import {check}; "
            f"{check}('cpu', torch.{dtype}, {tolerance}, {str(folder)!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                            env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_folded_decode_in_triton_interpreter(tmp_path):
    check_in_interpreter("check_folded_decode", "float32", 1e-5, tmp_path / "llm")


def check_split_products(device: str, dtype: torch.dtype, tolerance: float, folder: str) -> None:
    """One-row products whose columns split among 1, 2 and 4 programs a strip (decode_gemv's SPLIT_K), with
    nothing, a norm, a norm and SwiGLU, or a residual folded in, in plain, int8 and int4 layers: each the
    float64 product of the layer's own (dequantized) weights within `tolerance` (relative norm), the
    splits agreeing with the unsplit strip to rounding. `folder` is unused (check_in_interpreter's form)."""
    from specinfer.layers.decode_gemv import decode_product
    from specinfer.quant.linear import QuantizedLinear

    torch.manual_seed(0)
    K, N = 256, 48
    linear = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    norm = torch.nn.RMSNorm(K, eps=1e-5, device=device, dtype=dtype)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(1, K, device=device, dtype=dtype)
    residual = torch.randn(1, N, device=device, dtype=dtype)
    normed = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    for mode in (None, "int8", "int4"):
        layer = linear if mode is None else QuantizedLinear(linear, mode, group_size=32)
        weight = linear.weight.double() if mode is None else layer.dequantized(torch.float64)
        for folded in ("none", "norm", "norm+swiglu", "residual"):
            product = (normed if folded.startswith("norm") else x.double()) @ weight.T
            if folded == "norm+swiglu":
                gate, up = product.chunk(2, dim=-1)
                product = torch.nn.functional.silu(gate) * up
            expected = product + (residual.double() if folded == "residual" else 0)
            outs = []
            for split in (1, 2, 4):
                out = decode_product(x, layer, norm=norm if folded.startswith("norm") else None,
                                     gated=folded == "norm+swiglu", residual=residual if folded == "residual" else None,
                                     strip=(16, 64, 4, split))
                error = float((out.double() - expected).norm() / expected.norm())
                assert error < tolerance, (mode, folded, split, error)
                outs.append(out.double())
            spread = max(float((o - outs[0]).norm() / outs[0].norm()) for o in outs)
            assert spread < tolerance, (mode, folded, spread)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_split_products_in_triton_interpreter(tmp_path):
    check_in_interpreter("check_split_products", "float32", 1e-5, tmp_path / "llm")


def test_blocks_with_a_layer_the_kernels_cannot_read_stay_unfolded(tmp_path):
    """Projections left separate, or int4 groups narrower than a 32-bit word of packed weights, keep every
    block on the unfolded path; fused plain, int8 and int4 blocks fold."""
    from specinfer.models.loader import load_model
    from specinfer.models.fuse import fuse_projections
    from specinfer.quant.linear import quantize_model

    save_random_llama(tmp_path / "llm")
    separate = load_model(tmp_path / "llm")
    assert not any(block.decodes_folded() for block in separate.layers)
    narrow = fuse_projections(quantize_model(load_model(tmp_path / "llm"), "int4", group_size=4))
    assert not any(block.decodes_folded() for block in narrow.layers)
    assert all(block.decodes_folded() for block in fuse_projections(load_model(tmp_path / "llm")).layers)
    for mode in ("int8", "int4"):
        quantized = fuse_projections(quantize_model(load_model(tmp_path / "llm"), mode, group_size=32))
        assert all(block.decodes_folded() for block in quantized.layers), mode


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("passes", ["decode", "rows"])
def test_folded_passes_on_gpu(tmp_path, dtype, tolerance, passes):
    """One-token passes (decode_gemv.py) and passes of several tokens (rows_product.py)."""
    save_random_llama(tmp_path / "llm", vocab_size=64, hidden_size=256, intermediate_size=704,
                      num_attention_heads=4, num_key_value_heads=2)
    check = check_folded_decode if passes == "decode" else check_folded_rows
    check("cuda", dtype, tolerance, str(tmp_path / "llm"))


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "int8", "int4", "int8-products", "int4-products"])
def test_dependent_launches_give_the_logits_of_serial_launches_on_gpu(tmp_path, monkeypatch, quantization):
    """Batch-1 decoding through CUDA graphs with the half-precision products and the attention kernels
    launched as dependents of the kernel before (layers/dependent_launch.py: a product's first weights
    read before that kernel ends) gives, bit for bit, the logits of the same kernels launched one after
    another: any read before the wait of something a kernel before writes would show as a difference.
    With int8 and int4 weights only the attention kernels are dependents, unless SPECINFER_DEPENDENT_QUANTIZED=1
    (the "-products" cases) makes their products dependents too."""
    from specinfer.engine.model_runner import Chunk, ModelRunner
    from specinfer.layers import dependent_launch
    from specinfer.models.compile import compile_blocks
    from specinfer.models.fuse import fuse_projections
    from specinfer.models.loader import load_model
    from specinfer.quant.linear import quantize_model

    if torch.cuda.get_device_capability()[0] < 9 or dependent_launch.gdc_wait is None:
        pytest.skip("programmatic dependent launch needs Hopper and Triton 3.4")
    save_random_llama(tmp_path / "llm", vocab_size=64, hidden_size=512, intermediate_size=1408,
                      num_attention_heads=8, num_key_value_heads=4)
    model = load_model(tmp_path / "llm", "cuda", torch.bfloat16)
    if quantization:
        quantize_model(model, quantization.split("-")[0], group_size=32)
    monkeypatch.setenv("SPECINFER_DEPENDENT_QUANTIZED", "1" if quantization and quantization.endswith("products") else "0")
    compile_blocks(fuse_projections(model))
    logits = {}
    for dependent in ("1", "0"):
        monkeypatch.setenv("SPECINFER_DEPENDENT_LAUNCH", dependent)
        runner = ModelRunner(model, num_slots=1, capacity=96)  # graphs captured anew, with this setting
        token, steps = 5, []
        runner.forward([Chunk.chain(0, [5, 17, 3, 44])])
        runner.commit(0, [0, 1, 2, 3])
        for _ in range(40):
            step = runner.forward([Chunk.chain(0, [token])])[0][0]
            runner.commit(0, [0])
            steps.append(step)
            token = int(step.argmax())
        logits[dependent] = torch.stack(steps)
    assert torch.equal(logits["1"], logits["0"])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "int8", "int4", "int4-pairs"])
def test_every_strip_shape_computes_the_product_on_gpu(mode, monkeypatch):
    """Each of the autotuner's strip shapes (decode_gemv.strip_shapes), at widths its steps divide and at
    widths they do not (masked loads), with the norm folded in and with a residual (both split among
    programs too): the product of the
    layer's own (dequantized) weights, every output written (the output buffer is poisoned first)."""
    from specinfer.layers import decode_gemv
    from specinfer.quant.linear import QuantizedLinear

    torch.manual_seed(0)
    dtype = torch.bfloat16
    if mode == "int4-pairs":  # the experimental bf16-pair arithmetic (decode_gemv._word_in_pairs)
        monkeypatch.setenv("SPECINFER_INT4_PAIRS", "1")
    for in_features, out_features in [(4096, 1024), (1536, 576)]:
        linear = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=dtype)
        layer = linear if mode is None else QuantizedLinear(linear, mode[:4], group_size=64)
        weight = linear.weight.double() if mode is None else layer.dequantized(torch.float64)
        kind = {None: decode_gemv.HALF, "int8": decode_gemv.INT8, "int4": decode_gemv.INT4,
                "int4-pairs": decode_gemv.INT4_PAIRS}[mode]
        norm = torch.nn.RMSNorm(in_features, eps=1e-5, device="cuda", dtype=dtype)
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
        x = torch.randn(1, in_features, device="cuda", dtype=dtype)
        residual = torch.randn(1, out_features, device="cuda", dtype=dtype)
        normed = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
        for strip in decode_gemv.strip_shapes(kind, 64):
            for folded in (False, True):
                if not decode_gemv._split_fits(in_features, strip[1], strip[3]):
                    continue  # splits only of whole steps
                expected = (normed if folded else x.double()) @ weight.T + (0 if folded else residual.double())
                poison = torch.full((out_features,), float("nan"), device="cuda", dtype=dtype)
                del poison  # the allocator hands the next output this poisoned memory
                out = decode_gemv.decode_product(x, layer, norm=norm if folded else None,
                                                 residual=None if folded else residual, strip=strip)
                assert torch.isfinite(out).all(), (mode, strip, in_features)
                error = float((out.double() - expected).norm() / expected.norm())
                assert error < 1e-2, (mode, strip, in_features, folded, error)


def check_folded_rows(device: str, dtype: torch.dtype, tolerance: float, folder: str) -> None:
    """Passes of several tokens through `LlamaBlock.rows` (layers/rows_product.py): a prompt, then chains
    and a token tree, give the unfolded path's logits (within `tolerance` relative to the largest logit;
    in half precision both held to the fp32 model, as check_folded_decode does), the same choices where
    the unfolded top two are further apart than the rounding bound, and the folded path really taken."""
    import specinfer.models.llama as llama
    from specinfer.engine.model_runner import Chunk, ModelRunner
    from specinfer.exactness import ROUNDING_BOUNDS
    from specinfer.layers import rows_product
    from specinfer.models.fuse import fuse_projections
    from specinfer.models.loader import load_model

    calls = []
    product = rows_product.rows_product
    rows_product.rows_product = lambda *args, **kwargs: calls.append(1) or product(*args, **kwargs)
    try:
        model = fuse_projections(load_model(Path(folder), device, dtype))
        reference = copy.deepcopy(model).float() if dtype != torch.float32 else None
        prompt, chains = [5, 17, 3, 44, 29, 8], [[9, 2, 31], [7, 7], [40, 1, 12, 6]]
        tree = Chunk(1, [3, 11, 19, 4, 25], [-1, 0, 0, 1, 2], list(range(5)))  # two branches off one token
        logits = {}
        for fold in (False, True, "reference"):
            if fold == "reference" and reference is None:
                break
            net = reference if fold == "reference" else model
            net.fold_rows = fold is True
            runner = ModelRunner(net, num_slots=2, capacity=64)
            steps = [runner.forward([Chunk.chain(1, prompt, logits="all")])[0]]
            runner.commit(1, list(range(len(prompt))))
            for chain in chains:
                steps.append(runner.forward([Chunk.chain(1, chain, logits="all")])[0])
                runner.commit(1, list(range(len(chain))))
            steps.append(runner.forward([tree])[0])
            logits[fold] = torch.cat([s.reshape(-1, s.shape[-1]) for s in steps]).float()
            assert bool(calls) == (fold is True), "the folded path was not taken" if fold is True else "folded unasked"
            calls.clear()
        top = logits[False].topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > ROUNDING_BOUNDS[dtype]
        assert clear.any() and torch.equal(logits[True].argmax(-1)[clear], logits[False].argmax(-1)[clear])
        exact = logits.get("reference", logits[False])
        error = {fold: float((logits[fold] - exact).abs().max() / exact.abs().max()) for fold in (False, True)}
        assert error[True] <= max(tolerance, 1.5 * error[False]), error
    finally:
        rows_product.rows_product = product


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3)])  # the interpreter's bf16 dot is wrong
def test_folded_rows_in_triton_interpreter(tmp_path, dtype, tolerance):
    check_in_interpreter("check_folded_rows", dtype, tolerance, tmp_path / "llm")
