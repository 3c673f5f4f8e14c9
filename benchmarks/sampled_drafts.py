"""Sampled requests: top-k children drafted on the device against children drawn from the SSMs on the host.

    python benchmarks/sampled_drafts.py [--device cuda] [--compile] [--temperatures 0.7,1.0]

Batch 1, the engine_speed prompts; the two ways of drafting and incremental decoding alternate, `--repeats`
times, each timed run after an untimed pass over as many other prompts (switching the way rebuilds the
engine, whose first pass captures its CUDA graphs). Both sample exactly the LLM's
distribution (tests/test_stochastic.py), so what differs is the tokens per step and the time a step costs.
Writes JSON and Markdown (device, torch version, date) to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from specinfer import LLM, EngineConfig, GenerationConfig

from engine_speed import PROMPTS, WARM_UP_PROMPTS, device_name  # noqa: E402 (benchmarks/ is the script's folder)

WAYS = {"top-k children (device)": False, "drawn children (host)": True, "incremental": None}


def timed(llm: LLM, config: GenerationConfig, mode: str, cuda: bool) -> tuple[float, float]:
    """Tokens per second and tokens per LLM step over the prompts, one at a time."""
    tokens = steps = accepted = 0
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for prompt in PROMPTS:
        result = llm.generate([prompt], config, mode=mode)[0]
        tokens += len(result.output_tokens)
        steps += result.num_llm_steps
        accepted += result.num_accepted
    if cuda:
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), (accepted + steps) / max(steps, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="LLM path (default: the default model)")
    p.add_argument("--ssm", action="append", help="SSM(s) (default: the default draft)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--temperatures", default="0.7,1.0")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    llm = LLM(args.llm, args.ssm, engine=EngineConfig(max_batch_size=1, max_sequence_length=512, device=args.device,
                                                      compile=args.compile))
    base = llm.speculation
    rows = []
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        config = GenerationConfig(do_sample=True, temperature=temperature, max_new_tokens=args.max_new_tokens, seed=1)
        runs: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
        for repeat in range(args.repeats + 1):  # the first round is untimed
            for way, sampled_children in WAYS.items():
                if sampled_children is not None:
                    llm.set_speculation(dataclasses.replace(base, sampled_children=sampled_children))
                mode = "incremental" if sampled_children is None else "tree"
                # `set_speculation` rebuilt the engine (caches, CUDA graphs, the controller): its first
                # pass captures graphs, so every timed run comes after an untimed one of its own.
                for prompt in WARM_UP_PROMPTS[: len(PROMPTS)]:
                    llm.generate([prompt], config, mode=mode)
                if repeat:
                    runs[way].append(timed(llm, config, mode, cuda))
        base_rate = statistics.median(r for r, _ in runs["incremental"])
        for way, measured in runs.items():
            rate = statistics.median(r for r, _ in measured)
            rows.append({"temperature": temperature, "way": way, "tokens_per_s": rate, "vs_incremental": rate / base_rate,
                         "tokens_per_step": statistics.median(s for _, s in measured), "runs": measured})
        print("\n".join(f"T={r['temperature']}: {r['way']}: {r['tokens_per_s']:.1f} tok/s ({r['vs_incremental']:.2f}x), "
                        f"{r['tokens_per_step']:.2f} tokens/step" for r in rows[-len(WAYS):]), flush=True)

    meta = {"date": datetime.date.today().isoformat(), "device": device_name(args.device), "torch": torch.__version__,
            "dtype": str(llm.model.embed_tokens.weight.dtype).removeprefix("torch."), "llm": str(llm.model_path),
            "ssms": args.ssm or ["default (tuned:1)"], "prompts": len(PROMPTS), "max_new_tokens": args.max_new_tokens,
            "compiled": args.compile, "adaptive": base.adaptive, "repeats": args.repeats}
    tag = "gpu" if cuda else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sampled_drafts_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Sampled requests: top-k children against drawn children, default model, {tag.upper()}", "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · {meta['dtype']} · batch 1 · "
        f"{len(PROMPTS)} prompts × up to {args.max_new_tokens} new tokens · SSMs: {', '.join(meta['ssms'])} · "
        f"adaptive tree · median of {args.repeats} runs, each after an untimed pass over as many other prompts, the ways alternating"
        f"{' · blocks compiled (--compile)' if args.compile else ''}", "",
        f"Reproduce: `python benchmarks/sampled_drafts.py {' '.join(sys.argv[1:])}`", "",
        "| temperature | drafting | tokens/s | vs incremental | tokens per LLM step |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {r['temperature']} | {r['way']} | {r['tokens_per_s']:.1f} | {r['vs_incremental']:.2f}x | "
              f"{r['tokens_per_step']:.2f} |" for r in rows]
    (out / f"sampled_drafts_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
