"""Tensor parallelism on one host: a random-weight LLaMA on 1 GPU and split over N GPUs (NCCL).

    python benchmarks/tensor_parallel.py --gpus 2                  # 13B-shaped, bf16
    python benchmarks/tensor_parallel.py --gpus 2 --llm-shape 7b
    python benchmarks/tensor_parallel.py --gpus 8 --llm-shape 70b --no-single --batches 1,8,32 \
        --tree-sizes 1,2,4,8,16,32,64,128 --greedy-tokens 16 --accepted 1.96   # the 8-GPU run
    python benchmarks/tensor_parallel.py --gpus 4 --device cpu --llm-shape tiny --dtype float32 \
        --batches 1,2 --tree-sizes 1,4 --greedy-tokens 8                        # a smoke test (gloo)

With --batches or --tree-sizes, the N ranks also time the decode step at each batch size against the
memory-bandwidth floor of N GPUs (each rank's weight and cache bytes over its GPU's measured copy
bandwidth), one verification per tree size, and the throughput of incremental decoding and of speculation
projected from them (the SSM's drafting time at that batch, measured on one GPU, and --accepted). With
--greedy-tokens, the ranks generate that many tokens greedily for a few prompts, incrementally and with
tree speculation (a replicated random 68M-shaped SSM), and report whether the outputs agree (or, where
they part, the LLM's top-two margin there against the dtype's rounding bound). --no-single skips the
1-GPU baseline (a 70B-shaped model does not fit one GPU).

Random weights (a projection, not a real model), drawn from one seed on every rank, so each rank cuts its
slice out of the same full model (distributed/sharding.py). For 1 GPU and for N: the decode step at
batch 1 (256 cached tokens) and one verification of a token tree, with and without CUDA graphs; the
speculative rate projected from them, the SSM's drafting time (68M-shaped, replicated on every rank, so
the same on 1 and N GPUs) and the accepted tokens per step given by --accepted (measured on the default
model: `boost_tuning.md`, `engine_speed_gpu_tuned_ssms.md`). Scaling efficiency = speed-up / N.
Writes JSON and a Markdown table (device, torch version, date) to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scale_study import PREFIX, SHAPES, draft_time, timed, tree_parents  # noqa: E402

from specinfer.config import parse_expansion  # noqa: E402
from specinfer.distributed.launch import spawn  # noqa: E402
from specinfer.distributed.parallel import from_environment  # noqa: E402
from specinfer.distributed.sharding import local_config, shard_tensors  # noqa: E402
from specinfer.engine.model_runner import Chunk, ModelRunner  # noqa: E402
from specinfer.models.config import ModelConfig  # noqa: E402
from specinfer.models.fuse import fuse_projections  # noqa: E402
from specinfer.models import build_model  # noqa: E402
from specinfer.models.loader import instantiate  # noqa: E402
from specinfer.spec.tree import TreeShape  # noqa: E402


def llama_config(shape: str) -> ModelConfig:
    fields = {"num_key_value_heads": SHAPES[shape]["num_attention_heads"], **SHAPES[shape]}
    return ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096,
                                         rms_norm_eps=1e-5, tie_word_embeddings=False, **fields))


def random_weights(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, tp=None, seed: int = 0) -> dict:
    """The model's weights (this rank's slices under `tp`), the same on every GPU of a kind: each full
    tensor is drawn from a seed of its own, cut, and dropped before the next, so a rank never holds more
    than its share plus one full tensor (a 70B-shaped model does not fit one GPU whole)."""
    with torch.device("meta"):
        names = {name: p.shape for name, p in build_model(cfg).state_dict().items()}
    weights = {}
    for index, (name, shape) in enumerate(sorted(names.items())):
        generator = torch.Generator(device).manual_seed(seed + index)
        if "norm" in name:
            full = torch.ones(shape, dtype=dtype, device=device)
        else:
            full = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=generator)
        weights.update(shard_tensors(cfg, {name: full}, tp) if tp is not None else {name: full})
        del full
    return weights


def build(shape: str, device: torch.device, dtype: torch.dtype, tp=None) -> torch.nn.Module:
    cfg = llama_config(shape)
    weights = random_weights(cfg, device, dtype, tp)
    if tp is not None:
        cfg = local_config(cfg, tp)
    return fuse_projections(instantiate(cfg, weights, device, dtype, source="random", tp=tp))


def step_times(model: torch.nn.Module, tree: list[int], graphs: bool) -> dict:
    """The batch-1 decode step and one verification of `tree`, ms."""
    row = sweep_times(model, [1], [], tree, graphs)[1]
    return {"decode_ms": row["decode_ms"], "verify_ms": row["verify_ms"]["tree"]}


def sweep_times(model: torch.nn.Module, batches: list[int], sizes: list[int], tree: list[int], graphs: bool) -> dict:
    """Per batch size: the decode step and one verification per tree size (and of `tree`), every request
    with PREFIX cached tokens; ms."""
    results = {}
    for batch in batches:
        longest = max([len(tree), *sizes])
        runner = ModelRunner(model, num_slots=batch, capacity=PREFIX + longest + 8, use_cuda_graphs=graphs)
        runner.forward([Chunk.chain(s, list(range(1, PREFIX + 1)), logits="none") for s in range(batch)])
        for s in range(batch):
            runner.commit(s, list(range(PREFIX)))

        def step(parents: list[int]) -> None:
            logits = runner.forward([Chunk(s, [7] * len(parents), parents, list(range(len(parents))))
                                     for s in range(batch)])
            logits[0].argmax(-1).tolist()
            for s in range(batch):
                runner.commit(s, [])

        row = {"decode_ms": timed(lambda: step([-1])) * 1e3,
               "verify_ms": {n: timed(lambda n=n: step(tree_parents(n))) * 1e3 for n in sizes}}
        row["verify_ms"]["tree"] = timed(lambda: step(tree)) * 1e3
        results[batch] = row
        del runner
    return results


def greedy_check(model: torch.nn.Module, device: str, dtype: torch.dtype, expansion, tokens: int) -> dict:
    """Greedy outputs of incremental decoding and of tree speculation with a replicated random SSM, on this
    setup (every rank runs the same engine; rank 0's outputs are reported)."""
    from specinfer.config import EngineConfig, GenerationConfig, SpeculationConfig
    from specinfer.engine.request_manager import RequestManager
    from specinfer.exactness import ROUNDING_BOUNDS, divergence_margin

    ssm = build("68m", torch.device(device), dtype)
    prompts = [[1 + (7 * i + 3 * j) % 500 for j in range(12 + 5 * i)] for i in range(4)]
    outputs = {}
    for mode, ssms in (("incremental", []), ("tree", [ssm])):
        manager = RequestManager(model, ssms, EngineConfig(max_batch_size=len(prompts), max_sequence_length=128,
                                                           device=device, dtype=str(dtype).removeprefix("torch.")),
                                 SpeculationConfig(mode=mode, expansion=expansion, adaptive=False),
                                 eos_token_ids=[])  # random weights: no end of text, every output full length
        ids = [manager.register_new_request(p, sampling=GenerationConfig(max_new_tokens=tokens)) for p in prompts]
        manager.run()
        outputs[mode] = [manager.requests[i].output_tokens for i in ids]
    margins = [divergence_margin(model, p, inc, spec)
               for p, inc, spec in zip(prompts, outputs["incremental"], outputs["tree"])]
    bound = ROUNDING_BOUNDS[dtype]
    return {"tokens": tokens, "prompts": len(prompts), "identical": sum(m is None for m in margins),
            "divergence_margins": [m for m in margins if m is not None], "rounding_bound": bound,
            "equivalent": all(m is None or m <= bound for m in margins)}


def device_copy_bandwidth(device: torch.device) -> float | None:
    """GB/s of a device-to-device copy of 2 GiB on this rank's GPU."""
    if device.type != "cuda":
        return None
    buf = torch.empty(2**30, dtype=torch.uint8, device=device)
    copy = torch.empty_like(buf)
    seconds = timed(lambda: copy.copy_(buf), repeats=10)
    del buf, copy
    return 2 * 2**30 / seconds / 1e9


def _rank(argv: list[str]) -> int:
    shape, dtype_name, tree, out = argv[0], argv[1], json.loads(argv[2]), argv[3]
    tp, device = from_environment(int(argv[4]), argv[5])
    sweep = json.loads(argv[6])
    dtype = getattr(torch, dtype_name)
    model = build(shape, torch.device(device), dtype, tp)
    graphs = device.startswith("cuda")
    results = {"eager": step_times(model, tree, graphs=False)}
    if graphs:
        try:
            results["cuda_graphs"] = step_times(model, tree, graphs=True)
        except Exception as err:  # noqa: BLE001 (reported in the table, not fatal)
            results["cuda_graphs"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    if sweep["batches"]:
        cfg = model.config
        results["sweep"] = sweep_times(model, sweep["batches"], sweep["tree_sizes"], tree, graphs)
        results["rank_weight_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        results["rank_kv_bytes_per_token"] = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
        results["copy_GBps"] = device_copy_bandwidth(torch.device(device))
    if sweep["greedy_tokens"]:
        results["greedy"] = greedy_check(model, device, dtype, tuple(sweep["expansion"]), sweep["greedy_tokens"])
    if tp.rank == 0:
        Path(out).write_text(json.dumps(results))
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (gloo, no CUDA graphs)")
    p.add_argument("--llm-shape", default="13b", choices=["7b", "13b", "70b", "tiny"])
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--expansion", default="2,2,1")
    p.add_argument("--accepted", type=float, default=2.00, help="mean tokens per LLM step for the tree")
    p.add_argument("--batches", default="", help="batch sizes of the N-rank sweep (none: no sweep)")
    p.add_argument("--tree-sizes", default="1,2,4,8,16,32,64,128", help="verified tree sizes in the sweep")
    p.add_argument("--greedy-tokens", type=int, default=0, help="tokens of the N-rank greedy check (0: none)")
    p.add_argument("--no-single", action="store_true", help="skip the 1-GPU baseline")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    sizes = [int(n) for n in args.tree_sizes.split(",") if n]
    dtype = getattr(torch, args.dtype)
    shape = TreeShape.from_widths(parse_expansion(args.expansion))
    tree = list(shape.parents)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    graphs = device.type == "cuda"

    single = {}
    if not args.no_single:
        model = build(args.llm_shape, device, dtype)
        single = {"eager": step_times(model, tree, graphs=False)}
        if graphs:
            single["cuda_graphs"] = step_times(model, tree, graphs=True)
        del model
        torch.cuda.empty_cache()
    with torch.device(device):
        ssm = build("68m", device, dtype)
    t_draft = draft_time(ssm, shape) * 1e3
    drafts = {batch: draft_time(ssm, shape, batch) * 1e3 for batch in batches}
    del ssm
    torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / f".tp{args.gpus}.json"
    sweep = {"batches": batches, "tree_sizes": sizes, "greedy_tokens": args.greedy_tokens,
             "expansion": list(parse_expansion(args.expansion))}
    code = spawn(_rank, [args.llm_shape, args.dtype, json.dumps(tree), str(scratch), str(args.gpus), args.device,
                         json.dumps(sweep)], args.gpus)
    if code:
        raise SystemExit(f"tensor-parallel ranks failed with exit code {code}")
    split = json.loads(scratch.read_text())
    scratch.unlink()

    rows = []
    for mode in single if single else ():
        one, many = single[mode], split.get(mode, {})
        row = {"mode": mode, "gpus_1": one, f"gpus_{args.gpus}": many}
        if "decode_ms" in many:
            row["decode_speedup"] = one["decode_ms"] / many["decode_ms"]
            row["decode_efficiency"] = row["decode_speedup"] / args.gpus
            for key, timing in (("gpus_1", one), (f"gpus_{args.gpus}", many)):
                row[f"projected_spec_tok_s_{key}"] = args.accepted / ((t_draft + timing["verify_ms"]) / 1e3)
                row[f"incremental_tok_s_{key}"] = 1e3 / timing["decode_ms"]
        rows.append(row)
    results = {"meta": {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device) if graphs else "CPU",
                        "gpus": args.gpus, "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if graphs else "gloo",
                        "dtype": args.dtype, "llm_shape": args.llm_shape, "prefix": PREFIX, "expansion": args.expansion,
                        "tree_nodes": len(tree), "accepted_tokens_per_step": args.accepted, "draft_ms_68m": t_draft,
                        "weights": "random (a projection, not a real model)"}, "rows": rows}
    results["ranks"] = {mode: split[mode] for mode in ("eager", "cuda_graphs") if mode in split}
    if "sweep" in split:
        results["sweep"] = sweep_rows(split, drafts, args.accepted)
    if "greedy" in split:
        results["greedy"] = split["greedy"]
    tag = f"tensor_parallel_{args.llm_shape}_{args.gpus}gpu"
    (out / f"{tag}.json").write_text(json.dumps(results, indent=2))
    n = args.gpus
    lines = [f"# Tensor parallelism, {args.llm_shape}-shaped LLaMA (random weights: a projection)", "",
             f"{results['meta']['date']} · {n} × {results['meta']['device']} · torch {torch.__version__} · NCCL "
             f"{results['meta']['nccl']} · {args.dtype} · batch 1, {PREFIX} cached tokens · tree {args.expansion} "
             f"({len(tree)} nodes) · 68M-shaped SSM replicated, {t_draft:.2f} ms per draft · projected at "
             f"{args.accepted} tokens per step", "",
             f"Reproduce: `python benchmarks/tensor_parallel.py {' '.join(sys.argv[1:])}`", ""]
    if rows:
        lines += [
             f"| mode | decode 1 GPU (ms) | decode {n} GPUs (ms) | speed-up | efficiency | verify 1 GPU (ms) | "
             f"verify {n} GPUs (ms) | incremental tok/s 1 → {n} | speculative tok/s 1 → {n} (projected) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    else:
        lines += [f"| mode | decode {n} GPUs (ms) | verify {n} GPUs (ms) |", "|---|---:|---:|"]
        lines += [f"| {mode} | {t.get('decode_ms', float('nan')):.2f} | {t.get('verify_ms', float('nan')):.2f} |"
                  for mode, t in results["ranks"].items()]
    for row in rows:
        many = row[f"gpus_{n}"]
        if "decode_ms" not in many:
            lines.append(f"| {row['mode']} | {row['gpus_1']['decode_ms']:.2f} | {many.get('error', 'failed')} | | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {row['gpus_1']['decode_ms']:.2f} | {many['decode_ms']:.2f} | {row['decode_speedup']:.2f}x | "
            f"{row['decode_efficiency']:.0%} | {row['gpus_1']['verify_ms']:.2f} | {many['verify_ms']:.2f} | "
            f"{row['incremental_tok_s_gpus_1']:.0f} → {row[f'incremental_tok_s_gpus_{n}']:.0f} | "
            f"{row['projected_spec_tok_s_gpus_1']:.0f} → {row[f'projected_spec_tok_s_gpus_{n}']:.0f} |")
    if "sweep" in results:
        lines += ["", sweep_table(results["sweep"], sizes, n)]
    if "greedy" in results:
        g = results["greedy"]
        lines += ["", f"Greedy check on the {n} ranks: {g['prompts']} prompts × {g['tokens']} tokens, tree "
                      f"speculation against incremental decoding: {g['identical']} identical"
                      + (f", divergences at top-two margins {g['divergence_margins']} (bound {g['rounding_bound']})"
                         if g["divergence_margins"] else "")
                  + f"; **{'equivalent' if g['equivalent'] else 'NOT equivalent'}**."]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sweep_rows(split: dict, drafts: dict, accepted: float) -> list[dict]:
    """The N-rank sweep with its floors and projected throughputs, a row per batch size."""
    rows = []
    for batch, draft_ms in drafts.items():
        timing = split["sweep"][str(batch)]
        floor = ((split["rank_weight_bytes"] + batch * PREFIX * split["rank_kv_bytes_per_token"])
                 / (split["copy_GBps"] * 1e9) * 1e3) if split.get("copy_GBps") else None
        spec_step = draft_ms + timing["verify_ms"]["tree"]
        rows.append({"batch": batch, "decode_ms": timing["decode_ms"], "floor_ms": floor,
                     "verify_ms": timing["verify_ms"], "draft_ms": draft_ms,
                     "incremental_tok_s": batch / timing["decode_ms"] * 1e3,
                     "speculative_tok_s_projected": batch * accepted / spec_step * 1e3,
                     "projected_speedup": accepted * timing["decode_ms"] / spec_step})
    return rows


def sweep_table(rows: list[dict], sizes: list[int], n: int) -> str:
    head = (f"| batch | decode (ms) | floor of {n} GPUs | " + " | ".join(f"verify {s}" for s in sizes)
            + " | verify tree | draft (ms) | incremental tok/s | speculative tok/s (projected) | speed-up |")
    lines = ["Verification in decode steps; the floor is a rank's weights and cache over its GPU's copy bandwidth.",
             "", head, "|---:|---:|---:|" + "---:|" * (len(sizes) + 5)]
    for row in rows:
        decode, floor = row["decode_ms"], row["floor_ms"]
        verify = [row["verify_ms"][str(s)] for s in sizes]  # the ranks' JSON: keys are strings
        floor_cell = f"{floor:.2f} ms ({floor / decode:.0%})" if floor else "-"
        lines.append(f"| {row['batch']} | {decode:.2f} | " + floor_cell
                     + " | " + " | ".join(f"{v / decode:.2f}" for v in verify)
                     + f" | {row['verify_ms']['tree'] / decode:.2f} | {row['draft_ms']:.2f} | {row['incremental_tok_s']:.0f}"
                     f" | {row['speculative_tok_s_projected']:.0f} | {row['projected_speedup']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
