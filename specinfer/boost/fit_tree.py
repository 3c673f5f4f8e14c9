"""`specinfer fit-tree`: a draft tree shaped by where an LLM's SSMs are right (spec/tree_fit.py).

The LLM answers prompts greedily (our engine; reused from `--out` if already there), each SSM ranks every
answer token teacher-forced, and a shape of `--nodes` nodes is fitted to those ranks. The fitted shape is
then judged on other held-out answers against the `--expansion` tree, and written as JSON that `--tree`
loads. By default the tree is fitted to held-out prompts too (those outside the judged sample): SSMs
boost-tuned on the training prompts have learned those answers, and a tree fitted to them would
expect far more of the SSMs than they give on new text (on the shipped SSMs, 4.2 tokens per step on
the training answers against 2.9 held out, for the same 256-node tree).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import MAX_TREE_NODES, EngineConfig, SpeculationConfig, parse_expansion
from ..errors import SpecInferError
from ..llm import LLM
from ..spec.tree import TreeShape
from ..spec.tree_fit import grow_tree, tokens_per_step, write_tree
from .data import Example, generate_examples, write_answer_ranking
from .oracle import oracle_tokens_per_step
from .prompts import build_prompts, read_prompt_file
from .train import answer_batch, causal_logits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", metavar="PATH", help="the LLM (default: the default model)")
    p.add_argument("--ssm", dest="ssms", action="append", metavar="PATH",
                   help="an SSM as --ssm takes it elsewhere; repeat for SSMs drafting side by side "
                        "(default: the LLM's default draft)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer (default: the one beside the LLM)")
    p.add_argument("--prompt-file", metavar="JSON",
                   help="prompts, a JSON list of strings; every 5th is held out (default: the built-in set)")
    p.add_argument("--out", required=True, metavar="DIR", help="answers, the fitted tree (tree.json), its report")
    p.add_argument("--nodes", type=int, action="append", metavar="N",
                   help="tree nodes per SSM, root excluded; repeat for several trees (default: 20). Each file lists "
                        "its paths in growth order, so `--tree FILE --tree-nodes M` cuts it to any smaller tree")
    p.add_argument("--max-depth", type=int, default=16, help="deepest level the tree may reach")
    p.add_argument("--fit-on", choices=["held-out", "train"], default="held-out",
                   help="the prompts to fit to: held-out ones outside the judged sample (for SSMs trained on the "
                        "training prompts), or the training prompts")
    p.add_argument("--max-prompts", type=int, default=256, help="prompts the tree is fitted to at most (0 = all)")
    p.add_argument("--max-held-out", type=int, default=48, help="held-out prompts to judge the tree on")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer tokens per prompt")
    p.add_argument("--max-sequence-length", type=int, default=1024, help="prompt + answer tokens at most")
    p.add_argument("--eval-new-tokens", type=int, default=64,
                   help="answer tokens each held-out request generates when judging (as boost-tune evaluates)")
    p.add_argument("--expansion", default="1,1,3,1,1,1,1,1", help="the uniform tree to compare with")
    p.add_argument("--engine-check", action="store_true",
                   help="also judge each tree by serving the held-out prompts through the engine, the recorded "
                        "answers standing in for the LLM (boost/oracle.py; slow on a CPU for large trees)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--generation-batch-size", type=int, default=32, help="prompts the LLM answers at once")


@torch.no_grad()
def answer_ranks(ssm: nn.Module, examples: list[Example], max_rank: int = 64) -> list[np.ndarray]:
    """Per example: the rank of each answer token among the SSM's logits after the true prefix (0: its
    first choice; ties count in the token's favour), capped at `max_rank`."""
    ranks = []
    device = next(ssm.parameters()).device
    for example in tqdm(examples, desc="SSM ranks", unit="answer"):
        n = len(example.tokens) - example.answer_start
        if n < 1:
            ranks.append(np.zeros(0, dtype=np.int64))
            continue
        tokens, rows, targets, _ = answer_batch([example], [torch.ones(n)], len(example.tokens), device)
        logits = causal_logits(ssm.eval(), tokens, rows).float()
        target = logits.gather(-1, targets[:, None])
        ranks.append((logits > target).sum(-1).clamp(max=max_rank).cpu().numpy())
    return ranks


def judged_sample(held_out: list[str], size: int) -> tuple[list[str], list[str]]:
    """`size` held-out prompts spread over the whole list (its topics), and the rest."""
    stride = max(len(held_out) // max(size, 1), 1)
    judged = held_out[::stride][:size]
    chosen = set(judged)
    return judged, [p for p in held_out if p not in chosen]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    budgets = args.nodes or [20]
    if any(not 1 <= n <= MAX_TREE_NODES for n in budgets) or not 1 <= args.max_depth <= 32:
        raise SpecInferError(f"--nodes must lie in [1, {MAX_TREE_NODES}] and --max-depth in [1, 32]")
    expansion = parse_expansion(args.expansion)
    train_prompts, held_out_prompts = read_prompt_file(args.prompt_file) if args.prompt_file else build_prompts()
    judged, rest = judged_sample(held_out_prompts, args.max_held_out)
    fit_prompts = rest if args.fit_on == "held-out" else train_prompts
    if args.max_prompts:
        fit_prompts = fit_prompts[: args.max_prompts]
    if not fit_prompts:
        raise SpecInferError("no held-out prompt is left outside the judged sample to fit the tree to: lower "
                             "--max-held-out, give more prompts, or pass --fit-on train")
    llm = LLM(args.llm, ssms=args.ssms, tokenizer=args.tokenizer,
              engine=EngineConfig(max_batch_size=args.generation_batch_size,
                                  max_sequence_length=args.max_sequence_length, device=args.device, dtype=args.dtype),
              speculation=SpeculationConfig(adaptive=False))
    fitting = generate_examples(llm, fit_prompts, out / "data" / f"fit_{args.fit_on}.jsonl", args.max_new_tokens,
                              args.generation_batch_size)
    held_out = generate_examples(llm, judged, out / "data" / "held_out.jsonl", args.max_new_tokens,
                                 args.generation_batch_size)
    fitting_ranks = [answer_ranks(ssm, fitting) for ssm in llm.ssms]
    held_ranks = [answer_ranks(ssm, held_out) for ssm in llm.ssms]
    uniform = TreeShape.from_widths(expansion)
    shapes = [(f"expansion {args.expansion}", uniform)]
    # One growth serves every size: the first n paths are the n-node tree.
    grown = grow_tree(fitting_ranks, max(budgets), args.max_depth)
    shapes += [(f"fitted, {n} nodes", TreeShape.from_paths(grown[:n])) for n in budgets]
    rows = []
    for label, shape in shapes:
        served = None
        if args.engine_check:
            served = oracle_tokens_per_step(llm.model.config, llm.ssms, held_out, expansion, args.eval_new_tokens,
                                            tree=shape.paths[1:])
        rows.append((label, shape, tokens_per_step(shape, held_ranks, args.eval_new_tokens), served))
    out.mkdir(parents=True, exist_ok=True)
    ssm_names = args.ssms or ["the default draft"]
    fitted_on = f"{len(fitting)} greedy answers to {args.fit_on} prompts ({args.max_new_tokens} tokens at most)"
    for (_, shape, held, served), budget in zip(rows[1:], budgets):
        write_tree(out / ("tree.json" if len(budgets) == 1 else f"tree_{budget}.json"), grown[:budget], ssm_names,
                   fitted_on, held, served)
    lines = [f"SSMs: {', '.join(ssm_names)}. Fitted on {len(fitting)} answers to {args.fit_on} prompts; judged on "
             f"{len(held_out)} held-out answers ({args.eval_new_tokens} tokens each), greedy, replayed from the "
             "SSMs' ranks" + (" and served through the engine with the answers standing in for the LLM."
                              if args.engine_check else "."), "",
             "| tree | nodes per SSM | depth | tokens per LLM step, held out (replayed) |"
             + (" served |" if args.engine_check else ""),
             "|---|---:|---:|---:|" + ("---:|" if args.engine_check else "")]
    lines += [f"| {label} | {len(shape) - 1} | {shape.depth} | {held:.2f} |"
              + (f" {served:.2f} |" if served is not None else "") for label, shape, held, served in rows]
    write_answer_ranking(out / "draft_vocab.json", fitting,
                         f"token counts of the LLM's {len(fitting)} greedy answers to {args.fit_on} prompts")
    lines += ["", f"Draft vocabulary ranking (for `--draft-vocab-file`): {out / 'draft_vocab.json'}"]
    report = "\n".join(lines) + "\n"
    (out / "fit_tree.md").write_text(report)
    print(report)
    return 0
