"""Tensor parallelism on one host: a random-weight LLaMA on 1 GPU and split over N GPUs (NCCL).

    python benchmarks/tensor_parallel.py --gpus 2                  # 13B-shaped, bf16
    python benchmarks/tensor_parallel.py --gpus 2 --llm-shape 7b

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
from scale_study import PREFIX, SHAPES, draft_time, timed  # noqa: E402

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
    runner = ModelRunner(model, num_slots=1, capacity=PREFIX + len(tree) + 8, use_cuda_graphs=graphs)
    runner.forward([Chunk.chain(0, list(range(1, PREFIX + 1)), logits="none")])
    runner.commit(0, list(range(PREFIX)))

    def step(parents: list[int]) -> None:
        logits = runner.forward([Chunk(0, [7] * len(parents), parents, list(range(len(parents))))])
        logits[0].argmax(-1).tolist()
        runner.commit(0, [])

    return {"decode_ms": timed(lambda: step([-1])) * 1e3, "verify_ms": timed(lambda: step(tree)) * 1e3}


def _rank(argv: list[str]) -> int:
    shape, dtype_name, tree, out = argv[0], argv[1], json.loads(argv[2]), argv[3]
    tp, device = from_environment(int(argv[4]), argv[5])
    model = build(shape, torch.device(device), getattr(torch, dtype_name), tp)
    results = {"eager": step_times(model, tree, graphs=False)}
    if device.startswith("cuda"):
        try:
            results["cuda_graphs"] = step_times(model, tree, graphs=True)
        except Exception as err:  # noqa: BLE001 (reported in the table, not fatal)
            results["cuda_graphs"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    if tp.rank == 0:
        Path(out).write_text(json.dumps(results))
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (gloo, no CUDA graphs)")
    p.add_argument("--llm-shape", default="13b", choices=["7b", "13b", "70b", "tiny"])
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--expansion", default="2,2,1")
    p.add_argument("--accepted", type=float, default=2.00, help="mean tokens per LLM step for the tree")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = TreeShape.from_widths(parse_expansion(args.expansion))
    tree = list(shape.parents)
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    graphs = device.type == "cuda"

    model = build(args.llm_shape, device, dtype)
    single = {"eager": step_times(model, tree, graphs=False)}
    if graphs:
        single["cuda_graphs"] = step_times(model, tree, graphs=True)
    del model
    torch.cuda.empty_cache()
    with torch.device(device):
        ssm = build("68m", device, dtype)
    t_draft = draft_time(ssm, shape) * 1e3
    del ssm
    torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / f".tp{args.gpus}.json"
    code = spawn(_rank, [args.llm_shape, args.dtype, json.dumps(tree), str(scratch), str(args.gpus), args.device],
                 args.gpus)
    if code:
        raise SystemExit(f"tensor-parallel ranks failed with exit code {code}")
    split = json.loads(scratch.read_text())
    scratch.unlink()

    rows = []
    for mode in single:
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
    tag = f"tensor_parallel_{args.llm_shape}_{args.gpus}gpu"
    (out / f"{tag}.json").write_text(json.dumps(results, indent=2))
    n = args.gpus
    lines = [f"# Tensor parallelism, {args.llm_shape}-shaped LLaMA (random weights: a projection)", "",
             f"{results['meta']['date']} · {n} × {results['meta']['device']} · torch {torch.__version__} · NCCL "
             f"{results['meta']['nccl']} · {args.dtype} · batch 1, {PREFIX} cached tokens · tree {args.expansion} "
             f"({len(tree)} nodes) · 68M-shaped SSM replicated, {t_draft:.2f} ms per draft · projected at "
             f"{args.accepted} tokens per step", "",
             f"Reproduce: `python benchmarks/tensor_parallel.py {' '.join(sys.argv[1:])}`", "",
             f"| mode | decode 1 GPU (ms) | decode {n} GPUs (ms) | speed-up | efficiency | verify 1 GPU (ms) | "
             f"verify {n} GPUs (ms) | incremental tok/s 1 → {n} | speculative tok/s 1 → {n} (projected) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
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
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
