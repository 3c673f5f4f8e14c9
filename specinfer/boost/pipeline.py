"""`specinfer boost-tune`: LLM answers -> SSM 1 -> SSM 2 weighted to what SSM 1 misses -> ... -> evaluation.

Every stage writes its result under the output folder and is skipped when that result already exists,
so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import EngineConfig, SpeculationConfig, parse_expansion
from ..errors import SpecInferError
from ..llm import LLM
from ..models.loader import load_model
from ..spec.tree import TreeShape
from ..spec.tree_fit import grow_tree, write_tree
from .data import generate_examples, write_answer_ranking
from .evaluate import Evaluation, evaluate
from .fit_tree import answer_ranks, judged_sample
from .oracle import oracle_tokens_per_step
from .prompts import build_prompts, read_prompt_file
from .train import TrainConfig, coverage, make_ssm, save_ssm, shares_embeddings, train_ssm

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", metavar="PATH", help="the LLM (default: the default model)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer (default: the one beside the LLM)")
    p.add_argument("--prompt-file", metavar="JSON",
                   help="training prompts, a JSON list of strings; every 5th is held out (default: the built-in "
                        "set of instruction templates × topics, split by topic)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: data, SSM folders, evaluation")
    p.add_argument("--num-ssms", type=int, default=2, help="how many SSMs to boost-tune")
    p.add_argument("--init", default="self:2", help="SSM shape: self:N (the LLM's first N layers) or random:LAYERS,HIDDEN")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train a self:N SSM's embeddings and LM head (by default they stay the LLM's, and the "
                        "saved SSM holds its layers only, sharing the LLM's embeddings when served)")
    p.add_argument("--steps", type=int, default=500, help="training steps per SSM")
    p.add_argument("--batch-size", type=int, default=16, help="training sequences per step")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="peak learning rate (cosine decay)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens per prompt from the LLM")
    p.add_argument("--max-sequence-length", type=int, default=1024, help="prompt + answer tokens at most")
    p.add_argument("--max-prompts", type=int, default=0, help="use at most this many training prompts (0 = all)")
    p.add_argument("--max-held-out", type=int, default=64, help="held-out prompts used for evaluation at most")
    p.add_argument("--answers-per-prompt", type=int, default=1,
                   help="LLM answers per training prompt: the greedy one, then sampled ones (temperature 0.8)")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=False,
                   help="train on the LLM's full next-token distributions (KL) instead of its tokens alone")
    p.add_argument("--covered-weight", type=float, default=0.1,
                   help="training weight of tokens the earlier SSMs already cover (1 = no boosting)")
    p.add_argument("--expansion", default="1,1,3,1,1,1,1,1", help="tree used to evaluate acceptance")
    p.add_argument("--tree-nodes", type=int, default=20,
                   help="also fit a tree of this many nodes per SSM to the set (tree.json, for --tree) and evaluate "
                        "it (0: skip)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the LLM's dtype (SSMs train in fp32 with bf16 autocast on GPU)")
    p.add_argument("--generation-batch-size", type=int, default=32, help="prompts the LLM answers at once")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.num_ssms < 1:
        raise SpecInferError("--num-ssms must be at least 1")
    if not re.fullmatch(r"self:\d+|random:\d+,\d+", args.init):
        raise SpecInferError(f"--init must be self:N or random:LAYERS,HIDDEN, got {args.init!r}")
    expansion = parse_expansion(args.expansion)
    train_prompts, held_out_prompts = read_prompt_file(args.prompt_file) if args.prompt_file else build_prompts()
    if args.max_prompts:
        train_prompts = train_prompts[: args.max_prompts]
    # Spread the held-out sample over all held-out topics rather than taking the first few; the tree is
    # fitted to the held-out prompts outside it (the SSMs have learned the training answers).
    held_out_prompts, tree_prompts = judged_sample(held_out_prompts, args.max_held_out)
    llm = LLM(args.llm, ssms=[], tokenizer=args.tokenizer,
              engine=EngineConfig(max_batch_size=args.generation_batch_size, max_sequence_length=args.max_sequence_length,
                                  device=args.device, dtype=args.dtype, fuse_projections=False,
                                  pack_cpu_weights=False),  # SSMs copy its layers
              speculation=SpeculationConfig(mode="incremental"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps({
        "how": "built-in instruction templates x topics, held-out topics disjoint" if not args.prompt_file
        else f"{args.prompt_file}, every 5th prompt held out", "train": train_prompts, "held_out": held_out_prompts,
    }, indent=1))
    train = generate_examples(llm, train_prompts, out / "data" / "train.jsonl", args.max_new_tokens,
                              args.generation_batch_size)
    for k in range(1, args.answers_per_prompt):  # sampled answers: more, and more varied, training text
        train += generate_examples(llm, train_prompts, out / "data" / f"train_sampled{k}.jsonl", args.max_new_tokens,
                                   args.generation_batch_size, sample_seed=k)
    held_out = generate_examples(llm, held_out_prompts, out / "data" / "held_out.jsonl", args.max_new_tokens,
                                 args.generation_batch_size)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         covered_weight=args.covered_weight, cover_top_k=max(expansion))
    ssms: list[torch.nn.Module] = []
    for k in range(1, args.num_ssms + 1):
        folder = out / f"ssm{k}"
        if (folder / "config.json").exists():
            log.info("SSM %d: reusing %s", k, folder)
            ssms.append(load_model(folder, llm.model.embed_tokens.weight.device, torch.float32, shared_from=llm.model))
            continue
        covered = coverage(ssms, train, config.cover_top_k, config.max_length)
        weights = [torch.where(c, config.covered_weight, 1.0) for c in covered]
        share = sum(int(c.sum()) for c in covered) / max(sum(len(c) for c in covered), 1)
        log.info("SSM %d: %.1f%% of training tokens already covered by SSMs 1..%d", k, 100 * share, k - 1)
        teacher = llm.model if args.distill else None
        ssm = make_ssm(llm.model, args.init, train_embeddings=args.train_embeddings)
        ssm = train_ssm(ssm, train, weights, config, folder / "checkpoint.pt", teacher)
        save_ssm(ssm, folder, share_embeddings=shares_embeddings(ssm))
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        ssms.append(ssm)

    dtype = llm.model.embed_tokens.weight.dtype
    untrained = make_ssm(llm.model, args.init).to(dtype).eval()
    labels = ["untrained draft"] + [f"ssm{k}" for k in range(1, len(ssms) + 1)]
    rows = evaluate(llm.model, [untrained], labels[:1], held_out, expansion, config.cover_top_k, config.max_length)
    served = [s.to(dtype) for s in ssms]
    rows += evaluate(llm.model, served, labels[1:], held_out, expansion, config.cover_top_k, config.max_length)
    if args.tree_nodes:
        # Greedy answers, as the tree serves greedy verification; to prompts the SSMs never saw, if enough.
        kind = "held-out" if len(tree_prompts) >= 8 else "training"
        fit_on = generate_examples(llm, tree_prompts[:256], out / "data" / "tree_fit.jsonl", args.max_new_tokens,
                                   args.generation_batch_size) if kind == "held-out" else train[: len(train_prompts)]
        grown = grow_tree([answer_ranks(s, fit_on) for s in served], args.tree_nodes)
        write_tree(out / "tree.json", grown, labels[1:], f"{len(fit_on)} greedy answers to {kind} prompts")
        shape = TreeShape.from_paths(grown)
        label = f"{'merged set' if len(ssms) > 1 else 'ssm1'}, fitted tree of {len(shape) - 1} nodes (tree.json)"
        rows.append(Evaluation(label, oracle_tokens_per_step(llm.model.config, served, held_out, expansion, 64,
                                                             tree=shape.paths[1:]), rows[-1].coverage))
    write_answer_ranking(out / "draft_vocab.json", train,
                         f"token counts of the LLM's {len(train)} answers to training prompts")
    write_evaluation(out, rows, args, len(train), len(held_out))
    return 0


def write_evaluation(out: Path, rows, args: argparse.Namespace, num_train: int, num_held_out: int) -> None:
    (out / "evaluation.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    lines = [
        f"Held-out prompts: {num_held_out} (training: {num_train}); greedy; expansion {args.expansion}; "
        f"SSM init {args.init}; {args.steps} steps per SSM.", "",
        "| SSMs | mean tokens per LLM step | LLM tokens in some SSM's top-k |", "|---|---:|---:|",
    ] + [f"| {r.label} | {r.mean_tokens_per_step:.2f} | {100 * r.coverage:.1f}% |" for r in rows]
    table = "\n".join(lines) + "\n"
    (out / "evaluation.md").write_text(table)
    print(table)
