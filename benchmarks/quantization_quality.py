"""Perplexity of the default model (or --llm) in full precision and with int8 / int4 weights, on held-out
text, in one run.

    python benchmarks/quantization_quality.py                 # CPU
    python benchmarks/quantization_quality.py --device cuda

The text: docstrings of Python standard-library modules (plain technical English every machine has,
and nothing the model was tuned on here). It is cut into windows of --window tokens; each window is
scored in one pass (teacher forcing), and perplexity is exp(mean negative log-likelihood) over all
predicted tokens. Writes JSON and a Markdown table (device, torch version, date) to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import platform
import sys
from pathlib import Path

import torch

from specinfer.default_model import default_model_path
from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.models.loader import load_model
from specinfer.quant import quantize_model
from specinfer.tokenizer import load_tokenizer

MODULES = ["argparse", "json", "collections", "functools", "itertools", "pathlib", "subprocess", "threading",
           "logging", "datetime", "decimal", "fractions", "heapq", "bisect", "csv", "textwrap", "unittest",
           "contextlib", "dataclasses", "enum", "typing", "zipfile", "tarfile", "sqlite3", "socket", "shutil"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def held_out_text() -> str:
    import importlib

    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module, inspect.isclass):
            if member.__module__ == name and member.__doc__:
                parts.append(inspect.getdoc(member))
    return "\n\n".join(p for p in parts if p)


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    runner = ModelRunner(model, num_slots=1, capacity=max(len(w) for w in windows) + 1, use_cuda_graphs=False)
    nll, count = 0.0, 0
    for window in windows:
        runner.release(0)
        logits = runner.forward([Chunk.chain(0, window, logits="all")])[0]  # fp32
        targets = torch.tensor(window[1:], device=logits.device)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
        count += len(window) - 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="model path (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="activation dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of text scored at most")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    path = Path(args.llm) if args.llm else default_model_path()
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = DTYPES[dtype_name]
    tokens = load_tokenizer(path).encode(held_out_text())[: args.max_tokens]
    windows = [tokens[i : i + args.window] for i in range(0, len(tokens) - 1, args.window)]
    windows = [w for w in windows if len(w) > 1]
    rows = []
    for mode in ["none", "int8", "int4"]:
        model = load_model(path, torch.device(args.device), dtype)
        if mode != "none":
            quantize_model(model, mode, args.group_size)
        ppl = perplexity(model, windows)
        rows.append({"weights": dtype_name if mode == "none" else f"{mode}" + (
            f" (group {args.group_size})" if mode == "int4" else " (per channel)"), "perplexity": ppl})
        print(rows[-1], flush=True)
        del model
    base = rows[0]["perplexity"]
    for r in rows:
        r["change_pct"] = 100 * (r["perplexity"] / base - 1)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU ({platform.processor() or platform.machine()})")
    meta = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "model": args.llm or "SmolLM2-135M-Instruct (default, GGUF Q4_1 dequantized)", "activations": dtype_name,
            "scored_tokens": sum(len(w) - 1 for w in windows), "window": args.window,
            "command": "python benchmarks/quantization_quality.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quantization_quality_gpu" if args.device.startswith("cuda") else "quantization_quality_cpu"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Weight-only quantization: perplexity", "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · {meta['model']} · activations "
        f"{dtype_name} · {meta['scored_tokens']} tokens of Python standard-library docstrings in windows of "
        f"{args.window} · embeddings and LM head unquantized", "",
        f"Reproduce: `{meta['command']}`", "",
        "| weights | perplexity | change |", "|---|---:|---:|",
    ] + [f"| {r['weights']} | {r['perplexity']:.3f} | {r['change_pct']:+.2f}% |" for r in rows]
    if args.llm is None:
        lines += ["", "The default model's GGUF is itself Q4_1 (4-bit, blocks of 32 weights with a scale and a minimum), "
                  "which is our int4 grid: with `--group-size 32` int4 gives back exactly those weights, so its "
                  "perplexity equals the dequantized model's. Other group sizes, and int8, re-quantize them."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
