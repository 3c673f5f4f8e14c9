"""Plain steps of the speculative engine against the incremental engine's, on a random SmolLM2-shaped
model (RANDOM weights: only the costs mean anything).

    python benchmarks/plain_step_overhead.py --device cuda --compile

The adaptive controller falls back to plain steps where no tree pays; then speculation should cost
nothing. Here every tree is made to look hopeless (the controller's cost ratios fixed at 100), so the
tree engine runs plain steps only, and runs alternate incremental, tree, incremental, tree at each batch
size. Prints the median step time of each run (`RequestManager.step_log`): the difference is the
speculative engine's overhead on a plain step.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig  # noqa: E402
from tests.conftest import save_random_llama  # noqa: E402
from tests.test_cli import write_byte_level_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--layers", type=int, default=30, help="LLM layers (SmolLM2-135M has 30)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--max-new-tokens", type=int, default=100)
    args = p.parse_args()
    folder = pathlib.Path(tempfile.mkdtemp())
    save_random_llama(folder, num_hidden_layers=args.layers, hidden_size=576, intermediate_size=1536,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=1024,
                      initializer_range=0.02)
    write_byte_level_tokenizer(folder)
    batches = [int(b) for b in args.batches.split(",")]
    engine = EngineConfig(max_batch_size=max(batches), max_sequence_length=256, device=args.device, compile=args.compile)
    llm = LLM(str(folder), [f"self:{min(3, args.layers - 1)}"], engine=engine, speculation=SpeculationConfig(expansion=(1, 1, 1, 1)))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    for batch in batches:
        prompts = [f"prompt number {i} says" for i in range(batch)]
        medians: dict[str, list[float]] = {}
        for mode in ("incremental", "tree", "incremental", "tree"):
            manager = llm.manager_for(mode)
            if manager.controller is not None:
                manager.controller.fixed_cost_ratio = 100.0
            llm.generate(prompts, config, mode=mode)  # warm-up: graphs, compiled shapes
            manager.step_log = []
            llm.generate(prompts, config, mode=mode)
            assert all(size == 0 for _, size, _, _ in manager.step_log), "the tree engine drafted"
            medians.setdefault(mode, []).append(1e6 * statistics.median(s for _, _, s, _ in manager.step_log))
            manager.step_log = None
        print(f"batch {batch}: median plain step, us: " + "; ".join(
            f"{mode} {', '.join(f'{m:.0f}' for m in ms)}" for mode, ms in medians.items()), flush=True)
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
