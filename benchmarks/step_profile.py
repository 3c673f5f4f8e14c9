"""Where one engine step spends its time, and what each tree size costs and yields.

    python benchmarks/step_profile.py --device cuda --compile --tree tree_20.json [--sections sizes,stages,adaptive]

Sections (greedy; batch 1 over the engine_speed prompts, or with --batch B that many held-out prompts
served together; every run after an untimed warm-up, so CUDA graphs are captured before timing):
- `sizes`: every tree of the ladder the adaptive engine chooses from (the tree's first 1, 2, 4, ... nodes),
  drafted at every step: ms per step, tokens per step, and the step's cost in incremental steps. A size
  pays where tokens per step exceed that cost.
- `stages`: the whole tree, each stage of a step timed between device synchronisations (so the stages
  no longer overlap: their sum exceeds the step's own time): SSM drafting (catch-up chain and tree
  levels), LLM verification, commit, the rest of the host's work.
- `adaptive`: the adaptive engine's choices step by step (`RequestManager.step_log`): steps and time per
  tree size, and the slowest steps.
- `profile`: torch.profiler tables of a few steps, incremental and tree.
- `timeline`: where a step's wall time goes: per step, the wall time against the time the GPU was busy
  (the union of its kernels and copies), and one step's host ranges beside the GPU's busy intervals.
- `host`: host time per stage of a step, incremental and the whole tree, nothing synchronised (the
  read-back holds the wait for the device; the rest is time the host keeps the GPU waiting, or overlaps).
Prints tables; writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.boost.prompts import build_prompts
from specinfer.config import parse_expansion
from specinfer.engine import request_manager as rm
from specinfer.engine.in_flight import InFlightStep
from specinfer.engine.model_runner import ModelRunner
from specinfer.spec.device_draft import DeviceTreeDrafter
from specinfer.spec.tree_fit import load_tree_file

sys.path.insert(0, str(Path(__file__).parent))
from engine_speed import PROMPTS, WARM_UP_PROMPTS, run_case  # noqa: E402


def sync_for(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def timed_generate(llm: LLM, prompts: list[str], mode: str, max_new_tokens: int, repeats: int) -> dict:
    """Serve `prompts` together: tokens per second (the median of `repeats` timed runs after one untimed
    run) and tokens per request and step."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    sync = sync_for(llm.engine_config.device)
    llm.generate(prompts, config, mode=mode)  # warm-up
    runs = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        results = llm.generate(prompts, config, mode=mode)
        sync()
        runs.append(time.perf_counter() - start)
    tokens = sum(len(r.output_tokens) for r in results)
    steps = sum(r.num_llm_steps for r in results)
    accepted = sum(r.num_accepted for r in results)
    return {"tokens_per_s": tokens / statistics.median(runs), "tokens_per_request_step": (accepted + steps) / max(steps, 1)}


def measure(llm: LLM, mode: str, args) -> tuple[float, float]:
    """(tokens per second, tokens per request and step): batch 1 over the engine_speed prompts one at a
    time, or `--batch` held-out prompts served together."""
    if args.batch == 1:
        row = run_case(llm, mode, PROMPTS, args.max_new_tokens)
        return row["tokens_per_s"], row["tokens_per_step"]
    row = timed_generate(llm, batch_prompts(args.batch), mode, args.max_new_tokens, repeats=2)
    return row["tokens_per_s"], row["tokens_per_request_step"]


def batch_prompts(batch: int) -> list[str]:
    held_out = build_prompts()[1]
    return [held_out[i % len(held_out)] for i in range(batch)]


def section_sizes(llm: LLM, paths: tuple, args) -> None:
    base, _ = measure(llm, "incremental", args)
    # Every engine step serves `batch` requests, each committing tokens/step on average.
    base_ms = 1e3 * args.batch / base
    print(f"\nincremental, batch {args.batch}: {base_ms:.2f} ms/step, {base:.1f} tok/s")
    print("| tree nodes | ms/step | tokens/step | cost (incremental steps) | tokens/step / cost | tok/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in SpeculationConfig(tree=paths).tree_ladder.sizes:
        llm.set_speculation(SpeculationConfig(tree=paths[:size], adaptive=False))
        rate, per_step = measure(llm, "tree", args)
        ms = 1e3 * args.batch * per_step / rate
        cost = ms / base_ms
        print(f"| {size} | {ms:.2f} | {per_step:.2f} | {cost:.2f} | {per_step / cost:.2f} | {rate:.1f} |")


def timed_between_syncs(cls, name: str, label, totals: dict, sync) -> None:
    method = getattr(cls, name)

    @functools.wraps(method)
    def wrapper(self, *a, **kw):
        key = label(self)
        if key is None:
            return method(self, *a, **kw)
        sync()
        start = time.perf_counter()
        out = method(self, *a, **kw)
        sync()
        totals[key].append(time.perf_counter() - start)
        return out

    setattr(cls, name, wrapper)
    return method


def section_stages(llm: LLM, paths: tuple, args) -> None:
    sync = sync_for(args.device)
    llm.set_speculation(SpeculationConfig(tree=paths, adaptive=False))
    llm.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=args.max_new_tokens))  # warm-up
    totals: dict[str, list[float]] = defaultdict(list)
    llm_model = llm.model
    originals = [
        (ModelRunner, "forward_rows", timed_between_syncs(
            ModelRunner, "forward_rows", lambda r: "LLM forward (+ logits)" if r.model is llm_model else None,
            totals, sync)),
        (DeviceTreeDrafter, "draft", timed_between_syncs(DeviceTreeDrafter, "draft", lambda d: "SSM drafting",
                                                         totals, sync)),
        (rm.RequestManager, "_commit", timed_between_syncs(rm.RequestManager, "_commit", lambda m: "commit", totals, sync)),
        (rm.RequestManager, "step", timed_between_syncs(rm.RequestManager, "step", lambda m: "whole step", totals, sync)),
    ]
    try:
        for prompt in PROMPTS:
            llm.generate([prompt], GenerationConfig(max_new_tokens=args.max_new_tokens))
    finally:
        for cls, name, method in originals:
            setattr(cls, name, method)
    steps = len(totals["whole step"])
    print(f"\nstages of {steps} steps, tree of {len(paths)} nodes (each between device synchronisations; "
          "LLM forward includes each prompt's prefill)")
    print("| stage | calls | ms per step |\n|---|---:|---:|")
    named = 0.0
    for label, times in totals.items():
        per_step = 1e3 * sum(times) / steps
        named += per_step if label != "whole step" else 0
        print(f"| {label} | {len(times)} | {per_step:.3f} |")
    whole = 1e3 * sum(totals["whole step"]) / steps
    print(f"| rest (tree assembly, gathers, read-back, prefill sampling) | | {whole - named:.3f} |")


def section_adaptive(llm: LLM, paths: tuple, args) -> None:
    llm.set_speculation(SpeculationConfig(tree=paths))
    manager = llm.manager_for("tree")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    batches = [[p] for p in PROMPTS] if args.batch == 1 else [batch_prompts(args.batch)]
    for prompts in ([[p] for p in WARM_UP_PROMPTS] if args.batch == 1 else batches):  # warm-up, as the benchmarks do
        llm.generate(prompts, config)
    manager.step_log = []
    for prompts in batches:
        llm.generate(prompts, config)
    log, manager.step_log = manager.step_log, None
    by_size = defaultdict(list)
    for batch, size, seconds, tokens in log:
        by_size[size].append((seconds, tokens))
    total = sum(s for _, _, s, _ in log)
    print(f"\nadaptive: {len(log)} steps, {sum(t for *_, t in log)} tokens in {total * 1e3:.1f} ms")
    print("| tree size | steps | median ms | total ms | tokens/step |\n|---:|---:|---:|---:|---:|")
    for size in sorted(by_size):
        rows = by_size[size]
        print(f"| {size} | {len(rows)} | {1e3 * statistics.median(s for s, _ in rows):.2f} | "
              f"{1e3 * sum(s for s, _ in rows):.1f} | {sum(t for _, t in rows) / len(rows):.2f} |")
    slowest = sorted(range(len(log)), key=lambda i: -log[i][2])[:8]
    print("slowest steps (index, size, ms, tokens):",
          ", ".join(f"({i}, {log[i][1]}, {1e3 * log[i][2]:.1f}, {log[i][3]})" for i in sorted(slowest)))
    print("sizes in order:", "".join("." if size == 0 else "123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[
        SpeculationConfig(tree=paths).tree_ladder.sizes.index(size)] for _, size, _, _ in log))


def labelled(cls, name: str, label: str) -> None:
    method = getattr(cls, name)

    def wrapper(*a, **kw):
        with record_function(label):
            return method(*a, **kw)

    setattr(cls, name, wrapper)


def section_profile(llm: LLM, paths: tuple, args) -> None:
    llm.set_speculation(SpeculationConfig(tree=paths, adaptive=False))
    labelled(ModelRunner, "forward_rows", "runner.forward")
    labelled(ModelRunner, "_prepare", "runner._prepare (host)")
    labelled(DeviceTreeDrafter, "draft", "drafter.draft")
    labelled(rm.RequestManager, "_commit", "commit")
    cuda = args.device.startswith("cuda")
    for mode in ("incremental", "tree"):
        for _ in range(2):  # warm-up: graph captures, allocator growth
            llm.generate([PROMPTS[2]], GenerationConfig(max_new_tokens=args.max_new_tokens), mode=mode)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            result = llm.generate([PROMPTS[2]], GenerationConfig(max_new_tokens=32), mode=mode)[0]
            sync_for(args.device)()
        print(f"--- {mode}, {result.num_llm_steps} steps profiled")
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))


def _merged(intervals: list[tuple[float, float]], gap: float = 0.0) -> list[tuple[float, float]]:
    """Union of intervals (µs), joining those less than `gap` apart."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


LABELS = ("step", "runner.forward", "prepare", "draft", "commit", "cache commit")


def section_timeline(llm: LLM, paths: tuple, args) -> None:
    if not args.device.startswith("cuda"):
        print("\ntimeline: needs a GPU")
        return
    llm.set_speculation(SpeculationConfig(tree=paths, adaptive=False))
    for cls, name, label in ((rm.RequestManager, "step", "step"), (ModelRunner, "forward_rows", "runner.forward"),
                             (ModelRunner, "_prepare", "prepare"), (DeviceTreeDrafter, "draft", "draft"),
                             (rm.RequestManager, "_commit", "commit"), (ModelRunner, "commit_all", "cache commit")):
        labelled(cls, name, label)
    for mode in ("incremental", "tree"):
        for _ in range(2):  # warm-up: graph captures, allocator growth
            llm.generate([PROMPTS[2]], GenerationConfig(max_new_tokens=args.max_new_tokens), mode=mode)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate([PROMPTS[2]], GenerationConfig(max_new_tokens=32), mode=mode)
            torch.cuda.synchronize()
        events = prof.events()
        # GPU-side events, less the ranges that record_function mirrors onto the GPU's timeline.
        kernels_only = [e for e in events if e.device_type.name == "CUDA" and e.name not in LABELS]
        gpu = [(e.time_range.start, e.time_range.end) for e in kernels_only]
        steps = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.name == "step" and e.device_type.name == "CPU")[2:]  # the prefill's steps aside
        walls, busies = [], []
        for start, end in steps:
            busy = _merged([(max(a, start), min(b, end)) for a, b in gpu if b > start and a < end])
            walls.append(end - start)
            busies.append(sum(b - a for a, b in busy))
        print(f"\ntimeline, {mode}: {len(steps)} steps; median wall {statistics.median(walls):.0f} µs, "
              f"GPU busy {statistics.median(busies):.0f} µs (median of the steps)")
        start, end = steps[len(steps) // 2]
        ranges = sorted((e.time_range.start - start, e.time_range.end - start, e.name) for e in events
                        if e.device_type.name == "CPU" and start <= e.time_range.start < end
                        and e.name in LABELS + ("aten::item", "aten::_local_scalar_dense", "cudaGraphLaunch",
                                       "cudaStreamSynchronize", "aten::to", "aten::copy_"))
        print("host ranges of the middle step (µs from its start):",
              "; ".join(f"{name} {a:.0f}-{b:.0f}" for a, b, name in ranges[:60]))
        busy = _merged([(a - start, b - start) for a, b in gpu if b > start and a < end], gap=2.0)
        print("GPU busy (µs, gaps under 2 µs joined):", "; ".join(f"{a:.0f}-{b:.0f}" for a, b in busy))
        kernels = defaultdict(lambda: [0, 0.0])
        for e in kernels_only:
            if start <= e.time_range.start < end:
                kernels[e.name[:70]][0] += 1
                kernels[e.name[:70]][1] += e.time_range.end - e.time_range.start
        print("| kernel (middle step) | count | µs |\n|---|---:|---:|")
        for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"| {name} | {count} | {us:.1f} |")
        print(f"total kernels in the step: {sum(c for c, _ in kernels.values())}")


def host_timed(cls, name: str, label, totals: dict, on: dict):
    """Wrap `cls.name` to add its host time (no synchronisation) to totals[label(args)]; returns the original."""
    method = getattr(cls, name)

    @functools.wraps(method)
    def wrapper(*a, **kw):
        if not on["on"]:
            return method(*a, **kw)
        start = time.perf_counter()
        try:
            return method(*a, **kw)
        finally:
            totals[label(*a) if callable(label) else label] += time.perf_counter() - start

    setattr(cls, name, wrapper)
    return method


def section_host(llm: LLM, paths: tuple, args) -> None:
    """Host time per stage of a step, nothing synchronised: what the host spends while the GPU runs. The
    read-back (`tolist`) holds the wait for the device; host time outside it is time the GPU may idle."""
    llm.set_speculation(SpeculationConfig(tree=paths, adaptive=False))
    totals: dict[str, float] = defaultdict(float)
    on = {"on": False}
    llm_model = llm.model
    wrapped = [
        (rm.RequestManager, "step", "whole step"),
        (rm.RequestManager, "_choose_drafting", "controller choice"),
        (DeviceTreeDrafter, "draft", "SSM drafting (launch)"),
        (ModelRunner, "forward_rows", lambda r, *a: "LLM forward (launch)" if r.model is llm_model else "SSM catch-up"),
        (ModelRunner, "commit_all", lambda r, *a: "LLM commit" if r.model is llm_model else "SSM commit"),
        (torch.Tensor, "argmax", "argmax (launch)"),
        (torch.Tensor, "tolist", "read-back (wait for the device)"),
        (InFlightStep, "tokens", "read-back of a plain step in flight (wait for it)"),
    ]
    originals = [(cls, name, host_timed(cls, name, label, totals, on)) for cls, name, label in wrapped]
    try:
        for mode in ("incremental", "tree"):
            for prompt in WARM_UP_PROMPTS[:2]:
                llm.generate([prompt], GenerationConfig(max_new_tokens=args.max_new_tokens), mode=mode)
            totals.clear()
            manager = llm.manager_for(mode)
            manager.step_log = []
            on["on"] = True
            for prompt in PROMPTS:
                llm.generate([prompt], GenerationConfig(max_new_tokens=args.max_new_tokens), mode=mode)
            on["on"] = False
            steps = len(manager.step_log)
            print(f"\nhost time per step, {mode}, {steps} steps (median step "
                  f"{1e3 * statistics.median(s for _, _, s, _ in manager.step_log):.3f} ms; no synchronisation; prefills included)")
            print("| stage | µs per step |\n|---|---:|")
            for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
                print(f"| {label} | {1e6 * seconds / steps:.1f} |")
            manager.step_log = None
    finally:
        for cls, name, method in originals:
            setattr(cls, name, method)


SECTIONS = {"sizes": section_sizes, "stages": section_stages, "adaptive": section_adaptive, "profile": section_profile,
            "timeline": section_timeline, "host": section_host}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm")
    p.add_argument("--ssm", action="append")
    p.add_argument("--device", default="cuda")
    p.add_argument("--expansion", default="2,2,1")
    p.add_argument("--tree", help="a fitted tree file (`specinfer fit-tree`); takes precedence over --expansion")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="requests served together (sizes and adaptive sections)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fold-rows", action="store_true",
                   help="with --compile: passes of several tokens with norms, SwiGLU, residuals folded into the products")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--draft-vocab", type=int, help="tokens the SSMs score (default: the engine's; 0: all)")
    p.add_argument("--sections", default="sizes,stages,adaptive")
    p.add_argument("--overlap-trees", action="store_true",
                   help="launch each next draft before the step is read back (EngineConfig.overlap_tree_steps)")
    args = p.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {sorted(SECTIONS)}")
    speculation = SpeculationConfig(expansion=parse_expansion(args.expansion),
                                    tree=load_tree_file(args.tree) if args.tree else None)
    paths = speculation.tree or speculation.tree_shape.paths[1:]
    engine = EngineConfig(max_batch_size=args.batch, max_sequence_length=512, device=args.device, dtype=args.dtype,
                          compile=args.compile, fold_rows=args.fold_rows, draft_vocab_size=args.draft_vocab,
                          overlap_tree_steps=args.overlap_trees)
    llm = LLM(args.llm, args.ssm, engine=engine, speculation=speculation)
    print(f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'} · torch {torch.__version__} · "
          f"{next(llm.model.parameters()).dtype} · tree of {len(paths)} nodes · compile={args.compile}"
          f"{' · passes of several tokens folded' if args.fold_rows else ''}"
          f"{' · next drafts launched before the read-back' if args.overlap_trees else ''}")
    for name in sections:
        SECTIONS[name](llm, tuple(paths), args)


if __name__ == "__main__":
    main()
