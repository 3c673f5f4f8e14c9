"""Throughput at batch 1, 4, 16 and 64: incremental decoding against speculation, one process, same prompts.

    python benchmarks/batch_throughput.py --device cuda --compile --ssm path/to/ssm --expansion 2,2,1

For each batch size B, B held-out prompts (the boost-tuning prompt set's held-out topics) are served at
once (continuous batching, greedy) and total generated tokens per second is reported for incremental
decoding, the adaptive tree (the engine's default: it shrinks the tree, down to plain steps, as the
batch grows) and the fixed tree. Each mode runs once untimed first, so CUDA graphs and compiled shapes
are ready, then --repeats timed runs of each, interleaved (incremental, adaptive, fixed, incremental,
...), give the medians. Writes JSON and a Markdown table (device, torch
version, date) to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.engine.request_manager import RequestManager
from specinfer.boost.prompts import build_prompts
from specinfer.config import parse_expansion
from specinfer.spec.tree_fit import load_tree_file

from engine_speed import device_name, draft_vocab_size, result_tag  # noqa: E402 (benchmarks/ is the script's folder)


MODES = ("incremental", "adaptive", "fixed")


def build_managers(llm: LLM, expansion, tree) -> dict[str, RequestManager]:
    """One request manager per mode over the loaded models, kept for the whole row: runs of the modes
    interleave, so drift in the machine's speed falls on all of them alike."""
    def manager(mode: str, adaptive: bool) -> RequestManager:
        speculation = SpeculationConfig(mode=mode, expansion=expansion, adaptive=adaptive, tree=tree)
        return RequestManager(llm.model, llm.ssms, llm.engine_config, speculation, llm.eos_token_ids, llm.tokenizer)

    managers = {"incremental": manager("incremental", False), "adaptive": manager("tree", True),
                "fixed": manager("tree", False)}
    if managers["incremental"].overlap:  # also without queueing plain steps ahead of their read-back
        managers["incremental, no overlap"] = manager("incremental", False)
        managers["incremental, no overlap"].overlap = False
        for mode, adaptive in (("adaptive", True), ("fixed", False)):  # each next draft launched before the read-back
            managers[f"{mode}, drafts ahead"] = manager("tree", adaptive)
            managers[f"{mode}, drafts ahead"].overlap_trees = True
    return managers


def serve(manager: RequestManager, prompts: list[list[int]], config: GenerationConfig) -> list:
    """Serve the prompts (token ids) together; returns the finished requests in order."""
    ids = [manager.register_new_request(p, sampling=config) for p in prompts]
    manager.run()
    return [manager.pop_request(i) for i in ids]


def timed_rows(llm: LLM, managers: dict[str, RequestManager], prompts: list[list[int]], max_new_tokens: int,
               repeats: int) -> dict[str, dict]:
    """Per mode, the median of `repeats` timed runs after one untimed run (graph captures, compilation);
    the timed runs go incremental, adaptive, fixed, incremental, ..."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    cuda = llm.engine_config.device.startswith("cuda")
    warm_up_steps = {}
    for mode, manager in managers.items():
        manager.step_log = []
        serve(manager, prompts, config)  # warm-up
        warm_up_steps[mode] = [(size, round(1e3 * seconds, 3)) for _, size, seconds, _ in manager.step_log]
        manager.step_log = None
    graphs_before = {mode: captured_graphs(m) for mode, m in managers.items()}
    runs: dict[str, list[float]] = {mode: [] for mode in managers}
    finished: dict[str, list] = {}
    for _ in range(repeats):
        for mode, manager in managers.items():
            manager.step_log = []  # the last run's steps: what the controller chose, and what it cost
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            finished[mode] = serve(manager, prompts, config)
            if cuda:
                torch.cuda.synchronize()
            runs[mode].append(time.perf_counter() - start)
    rows = {}
    for mode, manager in managers.items():
        elapsed = statistics.median(runs[mode])
        tokens = sum(len(r.output_tokens) for r in finished[mode])
        steps = sum(r.stats.num_llm_steps for r in finished[mode])
        accepted = sum(r.stats.num_accepted for r in finished[mode])
        rows[mode] = {"tokens": tokens, "seconds": elapsed, "runs_s": runs[mode], "tokens_per_s": tokens / elapsed,
                      "tokens_per_request_step": (accepted + steps) / max(steps, 1),
                      "steps_by_tree_size": steps_by_tree_size(manager.step_log),
                      "graphs_captured_in_timed_runs": captured_graphs(manager) - graphs_before[mode]}
        if manager.controller is not None:  # (tree size, ms) of each warm-up and last timed step: what the controller met
            rows[mode]["warm_up_steps"] = warm_up_steps[mode]
            rows[mode]["last_run_steps"] = [(size, round(1e3 * seconds, 3)) for _, size, seconds, _ in manager.step_log]
        manager.step_log = None
    return rows


def captured_graphs(manager) -> int:
    """CUDA graphs the manager's models hold (LLM, SSMs and drafters): one captured inside a timed run
    costs tens of milliseconds there."""
    runners = [manager.llm, *manager.ssms]
    return (sum(len(r.graphs.graphs) for r in runners if r.graphs is not None)
            + sum(len(d.graphs) for d in manager._drafters.values()))


def steps_by_tree_size(log: list[tuple[int, int, float, int]]) -> dict:
    """Per tree size drafted (0: plain steps): steps, their share of the run's step time, and the median
    step in ms, from `RequestManager.step_log` (batch, size, seconds, tokens)."""
    total = sum(seconds for _, _, seconds, _ in log) or 1.0
    sizes = sorted({size for _, size, _, _ in log})
    return {size: {"steps": sum(1 for _, s, _, _ in log if s == size),
                   "time_share": sum(sec for _, s, sec, _ in log if s == size) / total,
                   "median_ms": 1e3 * statistics.median(sec for _, s, sec, _ in log if s == size)}
            for size in sizes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="LLM path (default: the default model)")
    p.add_argument("--ssm", action="append", help="SSM(s) (default: the default draft)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--expansion", default="2,2,1")
    p.add_argument("--tree", help="a fitted tree file (`specinfer fit-tree`) in place of --expansion")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--draft-vocab", type=int, help="tokens the SSMs score (default: the engine's; 0: all)")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    expansion = parse_expansion(args.expansion)
    tree = load_tree_file(args.tree) if args.tree else None
    _, held_out = build_prompts()
    # Drafts after the read-back unless a mode says otherwise ("..., drafts ahead").
    engine = EngineConfig(max_batch_size=max(batches), max_sequence_length=256, device=args.device, dtype=args.dtype,
                          overlap_tree_steps=False,
                          compile=args.compile, draft_vocab_size=args.draft_vocab)
    llm = LLM(args.llm, args.ssm, engine=engine, speculation=SpeculationConfig(expansion=expansion, tree=tree))
    rows = []
    for batch in batches:
        prompts = [llm.encode_prompt(held_out[i % len(held_out)], use_chat_template=True) for i in range(batch)]
        row = {"batch": batch, **timed_rows(llm, build_managers(llm, expansion, tree), prompts,
                                            args.max_new_tokens, args.repeats)}
        base = row["incremental"]["tokens_per_s"]
        print(f"batch {batch}: incremental {base:.1f} tok/s, adaptive {row['adaptive']['tokens_per_s']:.1f} "
              f"({row['adaptive']['tokens_per_s'] / base:.2f}x), fixed {row['fixed']['tokens_per_s']:.1f} "
              f"({row['fixed']['tokens_per_s'] / base:.2f}x)", flush=True)
        print(f"  incremental: median step {row['incremental']['steps_by_tree_size'][0]['median_ms']:.2f} ms; "
              "adaptive steps by tree size (steps, share of step time, median ms): " + ", ".join(
            f"{size}: {v['steps']}, {v['time_share']:.0%}, {v['median_ms']:.2f}"
            for size, v in row["adaptive"]["steps_by_tree_size"].items())
            + "; graphs captured in timed runs: " + ", ".join(
            f"{mode} {row[mode]['graphs_captured_in_timed_runs']}" for mode in MODES),
            flush=True)
        if "incremental, no overlap" in row:
            print(f"  incremental, each step read back before the next is queued: "
                  f"{row['incremental, no overlap']['tokens_per_s']:.1f} tok/s", flush=True)
        rows.append(row)

    meta = {"date": datetime.date.today().isoformat(), "device": device_name(args.device), "torch": torch.__version__,
            "dtype": str(llm.model.embed_tokens.weight.dtype).removeprefix("torch."), "llm": str(llm.model_path),
            "ssms": args.ssm or ["default (tuned:1)"], "expansion": args.tree or args.expansion,
            "max_new_tokens": args.max_new_tokens,
            "compiled": args.compile, "greedy": True, "draft_vocab": draft_vocab_size(llm)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = result_tag(args)
    (out / f"batch_throughput_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Throughput against batch size, default model, {tag.split('_')[0].upper()}", "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · {meta['dtype']} · greedy · "
        f"{args.max_new_tokens} new tokens per request · SSMs: {', '.join(meta['ssms'])} · "
        f"tree {args.tree or args.expansion} · draft vocabulary: {meta['draft_vocab'] or 'the whole one'}"
        f"{' · blocks compiled (--compile)' if args.compile else ''} · each row the median of {args.repeats} runs after one untimed run, the modes' runs interleaved", "",
        f"Reproduce: `python benchmarks/batch_throughput.py {' '.join(sys.argv[1:])}`", "",
        "| batch | incremental tok/s | adaptive tree tok/s | vs incremental | fixed tree tok/s | vs incremental | "
        "fixed tree: tokens per request-step | incremental, each step read back first, tok/s | "
        "adaptive, drafts ahead: vs incremental | fixed, drafts ahead: vs incremental |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = r["incremental"]["tokens_per_s"]
        unlapped = r.get("incremental, no overlap")
        ahead = [r.get(f"{mode}, drafts ahead") for mode in ("adaptive", "fixed")]
        lines.append(f"| {r['batch']} | {base:.1f} | {r['adaptive']['tokens_per_s']:.1f} | "
                     f"{r['adaptive']['tokens_per_s'] / base:.2f}x | {r['fixed']['tokens_per_s']:.1f} | "
                     f"{r['fixed']['tokens_per_s'] / base:.2f}x | {r['fixed']['tokens_per_request_step']:.2f} | "
                     f"{'–' if unlapped is None else format(unlapped['tokens_per_s'], '.1f')} | "
                     + " | ".join('–' if a is None else f"{a['tokens_per_s'] / base:.2f}x" for a in ahead) + " |")
    (out / f"batch_throughput_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
