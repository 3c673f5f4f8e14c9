"""Weight-only quantized matmuls at decode shapes: each kernel's time and the weight bandwidth it reaches.

    python benchmarks/quant_kernels.py --device cuda [--dtype bfloat16 --rows 1 --group-size 64 --tag h200_bf16]

The linear layers of a 7B-shaped LLaMA (q/k/v and gate/up fused, as the engine runs them), random
weights, 1 to 4 rows (decode and small trees): full precision (cuBLAS), int8 (our tile kernel) and int4
(PyTorch's tinygemm); at one row also our matrix-vector kernel, the batch-1 decode step's, which folds
norms and residual adds into its products (layers/decode_gemv.py, "decode" columns; here with nothing
folded in; "int4 pairs": its experimental bf16-pair arithmetic, SPECINFER_INT4_PAIRS=1). The H100 table of 2026-11-23 (`quant_kernels_h100.md`) timed an earlier matrix-vector kernel. Each time is a median
over repeats of a CUDA graph that calls the kernel on 8 distinct copies of the layer back to
back (so that no weight is served from L2, and no host launch cost counts). Writes JSON and a Markdown table (device, torch version, date) to
docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
from torch import nn

from specinfer.layers.decode_gemv import decode_product
from specinfer.quant import QuantizedLinear
from specinfer.quant.int8_triton import int8_matmul

# (name, out_features, in_features) of a 7B LLaMA block, projections fused.
SHAPES = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]


COPIES = 8  # distinct copies of each layer, run in turn, so that no weight is served from the 50 MB L2


def per_call_ms(calls: list, repeats: int = 20) -> float:
    """Median over `repeats` of one replay of a CUDA graph of all `calls` back to back, per call. The
    graph leaves out the host's launch cost (Triton's launcher alone takes tens of µs), as the engine's
    captured steps do."""
    for call in calls:  # warm-up: autotuning and lazy set-up happen outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return sorted(times)[len(times) // 2]


def in_bf16_pairs(call):
    """`call` with int4 products through the experimental bf16-pair kernel (SPECINFER_INT4_PAIRS=1, which
    decode_product reads at each launch, the graph's capture included)."""
    def paired():
        os.environ["SPECINFER_INT4_PAIRS"] = "1"
        try:
            return call()
        finally:
            os.environ.pop("SPECINFER_INT4_PAIRS")
    return paired


def kernel_calls(linear: nn.Linear, q8: QuantizedLinear, q4: QuantizedLinear, x: torch.Tensor) -> dict:
    """label -> (call, bytes of weights it reads)."""
    n, k = linear.weight.shape
    group = q4.group_size
    calls = {
        "fp": (lambda: torch.nn.functional.linear(x, linear.weight), 2 * n * k),
        "int8 tile": (lambda: int8_matmul(x, q8.qweight, q8.scale), n * k),
    }
    if x.shape[0] == 1:  # the batch-1 decode kernel (layers/decode_gemv.py), here with nothing folded in
        for label, layer, weight_bytes in (("fp", linear, 2 * n * k), ("int8", q8, n * k), ("int4", q4, n * k // 2)):
            calls[f"{label} decode"] = (lambda layer=layer: decode_product(x, layer), weight_bytes)
        if x.is_cuda:
            calls["int4 pairs decode"] = (in_bf16_pairs(lambda: decode_product(x, q4)), n * k // 2)
    if q4._tinygemm() is not None:
        weight, scales_and_zeros = q4._tinygemm()
        x_bf16 = x.to(torch.bfloat16)
        calls["int4 tinygemm"] = (lambda: torch._weight_int4pack_mm(x_bf16, weight, group, scales_and_zeros), n * k // 2)
    return calls


@torch.no_grad()
def measure(layers: list[tuple[nn.Linear, QuantizedLinear, QuantizedLinear]], x: torch.Tensor) -> dict:
    linear, q8, q4 = layers[0]
    n, k = linear.weight.shape

    def relative_error(got: torch.Tensor, layer: QuantizedLinear) -> float:
        reference = x.float() @ layer.dequantized(torch.float32).T
        return float((got.float() - reference).abs().max() / reference.abs().max())

    row = {"shape": [n, k], "rows": x.shape[0]}
    if x.shape[0] == 1:
        expected = x.float() @ linear.weight.float().T
        row["fp_decode_rel_error"] = float((decode_product(x, linear).float() - expected).abs().max() / expected.abs().max())
        for layer in (q8, q4):
            row[f"{layer.mode}_decode_rel_error"] = relative_error(decode_product(x, layer), layer)
        if x.is_cuda:
            row["int4_pairs_decode_rel_error"] = relative_error(in_bf16_pairs(lambda: decode_product(x, q4))(), q4)
    per_copy = [kernel_calls(*copy, x) for copy in layers]
    for label, (_, weight_bytes) in per_copy[0].items():
        ms = per_call_ms([calls[label][0] for calls in per_copy])
        row[label] = {"ms": ms, "GBps": weight_bytes / ms / 1e6}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--tag", default="", help="appended to the file names (quant_kernels_TAG.md), e.g. h200_bf16")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    results = {"meta": {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device),
                        "torch": torch.__version__, "dtype": args.dtype, "int4_group_size": args.group_size,
                        "weights": "random, 7B-shaped layers"}, "rows": []}
    for name, n, k in SHAPES:
        layers = []
        for _ in range(COPIES):
            linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
            layers.append((linear, QuantizedLinear(linear, "int8"), QuantizedLinear(linear, "int4", args.group_size)))
        for rows in (int(r) for r in args.rows.split(",")):
            row = measure(layers, torch.randn(rows, k, device=device, dtype=dtype))
            row["layer"] = name
            results["rows"].append(row)
            print(name, rows, {k_: (round(v["ms"], 4), round(v["GBps"])) for k_, v in row.items() if isinstance(v, dict) and "ms" in v},
                  {k_: f"{v:.1e}" for k_, v in row.items() if k_.endswith("rel_error")}, flush=True)
        del layers
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "quant_kernels" + (f"_{args.tag}" if args.tag else "")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    labels = ["fp", "fp decode", "int8 decode", "int8 tile", "int4 decode", "int4 pairs decode", "int4 tinygemm"]
    lines = ["# Quantized matmul kernels at decode shapes\n",
             (f"{results['meta']['date']} · {results['meta']['device']} · torch {results['meta']['torch']} · "
             f"{args.dtype} activations · int4 group {args.group_size} · random 7B-shaped layers (q/k/v and gate/up fused)\n"
             "\nMedian kernel time in µs, and the weight bandwidth it reaches (GB/s).\n"),
             "| layer | rows | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for row in results["rows"]:
        cells = [f"{row[l]['ms'] * 1e3:.1f} µs, {row[l]['GBps']:.0f}" if l in row else "–" for l in labels]
        lines.append(f"| {row['layer']} {row['shape'][0]}×{row['shape'][1]} | {row['rows']} | " + " | ".join(cells) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/{name}.md")


if __name__ == "__main__":
    main()
