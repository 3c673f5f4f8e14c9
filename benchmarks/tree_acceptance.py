"""Tokens per LLM step of draft trees on recorded held-out answers: expansion configs against fitted trees,
for one SSM and for several side by side.

    python benchmarks/tree_acceptance.py --answers runs/fit/data/held_out.jsonl --ssm tuned:1 --ssm tuned:2 \
        --expansions "1,1,3,1,1,1,1,1;4,2,2,2,1,1,1,1" --trees "tree_20.json;tree_256.json" [--device cuda]

Each answer is served alone through the engine (greedy, the drafters and verification as in serving) with
the recorded answer standing in for the LLM (specinfer/boost/oracle.py), so no LLM pass runs and large
trees are cheap to judge; `fit-tree` (or boost-tune) writes the answers. Every SSM set is judged alone
and, with several SSMs, merged. Writes JSON and Markdown to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from specinfer import LLM, EngineConfig, SpeculationConfig
from specinfer.boost.data import read_examples
from specinfer.boost.oracle import oracle_tokens_per_step
from specinfer.config import parse_expansion
from specinfer.spec.tree import TreeShape
from specinfer.spec.tree_fit import load_tree_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="LLM path (default: the default model)")
    p.add_argument("--ssm", action="append", help="SSMs, repeatable (default: tuned:1 and tuned:2)")
    p.add_argument("--untrained", help="an SSM judged alone for comparison, e.g. self:3 (the tuned SSMs' start)")
    p.add_argument("--answers", required=True, help="recorded greedy answers (JSON lines, as fit-tree writes)")
    p.add_argument("--expansions", default="1,1,3,1,1,1,1,1;2,2,1;4,2,2,2,1,1,1,1")
    p.add_argument("--trees", default="", help="semicolon-separated fitted tree files")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer tokens each request generates")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()

    ssm_names = args.ssm or ["tuned:1", "tuned:2"]
    loaded = ssm_names + ([args.untrained] if args.untrained else [])
    llm = LLM(args.llm, loaded, engine=EngineConfig(max_batch_size=1, device=args.device, dtype=args.dtype),
              speculation=SpeculationConfig(adaptive=False))
    answers = read_examples(Path(args.answers))
    shapes = [(f"expansion {e}", TreeShape.from_widths(parse_expansion(e))) for e in args.expansions.split(";") if e]
    shapes += [(f"fitted {Path(f).stem}", TreeShape.from_paths(load_tree_file(f))) for f in args.trees.split(";") if f]
    groups = [([k], name) for k, name in enumerate(loaded)]
    if len(ssm_names) > 1:
        groups.append((list(range(len(ssm_names))), "merged"))  # the untrained one stays out
    rows = []
    for label, shape in shapes:
        row = {"tree": label, "nodes": len(shape) - 1, "depth": shape.depth}
        for members, name in groups:
            row[name] = oracle_tokens_per_step(llm.model.config, [llm.ssms[k] for k in members], answers, (1,),
                                               args.max_new_tokens, tree=shape.paths[1:])
        rows.append(row)
        print(row, flush=True)

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    meta = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "dtype": str(llm.model.embed_tokens.weight.dtype).removeprefix("torch."), "ssms": loaded,
            "answers": f"{len(answers)} from {args.answers}", "max_new_tokens": args.max_new_tokens}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    (out / f"tree_acceptance_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    names = [name for _, name in groups]
    lines = [
        f"# Draft trees: tokens per LLM step on held-out answers ({tag.upper()})", "",
        f"{meta['date']} · {device} · torch {meta['torch']} · {meta['dtype']} · SSMs {', '.join(loaded)} · "
        f"{meta['answers']}, {args.max_new_tokens} tokens each, greedy, served with the answers standing in "
        "for the LLM", "",
        f"Reproduce: `python benchmarks/tree_acceptance.py --answers {args.answers} "
        + " ".join(f"--ssm {s}" for s in ssm_names) + (f" --untrained {args.untrained}" if args.untrained else "")
        + f" --expansions \"{args.expansions}\"" + (f" --trees \"{args.trees}\"" if args.trees else "")
        + (f" --device {args.device}" if tag == "gpu" else "") + "`", "",
        "| tree | nodes per SSM | depth | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    lines += [f"| {r['tree']} | {r['nodes']} | {r['depth']} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |"
              for r in rows]
    (out / f"tree_acceptance_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
