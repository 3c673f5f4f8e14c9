"""Where one engine step spends its time: host wall time per step, and device time per stage.

    python benchmarks/step_profile.py --device cuda --ssm path/to/ssm --expansion 2,2,1

Runs greedy generation at batch 1, incremental and tree, after a warm-up of each (so CUDA graphs are
captured before timing), then profiles a few steps with torch.profiler, labelling the stages (SSM
catch-up, device drafting, LLM verification, read-back). Prints tables; writes nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.config import parse_expansion
from specinfer.engine import request_manager as rm
from specinfer.engine.model_runner import ModelRunner
from specinfer.spec.device_draft import DeviceTreeDrafter

PROMPT = "Explain what a hash table is to a new programmer."


def labelled(cls, name: str, label: str) -> None:
    method = getattr(cls, name)

    def wrapper(*args, **kwargs):
        with record_function(label):
            return method(*args, **kwargs)

    setattr(cls, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm")
    p.add_argument("--ssm", action="append")
    p.add_argument("--device", default="cuda")
    p.add_argument("--expansion", default="2,2,1")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-profile", action="store_true", help="only the timed runs")
    args = p.parse_args()
    engine = EngineConfig(max_batch_size=1, max_sequence_length=512, device=args.device, compile=args.compile)
    llm = LLM(args.llm, args.ssm, engine=engine,
              speculation=SpeculationConfig(expansion=parse_expansion(args.expansion), adaptive=False))
    labelled(ModelRunner, "forward", "runner.forward")
    labelled(ModelRunner, "_prepare", "runner._prepare (host)")
    labelled(DeviceTreeDrafter, "expand", "drafter.expand")
    labelled(rm.RequestManager, "_commit", "commit")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for mode in ("incremental", "tree"):
        for _ in range(2):  # warm-up: graph captures, allocator growth
            llm.generate([PROMPT], config, mode=mode)
        sync()
        start = time.perf_counter()
        result = llm.generate([PROMPT], config, mode=mode)[0]
        sync()
        elapsed = time.perf_counter() - start
        steps = result.num_llm_steps
        print(f"{mode}: {len(result.output_tokens)} tokens in {steps} steps, {elapsed / steps * 1e3:.2f} ms/step, "
              f"{(result.num_accepted + steps) / steps:.2f} tokens/step, {len(result.output_tokens) / elapsed:.1f} tok/s")
        if args.no_profile:
            continue
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            result = llm.generate([PROMPT], GenerationConfig(max_new_tokens=32), mode=mode)[0]
            sync()
        print(f"--- {mode}, {result.num_llm_steps} steps profiled")
        sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
