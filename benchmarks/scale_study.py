"""Scale study with RANDOM weights: what one step costs for LLaMA-7B/13B-shaped models, and the
speed-up those costs project with the acceptance measured on the real default model.

    python benchmarks/scale_study.py --device cuda                          # 7B-shaped, fp16
    python benchmarks/scale_study.py --device cuda --llm-shape 13b --offload-gb 8 --sections offload

Sections (all timed through our ModelRunner, host work and the step's read-back included, median of
repeats after warm-up, CUDA graphs on where the engine uses them):
- bandwidth: device copy bandwidth (bytes read + written) and pinned host-to-device bandwidth;
- incremental: one decode step per batch size, against the floor (weights + KV bytes / copy bandwidth):
  a step read back before the next is launched, and steps in flight as the engine decodes (each queued
  from the last one's tokens on the device before the host reads that one back, `engine/in_flight.py`);
- verify: one tree verification against tree size (nodes) and batch size, relative to a decode step;
- draft: one SSM expansion (68M- and 160M-shaped SSMs) of the tree `--expansion`, per batch size;
- projection: speed-up = tokens per step x decode step / (draft + verification), with the tokens per
  step given by --accepted (measured on the default model: docs/benchmarks/engine_speed_gpu*.md);
- quant: the decode step at batch 1 with int8 and int4 weights against the unquantized one (both ways;
  on CUDA with the LM head quantized too, and int4 also through the experimental bf16-pair kernel,
  SPECINFER_INT4_PAIRS=1; on the CPU int8, int4 and int4 with the LM head; `--quant-modes` picks others);
- undependent: with quant, each quantized step again without dependent launches (in flight);
- dependent_quantized: with quant, each quantized step again with its products launched as dependents
  too (SPECINFER_DEPENDENT_QUANTIZED=1; by default only the attention kernels are);
- offload: the decode step and a tree verification with the weights streamed from pinned host memory
  (`--offload-gb` device budget), the host-to-device bandwidth reached, and the projected speed-up;
- profile: device time per kernel of a batch-1 decode step and of a verification of the tree (printed).
Random weights make the outputs meaningless, never the costs: nothing here depends on token values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from specinfer.spec.tree_fit import load_tree_file
from specinfer.config import parse_expansion
from specinfer.engine.read_back import QueuedReadBack
from specinfer.engine.model_runner import Chunk, ModelRunner
from specinfer.models.compile import compile_blocks
from specinfer.models.fuse import fuse_projections
from specinfer.models.config import ModelConfig
from specinfer.models import build_model
from specinfer.spec.device_draft import DeviceTreeDrafter
from specinfer.spec.tree import TreeShape

SHAPES = {  # LLaMA-family shapes (Llama-2 7B/13B; the 68M/160M SSMs of the SpecInfer paper)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),  # Llama-2 70B: grouped-query attention
    "68m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12),
    "160m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),  # smoke test
}
PREFIX = 256  # cached tokens per request when a step is timed
# The quant section's rows: int8 or int4 weights; _pairs: int4 through the experimental bf16-pair kernel;
# _lm_head: the LM head quantized too.
QUANT_MODES = ("int8", "int8_lm_head", "int4", "int4_lm_head", "int4_pairs", "int4_pairs_lm_head")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_llama(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights drawn on the GPU where there is one (fast), then placed on `device`."""
    fields = SHAPES[shape]
    hf = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
              tie_word_embeddings=False, **{"num_key_value_heads": fields["num_attention_heads"], **fields})
    with torch.device("meta"):
        model = build_model(ModelConfig.from_hf_dict(hf)).to(dtype)
    model = model.to_empty(device=device)
    source = torch.device("cuda") if torch.cuda.is_available() else device
    with torch.no_grad():
        for name, p in model.named_parameters():  # noqa: B007
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=dtype, device=source).normal_(0.0, 0.02))
    return fuse_projections(model.eval())  # as the engine serves it


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every block, the final norm and the LM head (one embedding row)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or name.startswith("embed_tokens"):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def timed(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefilled_runner(model, batch: int, extra: int) -> ModelRunner:
    runner = ModelRunner(model, num_slots=batch, capacity=PREFIX + extra + 8)
    for slot in range(batch):
        runner.forward([Chunk.chain(slot, list(range(1, PREFIX + 1)), logits="none")])
        runner.commit(slot, list(range(PREFIX)))
    return runner


def step_time_once(runner: ModelRunner, batch: int, parents: list[int]) -> None:
    """One pass feeding a tree with `parents` to each of `batch` requests, logits read back; the tree is
    dropped afterwards so every repeat sees the same cache."""
    chunks = [Chunk(slot, [7] * len(parents), parents, list(range(len(parents)))) for slot in range(batch)]
    logits = runner.forward(chunks)
    torch.cat(logits).argmax(-1).tolist()
    for slot in range(batch):
        runner.commit(slot, [])


def step_time(runner: ModelRunner, batch: int, parents: list[int]) -> float:
    return timed(lambda: step_time_once(runner, batch, parents))


IN_FLIGHT_STEPS = 16  # decode steps chained per timed run


def in_flight_step_time(runner: ModelRunner, batch: int) -> float:
    """Seconds per decode step when steps go in flight as the engine's plain steps do: each step is
    queued from the previous step's tokens on the device, and only then is the previous one read back,
    so the host's work between passes overlaps the device's. Each run chains `IN_FLIGHT_STEPS` steps
    and commits their entries (the cache grows by that many per run; `prefilled_runner` leaves room)."""
    chunks = [Chunk(slot, [0], [-1], [0]) for slot in range(batch)]

    def run() -> None:
        tokens, pending = None, None
        for _ in range(IN_FLIGHT_STEPS):
            targets = runner.forward_rows(chunks, tokens).argmax(-1)
            step = QueuedReadBack(targets)
            runner.commit_all([(slot, [0]) for slot in range(batch)])
            if pending is not None:
                pending.tolist()
            pending, tokens = step, targets[:, None]
        pending.tolist()

    return timed(run, repeats=5, warmup=2) / IN_FLIGHT_STEPS


IN_FLIGHT_ROOM = 7 * IN_FLIGHT_STEPS  # cache entries the in-flight runs commit (warm-up and repeats)


def decode_times(model, unfolded: bool = False, dependent: bool = True,
                 dependent_products: bool = False) -> tuple[float, float]:
    """A batch-1 decode step, read back first and in flight, on a fresh runner (its CUDA graphs captured
    anew); `unfolded`: with the norms, SwiGLU and residual adds in kernels of their own (a compiled model
    folds them into its products at batch 1, layers/decode_gemv.py); `dependent`: kernels launched as
    dependents of the one before where they can be (layers/dependent_launch.py); `dependent_products`:
    quantized products among them (SPECINFER_DEPENDENT_QUANTIZED=1)."""
    folded = getattr(model, "fold_decode", False)
    model.fold_decode = folded and not unfolded
    switches = {"SPECINFER_DEPENDENT_LAUNCH": "1" if dependent else "0",
                "SPECINFER_DEPENDENT_QUANTIZED": "1" if dependent_products else "0"}
    before = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    try:
        runner = prefilled_runner(model, 1, 8 + IN_FLIGHT_ROOM)
        return step_time(runner, 1, [-1]), in_flight_step_time(runner, 1)
    finally:
        model.fold_decode = folded
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def draft_time(ssm, shape: TreeShape, batch: int = 1) -> float:
    """One SSM step of `batch` requests: a 2-token catch-up chain, then the tree expanded on the device."""
    runner = prefilled_runner(ssm, batch, len(shape))
    drafter = DeviceTreeDrafter(runner, shape)
    slots = list(range(batch))

    def draft():
        drafter.draft([[5, 6]] * batch, slots)[0].tolist()
        for s in slots:
            runner.commit(s, [])

    return timed(draft)


def tree_parents(nodes: int) -> list[int]:
    """A bushy tree of `nodes` nodes (breadth-first, 2 to 3 children each), like a merged token tree."""
    return [-1] + [(i - 1) // 3 if i % 2 else (i - 1) // 2 for i in range(1, nodes)]


def profile_steps(llm, tree: list[int] | None, label: str = "") -> None:
    """Kernels of 5 batch-1 decode steps and, given a `tree`, of 5 verifications of it."""
    from torch.profiler import ProfilerActivity, profile

    runner = prefilled_runner(llm, 1, len(tree or [-1]))
    for name, parents in [(f"decode {label}", [-1])] + ([(f"verify {len(tree)} nodes", tree)] if tree else []):
        step_time(runner, 1, parents)  # captures and warms up
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step_time_once(runner, 1, parents)
            sync()
        print(f"--- profile: {name}, batch 1, 5 steps")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))
        print_timeline(prof, steps=5)


def print_timeline(prof, steps: int, shown: int = 20) -> None:
    """The kernels of the middle step one by one (duration, and the gap since the last one ended; negative
    where dependent launches overlap), and the step's device time, busy and idle."""
    from torch.autograd import DeviceType

    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    per_step = len(kernels) // steps
    step = kernels[(steps // 2) * per_step:(steps // 2 + 1) * per_step]
    if not step:
        return
    print(f"--- timeline: {per_step} kernels a step; the first {shown} of the middle one")
    for before, kernel in zip([None] + step, step[:shown]):
        gap = kernel.time_range.start - before.time_range.end if before is not None else 0.0
        print(f"  {kernel.name[:60]:60s} {kernel.time_range.elapsed_us():7.1f} us  gap {gap:6.1f} us")
    busy = sum(k.time_range.elapsed_us() for k in step)
    span = step[-1].time_range.end - step[0].time_range.start
    by_name: dict[str, float] = {}
    for kernel in step:
        by_name[kernel.name[:60]] = by_name.get(kernel.name[:60], 0.0) + kernel.time_range.elapsed_us()
    print(f"  step span {span:.0f} us, kernels busy {busy:.0f} us; by kernel:")
    for kernel_name, total in sorted(by_name.items(), key=lambda item: -item[1])[:12]:
        print(f"    {kernel_name:60s} {total:8.0f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--llm-shape", default="7b", choices=["7b", "13b", "tiny"])
    p.add_argument("--ssm-shapes", default="68m,160m")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--sections", default="bandwidth,incremental,verify,draft,projection,quant")
    p.add_argument("--quant-modes", help="the quant section's rows, comma-separated, of " + ", ".join(QUANT_MODES) +
                   " (default on CUDA: int8_lm_head,int4_lm_head,int4_pairs_lm_head, which fit one 10-minute"
                   " device call with the bandwidth section; on CPU: int8,int4,int4_lm_head)")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--tree-sizes", default="1,2,4,8,16,32,64,128")
    p.add_argument("--expansion", default="1,1,3,1,1,1,1,1")
    p.add_argument("--tree", help="a fitted tree file (`specinfer fit-tree`) in place of --expansion")
    p.add_argument("--num-ssms", type=int, default=1,
                   help="SSMs drafting side by side (offload section): each drafts the tree, the LLM verifies all")
    p.add_argument("--accepted", type=float, default=1.75,
                   help="tokens per LLM step of --expansion on the default model (measured; see docstring)")
    p.add_argument("--offload-gb", type=float, default=8.0, help="device weight budget for the offload section")
    p.add_argument("--compile", action="store_true", help="fuse each block's kernels (torch.compile)")
    p.add_argument("--no-fold-decode", action="store_true",
                   help="compiled, keep batch-1 norms, SwiGLU and residual adds out of the products")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sections = set(args.sections.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"scale_study_{args.llm_shape}" + ("_offload" if sections == {"offload"} else "") + ("_compiled" if args.compile else "")
    results_path = out / f"{tag}.json"

    def save(results: dict) -> None:
        """The results so far: written after each quantized row too, so that a run cut by a time limit
        (a device call's) keeps what it measured."""
        results_path.write_text(json.dumps(results, indent=2, default=str))
    fuse = (lambda model: compile_blocks(model, not args.no_fold_decode)) if args.compile else (lambda model: model)
    batches = [int(b) for b in args.batches.split(",")]
    sizes = [int(n) for n in args.tree_sizes.split(",")]
    shape = TreeShape.from_paths(load_tree_file(args.tree)) if args.tree else TreeShape.from_widths(
        parse_expansion(args.expansion))
    results: dict = {"meta": {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "llm_shape": args.llm_shape, "prefix": PREFIX,
        "expansion": args.tree or args.expansion, "tree_nodes": len(shape), "num_ssms": args.num_ssms,
        "accepted_tokens_per_step": args.accepted,
        "weights": "random (a projection, not a real model)", "compiled": args.compile,
    }}

    if device.type == "cuda" and sections & {"bandwidth", "incremental", "offload"}:
        buf = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
        copy = torch.empty_like(buf)
        t = timed(lambda: copy.copy_(buf), repeats=10)
        host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
        t_h2d = timed(lambda: buf[: 2**30].copy_(host, non_blocking=True), repeats=10)
        results["bandwidth"] = {"device_copy_GBps": 2 * buf.numel() / t / 1e9, "h2d_pinned_GBps": 2**30 / t_h2d / 1e9}
        del buf, copy, host
        print("bandwidth", results["bandwidth"])
    bandwidth = results.get("bandwidth", {}).get("device_copy_GBps")

    if sections & {"incremental", "verify", "projection", "quant"}:
        llm = fuse(random_llama(args.llm_shape, device, dtype))
        cfg = llm.config
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        wbytes = weight_bytes(llm)
        results["llm_weight_GB"] = wbytes / 1e9
        inc, ver = {}, {}
        for batch in batches:
            runner = prefilled_runner(llm, batch, max(sizes + [len(shape)]) + IN_FLIGHT_ROOM)
            inc[batch] = step_time(runner, batch, [-1])
            floor = (wbytes + batch * PREFIX * kv_per_token) / (bandwidth * 1e9) if bandwidth else None
            print(f"incremental batch {batch}: {inc[batch] * 1e3:.2f} ms" +
                  (f", floor {floor * 1e3:.2f} ms ({floor / inc[batch]:.0%})" if floor else ""))
            results.setdefault("incremental", {})[batch] = {"ms": inc[batch] * 1e3, "floor_ms": floor and floor * 1e3}
            if "verify" in sections or "projection" in sections:
                for n in sizes + [len(shape)]:
                    ver[(batch, n)] = step_time(runner, batch, tree_parents(n) if n != len(shape) else list(shape.parents))
                    print(f"  verify batch {batch}, {n} nodes: {ver[(batch, n)] * 1e3:.2f} ms = "
                          f"{ver[(batch, n)] / inc[batch]:.2f} decode steps")
                    results.setdefault("verify", {}).setdefault(batch, {})[n] = ver[(batch, n)] * 1e3
            if "incremental" in sections:  # last: it grows the cache the verifications read
                flying = in_flight_step_time(runner, batch)
                # The cache grew meanwhile: the floor at the mean cached length of the timed steps.
                cached = PREFIX + 4.5 * IN_FLIGHT_STEPS
                floor_flying = (wbytes + batch * cached * kv_per_token) / (bandwidth * 1e9) if bandwidth else None
                print(f"  in flight: {flying * 1e3:.2f} ms" +
                      (f", floor {floor_flying * 1e3:.2f} ms ({floor_flying / flying:.0%})" if floor else ""))
                results["incremental"][batch].update(in_flight_ms=flying * 1e3, in_flight_floor_ms=floor_flying and floor_flying * 1e3)
                if batch == 1 and device.type == "cuda" and getattr(llm, "fold_decode", False):  # the same step without folding, for the record
                    unfolded, unfolded_flying = decode_times(llm, unfolded=True)
                    print(f"  unfolded: {unfolded * 1e3:.2f} ms, in flight {unfolded_flying * 1e3:.2f} ms")
                    results["incremental"][batch].update(unfolded_ms=unfolded * 1e3, unfolded_in_flight_ms=unfolded_flying * 1e3)
                    serial, serial_flying = decode_times(llm, dependent=False)
                    print(f"  without dependent launches: {serial * 1e3:.2f} ms, in flight {serial_flying * 1e3:.2f} ms")
                    results["incremental"][batch].update(not_dependent_ms=serial * 1e3,
                                                         not_dependent_in_flight_ms=serial_flying * 1e3)
            del runner
            torch.cuda.empty_cache()

        if "profile" in sections:
            profile_steps(llm, list(shape.parents))

        if "draft" in sections or "projection" in sections:
            for ssm_shape in args.ssm_shapes.split(","):
                ssm = fuse(random_llama(ssm_shape, device, dtype))
                for batch in batches:
                    t_draft = draft_time(ssm, shape, batch)
                    results.setdefault("draft", {}).setdefault(ssm_shape, {})[batch] = t_draft * 1e3
                    projected = args.accepted * inc[batch] / (t_draft + ver[(batch, len(shape))])
                    results.setdefault("projection", {}).setdefault(ssm_shape, {})[batch] = projected
                    print(f"draft {ssm_shape} batch {batch}: {t_draft * 1e3:.2f} ms; projected speed-up {projected:.2f}x")

                del ssm

        if "quant" in sections:
            from specinfer.quant.linear import quantize_model

            base, base_flying = decode_times(llm)  # on the cache the quantized runs get
            results["quant"] = {args.dtype: base * 1e3, f"{args.dtype}_in_flight": base_flying * 1e3}
            # int4_pairs: the int4 weights through the experimental bf16-pair kernel (SPECINFER_INT4_PAIRS=1,
            # read when a product is launched, so it holds for the graphs captured inside decode_times).
            # *_lm_head: the LM head quantized too (quantize_model's lm_head; 262 MB of a 7B's bf16 bytes).
            modes = args.quant_modes.split(",") if args.quant_modes else (
                ("int8_lm_head", "int4_lm_head", "int4_pairs_lm_head") if device.type == "cuda" else
                ("int8", "int4", "int4_lm_head"))
            for mode in modes:
                if mode not in QUANT_MODES:
                    raise SystemExit(f"--quant-modes: {mode!r} is not one of {', '.join(QUANT_MODES)}")
            for mode in modes:
                del llm
                torch.cuda.empty_cache()
                weights = mode.split("_")[0]
                group = math.gcd(128, SHAPES[args.llm_shape]["hidden_size"])  # 128, or the smoke test's width
                llm = fuse(quantize_model(random_llama(args.llm_shape, device, dtype), weights, group,
                                          lm_head=mode.endswith("lm_head")))
                os.environ["SPECINFER_INT4_PAIRS"] = "1" if "pairs" in mode else "0"
                t_q, t_q_flying = decode_times(llm)
                results["quant"][mode] = t_q * 1e3
                results["quant"][f"{mode}_in_flight"] = t_q_flying * 1e3
                if device.type == "cuda" and "undependent" in sections:
                    serial, serial_flying = decode_times(llm, dependent=False)
                    results["quant"][f"{mode}_not_dependent_in_flight"] = serial_flying * 1e3
                    print(f"  {mode} without dependent launches: in flight {serial_flying * 1e3:.2f} ms")
                if device.type == "cuda" and "dependent_quantized" in sections:
                    t_dq, t_dq_flying = decode_times(llm, dependent_products=True)
                    results["quant"][f"{mode}_dependent_products"] = t_dq * 1e3
                    results["quant"][f"{mode}_dependent_products_in_flight"] = t_dq_flying * 1e3
                    print(f"  {mode} with dependent products: {t_dq * 1e3:.2f} ms, in flight {t_dq_flying * 1e3:.2f} ms "
                          f"({base / t_dq:.2f}x / {base_flying / t_dq_flying:.2f}x)")
                if "profile" in sections:
                    profile_steps(llm, None, mode)
                results["quant"][f"{mode}_folded"] = getattr(llm, "fold_decode", False) and all(
                    block.decodes_folded() for block in llm.layers)
                print(f"quant {mode}: {t_q * 1e3:.2f} ms, {base / t_q:.2f}x faster than {args.dtype}; in flight "
                      f"{t_q_flying * 1e3:.2f} ms against {base_flying * 1e3:.2f} ({base_flying / t_q_flying:.2f}x)")
                save(results)
            os.environ.pop("SPECINFER_INT4_PAIRS")
        del llm
        torch.cuda.empty_cache()

    if "offload" in sections:
        from specinfer.engine.offload import offload

        llm = random_llama(args.llm_shape, torch.device("cpu"), dtype)
        offload(llm, device, int(args.offload_gb * 2**30))
        streamer = llm.streamer
        # The SSMs' trees side by side under one root, as the engine verifies greedy drafts.
        verified = [-1] + [p if p <= 0 else p + k * (len(shape) - 1) for k in range(args.num_ssms)
                           for p in shape.parents[1:]]
        runner = prefilled_runner(llm, 1, len(verified))
        t_inc = step_time(runner, 1, [-1])
        t_ver = step_time(runner, 1, verified)
        reached = streamer.streamed_bytes / t_inc / 1e9
        ssm = random_llama(args.ssm_shapes.split(",")[0], device, dtype)
        t_draft = draft_time(ssm, shape) * args.num_ssms  # same-shaped SSMs draft one after another
        projected = args.accepted * t_inc / (t_draft + t_ver)
        results["offload"] = {
            "budget_GB": args.offload_gb, "streamed_GB": streamer.streamed_bytes / 1e9,
            "decode_ms": t_inc * 1e3, "verify_ms": t_ver * 1e3, "verified_nodes": len(verified),
            "draft_ms": t_draft * 1e3,
            "h2d_reached_GBps": reached, "h2d_share": reached / results["bandwidth"]["h2d_pinned_GBps"],
            "projected_speedup": projected,
        }
        print("offload", results["offload"])

    save(results)
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
