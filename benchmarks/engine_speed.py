"""Incremental decoding vs sequence and tree speculation on one model, same prompts, one run.

    python benchmarks/engine_speed.py                       # default model, CPU
    python benchmarks/engine_speed.py --device cuda         # one GPU (bf16)
    python benchmarks/engine_speed.py --trees tree_10.json  # also a fitted tree (specinfer fit-tree)

Each prompt is served alone (batch 1, greedy), so tokens/s is single-request latency. Writes a JSON file
and a Markdown table (device, torch version, date) to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig
from specinfer.spec.tree_fit import load_tree_file
from specinfer.boost.prompts import build_prompts
from specinfer.config import parse_expansion
from specinfer.default_model import DEFAULT_SSMS, TUNED_PREFIX, tuned_ssm_path
from specinfer.exactness import ROUNDING_BOUNDS, divergence_margin

PROMPTS = [
    "What are three good reasons to learn a second language? Answer briefly.",
    "Write a short poem about the ocean.",
    "Explain what a hash table is to a new programmer.",
    "Give me a recipe for a simple tomato soup.",
]


WARM_UP_PROMPTS = build_prompts()[1][3::11][: len(PROMPTS)]  # held-out topics, none of the above


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def drafts_ahead_case(llm: LLM, label: str, prompts: list[str], max_new_tokens: int) -> dict:
    """`run_case` of the tree engine now set, with each next draft launched before the step is read back
    (`EngineConfig.overlap_tree_steps`)."""
    manager = llm.manager_for("tree")
    manager.overlap_trees = True
    row = run_case(llm, "tree", prompts, max_new_tokens)
    row.update(label=f"{label}, next draft launched before the read-back",
               next_drafts_taken=manager.next_drafts_taken, next_draft_misses=manager.next_draft_misses)
    return row


def run_case(llm: LLM, mode: str, prompts: list[str], max_new_tokens: int) -> dict:
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    # Untimed, as many other prompts, one at a time: the steady state of a server that has run a while
    # (CUDA graphs of every tree size captured, the adaptive controller's step costs measured).
    for prompt in WARM_UP_PROMPTS[: len(prompts)]:
        llm.generate([prompt], config, mode=mode)
    tokens, steps, accepted, elapsed, outputs = 0, 0, 0, 0.0, []
    for prompt in prompts:
        if llm.engine_config.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = llm.generate([prompt], config, mode=mode)[0]
        if llm.engine_config.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        tokens += len(result.output_tokens)
        steps += result.num_llm_steps
        accepted += result.num_accepted
        outputs.append(result.output_tokens)
    return {
        "mode": mode, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
        "tokens_per_step": (accepted + steps) / max(steps, 1), "outputs": outputs,
    }


def hf_llm(llm: LLM):
    """The LLM as a `transformers` model: the same weights, dtype and device."""
    from transformers import AutoModelForCausalLM

    path = Path(llm.model_path)
    dtype = llm.model.embed_tokens.weight.dtype
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(llm.engine_config.device).eval()


def hf_assistant(hf_model, ssm_folder: Path):
    """A saved SSM that shares the LLM's embeddings and LM head (boost-tuned from `self:N`) as a
    `transformers` model for assisted generation: its own layers and norm, the LLM's embeddings."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = hf_model.config.__class__.from_dict(
        {**hf_model.config.to_dict(), **json.loads((ssm_folder / "config.json").read_text())})
    assistant = AutoModelForCausalLM.from_config(config, dtype=hf_model.dtype)
    state = {}
    for file in sorted(ssm_folder.glob("*.safetensors")):
        state.update(load_file(file))
    state["model.embed_tokens.weight"] = hf_model.model.embed_tokens.weight.detach()
    missing, unexpected = assistant.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"{ssm_folder}: not an SSM sharing the LLM's embeddings ({missing} {unexpected})")
    assistant.tie_weights()
    return assistant.to(hf_model.device).eval()


def hf_case(llm: LLM, label: str, prompts: list[str], max_new_tokens: int, model=None, **generate_kwargs) -> dict:
    """`transformers` on the same weights, dtype, device and token ids, as a reference point."""
    model = model if model is not None else hf_llm(llm)
    eos = llm.eos_token_ids[0] if llm.eos_token_ids else None
    tokens, elapsed, outputs = 0, 0.0, []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([llm.encode_prompt(prompt, True)], device=llm.engine_config.device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        if i == 0:  # warm-up
            model.generate(ids, **{**kwargs, "max_new_tokens": 8}, **generate_kwargs)
        if llm.engine_config.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs, **generate_kwargs)[0, ids.shape[1]:].tolist()
        if llm.engine_config.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        tokens += len(out)
        outputs.append(out)
    return {"mode": "transformers", "label": label, "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "tokens_per_step": None, "outputs": outputs}


def result_tag(args: argparse.Namespace) -> str:
    """Result files are named by device, and by dtype, draft vocabulary and --tag where asked for:
    engine_speed_cpu_bfloat16.md, engine_speed_cpu_bfloat16_vocab0.md, engine_speed_cpu_float32_epyc.md."""
    tag = ("gpu" if args.device.startswith("cuda") else "cpu") + ("" if args.dtype == "auto" else f"_{args.dtype}")
    return tag + ("" if args.draft_vocab is None else f"_vocab{args.draft_vocab}") + (f"_{args.tag}" if args.tag else "")


def draft_vocab_size(llm: LLM) -> int:
    """Tokens the SSMs score (0: the whole vocabulary)."""
    heads = [ssm.lm_head for ssm in llm.ssms]
    return heads[0].token_ids.numel() if heads and hasattr(heads[0], "token_ids") else 0


def write_report(llm: LLM, args: argparse.Namespace, prompts: list[str], rows: list[dict], final: bool = False) -> None:
    base = rows[0]
    bound = ROUNDING_BOUNDS[llm.model.embed_tokens.weight.dtype]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        if "equivalent" in row:
            continue
        margins = [divergence_margin(llm.model, llm.encode_prompt(p, True), ref, out)
                   for p, ref, out in zip(prompts, base["outputs"], row["outputs"])]
        diverged = [m for m in margins if m is not None]
        row["num_identical"] = len(margins) - len(diverged)
        row["max_divergence_margin"] = max(diverged, default=None)
        row["equivalent"] = all(m <= bound for m in diverged)

    meta = {
        "date": datetime.date.today().isoformat(), "device": device_name(args.device),
        "torch": torch.__version__, "dtype": str(llm.model.embed_tokens.weight.dtype).removeprefix("torch."),
        "llm": str(llm.model_path), "ssms": args.ssm or ["default (tuned:1)"], "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "batch_size": 1, "greedy": True, "compiled": args.compile, "fold_rows": args.fold_rows,
        "draft_vocab": draft_vocab_size(llm),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = result_tag(args)
    (out / f"engine_speed_{tag}.json").write_text(json.dumps(
        {"meta": meta, "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}, indent=2))
    lines = [
        f"# Engine speed, default model, {tag.split('_')[0].upper()}", "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · {meta['dtype']} · batch 1, greedy · "
        f"{len(prompts)} prompts × up to {args.max_new_tokens} new tokens · SSMs: {', '.join(meta['ssms'])}"
        f" · draft vocabulary: {meta['draft_vocab'] or 'the whole one'}"
        f"{' · blocks compiled (--compile)' if args.compile else ''}"
        f"{' · passes of several tokens folded (--fold-rows)' if args.fold_rows else ''} · each row after an untimed pass over as many other prompts", "",
        f"Reproduce: `python benchmarks/engine_speed.py {' '.join(sys.argv[1:])}`", "",
        f"Outputs vs incremental: identical prompts, and where one differs the LLM's top-two logit margin at the "
        f"first difference (equivalent if <= {bound}, the {meta['dtype']} rounding bound). The transformers rows are "
        f"another implementation with its own rounding: their comparison is for information.", "",
        "| mode | tokens/s | speed-up vs incremental | tokens per LLM step | identical outputs | equivalent |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        margin = "" if r["max_divergence_margin"] is None else f" (max margin {r['max_divergence_margin']:.3g})"
        per_step = "–" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        lines.append(f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {per_step} | "
                     f"{r['num_identical']}/{len(prompts)} | {'yes' if r['equivalent'] else 'no'}{margin} |")
    table = "\n".join(lines) + "\n"
    (out / f"engine_speed_{tag}.md").write_text(table)
    if final:
        print(table)




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="LLM path (default: the default model)")
    p.add_argument("--ssm", action="append", help="SSM(s) (default: the default draft)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--expansions", default="1,1,3,1,1,1,1,1;2,2,1,1;1,1,1,1",
                   help="semicolon-separated expansion configs for tree mode")
    p.add_argument("--trees", default="",
                   help="semicolon-separated fitted tree files (`specinfer fit-tree`): a fixed and an adaptive row each")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    p.add_argument("--out", default="docs/benchmarks", help="folder for the JSON and Markdown results")
    p.add_argument("--tag", help="appended to the result files' names (e.g. the machine: engine_speed_cpu_float32_epyc.md)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers reference rows")
    p.add_argument("--compile", action="store_true", help="fuse each block's kernels with torch.compile")
    p.add_argument("--fold-rows", action="store_true",
                   help="with --compile: passes of several tokens with norms, SwiGLU, residuals folded into the products")
    p.add_argument("--draft-vocab", type=int, help="tokens the SSMs score (default: the engine's; 0: all)")
    args = p.parse_args()

    prompts = PROMPTS[: args.num_prompts]
    # Drafts after the read-back unless a row says otherwise (`drafts_ahead_case`).
    engine = EngineConfig(max_batch_size=1, max_sequence_length=512, device=args.device, dtype=args.dtype,
                          overlap_tree_steps=False,
                          compile=args.compile, fold_rows=args.fold_rows, draft_vocab_size=args.draft_vocab)
    expansions = [parse_expansion(e) for e in args.expansions.split(";")]
    # Fixed trees (adaptive off) measure each configuration's acceptance; one adaptive row follows.
    llm = LLM(args.llm, args.ssm, engine=engine, speculation=SpeculationConfig(expansion=expansions[0], adaptive=False))
    rows = [run_case(llm, "incremental", prompts, args.max_new_tokens)]
    rows[0]["label"] = "incremental"
    manager = llm.manager_for("incremental")
    if manager.overlap:  # what queueing plain steps ahead of their read-back gains (engine/in_flight.py)
        manager.overlap = False
        rows.append(run_case(llm, "incremental", prompts, args.max_new_tokens))
        rows[-1]["label"] = "incremental, each step read back before the next is queued"
        manager.overlap = True
    for expansion in expansions:
        llm.set_speculation(SpeculationConfig(expansion=expansion, adaptive=False))
        for mode in ("sequence", "tree") if expansion == expansions[0] else ("tree",):
            row = run_case(llm, mode, prompts, args.max_new_tokens)
            depth = len(expansion)
            row["label"] = f"sequence (depth {depth})" if mode == "sequence" else f"tree {','.join(map(str, expansion))}"
            rows.append(row)
            write_report(llm, args, prompts, rows)
    trees = [(Path(f).stem, load_tree_file(f)) for f in args.trees.split(";") if f]
    for name, tree in trees:
        llm.set_speculation(SpeculationConfig(tree=tree, adaptive=False))
        row = run_case(llm, "tree", prompts, args.max_new_tokens)
        row["label"] = f"fitted tree {name} ({len(tree)} nodes)"
        rows.append(row)
        write_report(llm, args, prompts, rows)
        if llm.manager_for("tree").overlap:  # what launching each next draft before the read-back gains
            rows.append(drafts_ahead_case(llm, f"fitted tree {name}", prompts, args.max_new_tokens))
            write_report(llm, args, prompts, rows)
    adaptive = [(f"tree {','.join(map(str, expansions[0]))}, adaptive", SpeculationConfig(expansion=expansions[0]))]
    adaptive += [(f"fitted tree {name}, adaptive", SpeculationConfig(tree=tree)) for name, tree in trees]
    for label, speculation in adaptive:
        llm.set_speculation(speculation)
        row = run_case(llm, "tree", prompts, args.max_new_tokens)
        row["label"] = label
        rows.append(row)
        write_report(llm, args, prompts, rows)
    if llm.manager_for("tree").overlap:
        llm.set_speculation(adaptive[-1][1])  # a fresh engine: the controller's measurements restart
        rows.append(drafts_ahead_case(llm, adaptive[-1][0], prompts, args.max_new_tokens))
        write_report(llm, args, prompts, rows)
    if not args.no_transformers:
        rows.append(hf_case(llm, "transformers generate", prompts, args.max_new_tokens))
        write_report(llm, args, prompts, rows)
        ssm = (args.ssm or list(DEFAULT_SSMS))[0]
        if ssm.startswith("self:"):  # the same draft: the LLM's first N layers and its LM head
            layers = int(ssm.removeprefix("self:"))
            rows.append(hf_case(llm, f"transformers assisted (early exit {layers})", prompts, args.max_new_tokens,
                                assistant_early_exit=layers))
        else:  # the same SSM, as a transformers assistant model
            folder = tuned_ssm_path(ssm) if ssm.startswith(TUNED_PREFIX) else Path(ssm)
            model = hf_llm(llm)
            rows.append(hf_case(llm, f"transformers assisted ({ssm})", prompts, args.max_new_tokens, model=model,
                                assistant_model=hf_assistant(model, folder)))
    write_report(llm, args, prompts, rows, final=True)
    print(f"wrote {args.out}/engine_speed_{result_tag(args)}.{{md,json}}")


if __name__ == "__main__":
    main()
