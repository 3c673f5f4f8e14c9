"""CPU passes of 1 to 4 tokens with 2- and 3-row products as they are and padded to 4 rows (layers/cpu_rows.py).

    python benchmarks/cpu_rows.py [--llm PATH] [--rounds 6]

The default model in fp32 on the CPU, 200 cached tokens, one request: each pass verifies a chain of T
tokens, as a small tree's verification does. The two ways alternate round by round (the machine's speed
drifts), and each figure is the median of all its passes. Writes JSON and a Markdown table (CPU, torch
version, date) to docs/benchmarks/.
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
from torch import nn

from specinfer.default_model import default_model_path
from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.layers.cpu_rows import pad_small_products
from specinfer.models.fuse import fuse_projections
from specinfer.models.loader import load_model

TOKENS = (1, 2, 3, 4)
CACHED = 200


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="model path (default: the default model)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    model = fuse_projections(load_model(Path(args.llm) if args.llm else default_model_path(), "cpu", torch.float32))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    pad_small_products(model)
    padded_class = type(linears[0])
    runner = ModelRunner(model, num_slots=1, capacity=CACHED + 16)
    runner.forward([Chunk.chain(0, list(range(5, 5 + CACHED)), logits="none")])
    runner.commit(0, list(range(CACHED)))

    def seconds(tokens: int) -> float:
        start = time.perf_counter()
        runner.forward([Chunk(0, [7] * tokens, [-1] + list(range(tokens - 1)), list(range(tokens)))])
        runner.commit(0, [])
        return time.perf_counter() - start

    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for way, cls in (("plain", nn.Linear), ("padded", padded_class)):
            for module in linears:
                module.__class__ = cls
            for tokens in TOKENS:
                times.setdefault((way, tokens), []).extend(seconds(tokens) for _ in range(3))
    ms = {f"{way} {tokens}": statistics.median(v) * 1e3 for (way, tokens), v in times.items()}
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
            "cached_tokens": CACHED, "rounds": args.rounds}
    lines = ["# CPU passes with 2- and 3-row products padded to 4 rows", "",
             f"{meta['date']} · {meta['cpu']}, {meta['threads']} threads · torch {meta['torch']} · fp32 · "
             f"{CACHED} cached tokens · median of {3 * args.rounds} passes each, the two ways alternating", "",
             "Reproduce: `python benchmarks/cpu_rows.py`", "",
             "| tokens in the pass | plain (ms) | padded (ms) | padded / plain |", "|---:|---:|---:|---:|"]
    lines += [f"| {t} | {ms[f'plain {t}']:.1f} | {ms[f'padded {t}']:.1f} | {ms[f'padded {t}'] / ms[f'plain {t}']:.2f} |"
              for t in TOKENS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_rows_cpu.json").write_text(json.dumps({"meta": meta, "ms": ms}, indent=2))
    (out / "cpu_rows_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
