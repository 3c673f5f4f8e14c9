"""Offloading against `accelerate`'s CPU offload, same RANDOM-weight model, same device budget, one run.

    python benchmarks/offload_vs_accelerate.py --llm-shape 13b --offload-gb 8

Both keep what fits a device budget of --offload-gb on the GPU and the other blocks in host memory:
- ours (`specinfer.engine.offload`): blocks in pinned memory, streamed on a side stream with the next
  block's copy overlapping the current block's compute; a decode step and a verification of the tree
  `--expansion` are timed through our ModelRunner;
- `accelerate` (`infer_auto_device_map` + `dispatch_model`, what `from_pretrained(device_map="auto",
  max_memory=...)` does): the `transformers` model, its offloaded blocks moved to the GPU by hooks at
  each forward. A decode step is timed as (generate 1 + N tokens - generate 1 token) / N.
Both decode after a 256-token prompt, batch 1, fp16. The speculative speed-up projected for ours uses
--accepted tokens per step (measured on the default model). Writes JSON to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time
from pathlib import Path

import torch

from scale_study import PREFIX, SHAPES, draft_time, prefilled_runner, random_llama, step_time  # noqa: E402
from specinfer.config import parse_expansion
from specinfer.engine.offload import offload
from specinfer.spec.tree import TreeShape


def ours(args, shape: TreeShape, dtype: torch.dtype) -> dict:
    device = torch.device("cuda")
    llm = random_llama(args.llm_shape, torch.device("cpu"), dtype)
    offload(llm, device, int(args.offload_gb * 2**30))
    runner = prefilled_runner(llm, 1, len(shape))
    decode = step_time(runner, 1, [-1])
    verify = step_time(runner, 1, list(shape.parents))
    ssm = random_llama(args.ssm_shape, device, dtype)
    t_draft = draft_time(ssm, shape)
    streamed = llm.streamer.streamed_bytes
    return {"decode_ms": decode * 1e3, "verify_ms": verify * 1e3, "draft_ms": t_draft * 1e3,
            "streamed_GB": streamed / 1e9, "h2d_reached_GBps": streamed / decode / 1e9,
            "speculative_ms_per_token": (t_draft + verify) / args.accepted * 1e3}


def with_accelerate(args, dtype: torch.dtype) -> dict:
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = SHAPES[args.llm_shape]
    config = LlamaConfig(vocab_size=32000, num_key_value_heads=fields["num_attention_heads"],
                         max_position_embeddings=4096, rms_norm_eps=1e-5, **fields)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # random weights drawn on the GPU (fast), kept on the host
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=dtype, device="cuda").normal_(0.0, 0.02).cpu())
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were left empty
    device_map = infer_auto_device_map(model, max_memory={0: f"{args.offload_gb}GiB", "cpu": "200GiB"},
                                       no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
    model = dispatch_model(model.eval(), device_map)
    on_cpu = sum(1 for d in device_map.values() if d == "cpu")
    prompt = torch.randint(0, 32000, (1, PREFIX), device="cuda")

    def generate(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(2)  # warm-up
    n = args.accelerate_tokens
    one, many = generate(1), generate(1 + n)
    return {"decode_ms": (many - one) / n * 1e3, "modules_on_cpu": on_cpu, "tokens_timed": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-shape", default="13b", choices=["7b", "13b", "tiny"])
    p.add_argument("--ssm-shape", default="68m")
    p.add_argument("--offload-gb", type=float, default=8.0)
    p.add_argument("--expansion", default="2,2,1")
    p.add_argument("--accepted", type=float, default=1.96, help="tokens per LLM step of --expansion (measured)")
    p.add_argument("--accelerate-tokens", type=int, default=4)
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    dtype = torch.float16
    shape = TreeShape.from_widths(parse_expansion(args.expansion))
    results = {"meta": {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "dtype": "float16", "llm_shape": args.llm_shape, "prefix": PREFIX, "budget_GB": args.offload_gb,
        "expansion": args.expansion, "accepted_tokens_per_step": args.accepted,
        "weights": "random (a projection, not a real model)",
    }}
    results["ours"] = ours(args, shape, dtype)
    print("ours", results["ours"], flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    results["accelerate"] = with_accelerate(args, dtype)
    print("accelerate", results["accelerate"], flush=True)
    ours_row, acc = results["ours"], results["accelerate"]
    results["speedup"] = {
        "incremental_vs_accelerate": acc["decode_ms"] / ours_row["decode_ms"],
        "speculative_vs_accelerate": acc["decode_ms"] / ours_row["speculative_ms_per_token"],
        "speculative_vs_incremental": ours_row["decode_ms"] / ours_row["speculative_ms_per_token"],
    }
    print("speed-up", results["speedup"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"offload_vs_accelerate_{args.llm_shape}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
