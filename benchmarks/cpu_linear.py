"""CPU passes of 1 to 21 tokens with plain linear layers and with weights prepacked for oneDNN (layers/cpu_linear.py).

    python benchmarks/cpu_linear.py [--llm PATH] [--rounds 4] [--dtypes float32,bfloat16]

The default model on the CPU, 200 cached tokens, one request: each pass verifies a chain of T tokens, as
a tree's verification does (1 token: an incremental step). Per dtype the model is loaded twice, plain
and packed; the two alternate round by round (the machine's speed drifts), and each figure is the
median of all its passes. Writes JSON and a Markdown table (CPU, torch version, date) to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from specinfer.default_model import default_model_path
from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.layers.cpu_linear import pack_linears
from specinfer.models.fuse import fuse_projections
from specinfer.models.loader import load_model

TOKENS = (1, 2, 3, 4, 8, 21)
CACHED = 200


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cached_runner(model) -> ModelRunner:
    runner = ModelRunner(model, num_slots=1, capacity=CACHED + 32)
    runner.forward([Chunk.chain(0, list(range(5, 5 + CACHED)), logits="none")])
    runner.commit(0, list(range(CACHED)))
    return runner


def pass_seconds(runner: ModelRunner, tokens: int) -> float:
    start = time.perf_counter()
    runner.forward([Chunk(0, [7] * tokens, [-1] + list(range(tokens - 1)), list(range(tokens)))])
    runner.commit(0, [])  # nothing kept: the next pass sees the same 200 entries
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="model path (default: the default model)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    path = Path(args.llm) if args.llm else default_model_path()
    ms: dict[str, float] = {}
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        dtype = getattr(torch, name)
        runners = {}
        for way in ("plain", "packed"):
            model = fuse_projections(load_model(path, "cpu", dtype))
            if way == "packed":
                pack_linears([model])
            runners[way] = cached_runner(model)
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for way, runner in runners.items():
                for tokens in TOKENS:
                    times.setdefault((way, tokens), []).extend(pass_seconds(runner, tokens) for _ in range(3))
        ms.update({f"{name} {way} {tokens}": statistics.median(v) * 1e3 for (way, tokens), v in times.items()})
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cached_tokens": CACHED, "rounds": args.rounds, "model": path.name}
    lines = ["# CPU passes with plain and oneDNN-packed linear layers", "",
             f"{meta['date']} · {meta['cpu']}, {meta['threads']} threads · torch {meta['torch']} · {path.name} · "
             f"{CACHED} cached tokens · median of {3 * args.rounds} passes each, the two ways alternating", "",
             f"Reproduce: `python benchmarks/cpu_linear.py --dtypes {args.dtypes}`", "",
             "| dtype | tokens in the pass | plain (ms) | packed (ms) | plain / packed |", "|---|---:|---:|---:|---:|"]
    for name in dtypes:
        for t in TOKENS:
            plain, packed = ms[f"{name} plain {t}"], ms[f"{name} packed {t}"]
            lines.append(f"| {name} | {t} | {plain:.1f} | {packed:.1f} | {plain / packed:.2f}x |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_linear_cpu.json").write_text(json.dumps({"meta": meta, "ms": ms}, indent=2))
    (out / "cpu_linear_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
