"""What `--dtype auto` means on a CPU: bfloat16 where this CPU's products run faster in it, else float32.

Decoding on a CPU is bound by streaming the weights from memory, so half the bytes can nearly halve a
step, but only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX, which oneDNN reports) and
PyTorch takes that path. On a 2-core AMD EPYC (Zen 4) the products of a 30-layer stack of the default
model's shapes, weights streaming from memory, took 18.9 ms in bf16 against 33.9 ms in fp32 for one
row and 27.5 against 67.5 ms for 21 rows (a verified tree), and the default model's incremental step
went from 62 to 37 ms (plain products, before layers/cpu_linear.py); an x86 Xeon with AMX once decoded
slower in bf16 with an earlier engine, and bf16's lead narrows for wider layers. So the choice is
measured once per process and model shape: a chain of the model's own products over the model's own
weight bytes (at least 48 MiB, at most 768 MiB of fp32), in both dtypes taking turns, multiplied as the
engine will (about 0.5 s for the default model), bf16 taken where it is at least `MIN_SPEEDUP` times
faster. The model's own size matters: on a 2-core Xeon with AMX and a 300 MiB L3 (2026-12-07) a 48 MiB
chain sat in the cache in both dtypes and measured 0.98-1.8x, which kept fp32 (the main command decoded
at 22.8 tok/s), while over the default model's 405 MiB of fp32 layers bf16 measures 2.0-2.2x (its bf16
weights nearly fit that cache, its fp32 ones do not) and the main command decodes at 27-40 tok/s. `SPECINFER_CPU_DTYPE`
(float32 or bfloat16) fixes the choice instead (the tests pin float32, whose rounding bound they assert).
"""

from __future__ import annotations

import functools
import itertools
import os
import time

import torch
import torch.nn.functional as F

from . import cpu_linear

MIN_SPEEDUP = 1.25  # well clear of run-to-run noise, so that the choice does not flip between runs
WORKING_SET = 48 * 2**20  # fp32 bytes of weights a measurement streams at least: beyond most caches
MAX_WORKING_SET = 768 * 2**20  # ... and at most, however large the model (its allocation is the cost)
# (in, out) of one layer's products where the model's shapes are not known: SmolLM2-135M's
DEFAULT_LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def layer_products(cfg) -> list[tuple[int, int]]:
    """(in, out) of a LLaMA-style layer's products (fused q/k/v and gate/up) for a `ModelConfig`."""
    heads = cfg.num_heads * cfg.head_dim
    return [(cfg.hidden_size, heads + 2 * cfg.num_kv_heads * cfg.head_dim), (heads, cfg.hidden_size),
            (cfg.hidden_size, 2 * cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size)]


def native_bf16() -> bool:
    """Whether oneDNN multiplies bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def chain_shapes(layer: list[tuple[int, int]], num_layers: int | None = None) -> list[tuple[int, int]]:
    """The products a measurement chains: the layer's, repeated over the model's layers or until
    `WORKING_SET` fp32 bytes, whichever is more, and no further than `MAX_WORKING_SET`."""
    model_bytes = 4 * sum(k * n for k, n in layer) * (num_layers or 0)
    target = min(max(WORKING_SET, model_bytes), MAX_WORKING_SET)
    shapes, size = [], 0
    for k, n in itertools.cycle(layer):
        shapes.append((k, n))
        size += 4 * k * n
        if size >= target:
            return shapes


def bf16_speedup(layer: list[tuple[int, int]] | None = None, rows: int = 1, repeats: int = 5,
                 num_layers: int | None = None) -> float:
    """fp32 time over bf16 time of a chain of products of `rows` rows over a layer's shapes, repeated for
    `num_layers` layers (the model's own weights, as the engine streams them) or until `WORKING_SET`
    bytes, whichever is more, up to `MAX_WORKING_SET`; each dtype multiplied as the engine would (packed
    for oneDNN where it can be); the best of `repeats` chains each, the dtypes' chains taking turns so
    that a clock still ramping up (or bf16 units waking) weighs on neither alone."""
    shapes = chain_shapes(layer or DEFAULT_LAYER, num_layers)
    chains = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.full((n, k), 0.01, dtype=dtype) for k, n in shapes]
        inputs = [torch.full((rows, k), 0.5, dtype=dtype) for k, _ in shapes]
        if cpu_linear.available(dtype):  # as the engine will multiply (layers/cpu_linear.py)
            chains[dtype] = (inputs, [cpu_linear.pack_weight(w) for w in weights], cpu_linear.packed_product)
        else:
            chains[dtype] = (inputs, weights, F.linear)
    times = {dtype: float("inf") for dtype in chains}
    for _ in range(repeats):
        for dtype, (inputs, weights, product) in chains.items():
            start = time.perf_counter()
            for x, weight in zip(inputs, weights):
                product(x, weight)
            times[dtype] = min(times[dtype], time.perf_counter() - start)
    return times[torch.float32] / times[torch.bfloat16]


@functools.cache
def auto_cpu_dtype(layer: tuple[tuple[int, int], ...] | None = None,
                   num_layers: int | None = None) -> tuple[torch.dtype, str]:
    """The dtype `auto` picks on this CPU for a model of `num_layers` layers of `layer`'s product shapes,
    and why, in words (measured once per process and model shape; see the module)."""
    fixed = os.environ.get("SPECINFER_CPU_DTYPE")
    if fixed:
        if fixed not in ("float32", "bfloat16"):
            from ..errors import SpecInferError

            raise SpecInferError(f"SPECINFER_CPU_DTYPE={fixed!r}: expected float32 or bfloat16")
        return getattr(torch, fixed), "SPECINFER_CPU_DTYPE"
    if not native_bf16():
        return torch.float32, "no native bf16 products on this CPU"
    speedup = bf16_speedup(list(layer) if layer else None, num_layers=num_layers)
    dtype = torch.bfloat16 if speedup >= MIN_SPEEDUP else torch.float32
    return dtype, f"bf16 products measured {speedup:.2f}x as fast as fp32 on this CPU"
