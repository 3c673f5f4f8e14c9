"""Instructions a weight in the batch-1 product kernel's loop, compiled for Hopper without a GPU.

    python benchmarks/kernel_sass.py [--kinds int8,int4,int4-pairs] [--group-size 64] [--k 16384] [--n 12288]
    python benchmarks/kernel_sass.py --attention   # tree attention's loops, as a batch-1 decode step runs it

At one row a product reads each weight once, so the kernel must retire its instructions as fast as the
memory delivers weights: on an H100 (3.0 TB/s, 132 multiprocessors at ~1.75 GHz, 4 schedulers each) that
is about 13 bytes a clock per multiprocessor, so int4's 26 weights a clock leave 128 / 26 = 4.9 issue
slots a weight at best, int8's 13 leave 9.8 and bf16's 6.5 leave 19.6 (an H200's faster memory leaves
about 3.7, 7.4 and 15). This compiles `layers/decode_gemv._decode_gemv_kernel` for sm_90 with Triton's
bundled `ptxas` (pointer arguments 16-byte aligned, as Triton specialises them at launch), disassembles
the cubin with the bundled `nvdisasm`, and counts the instructions of the main loop's body against the
weights one pass of it reads, for every strip shape the autotuner may choose (`strip_shapes`). Static
counts, not timings: a shape's count says whether it can keep up with memory, not that it does.
K is large by default so that every shape's loop runs (with few steps Triton peels or unrolls it). The
count assumes one pass of the loop per body: `ptxas` unrolls the half-precision kernel's smaller strips,
whose counts then come out several times too high (`--kinds half` shows them, the wider ones read true).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from specinfer.layers import decode_gemv

KINDS = {"half": decode_gemv.HALF, "int8": decode_gemv.INT8, "int4": decode_gemv.INT4,
         "int4-pairs": decode_gemv.INT4_PAIRS}


def compile_for_hopper(kernel, types: dict[str, str], constexprs: dict, warps: int, stages: int,
                       aligned: frozenset[str] = frozenset()):
    """`kernel` built for sm_90 as Triton specialises a launch: pointers (and the integers named in
    `aligned`) divisible by 16; arguments not in `types` or `constexprs` are i32."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in aligned}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def compile_kernel(kind: int, group: int, N: int, K: int, block_n: int, block_k: int, warps: int, split: int = 1,
                   residual: bool = False):
    types = dict(x_ptr="*bf16", w_ptr="*bf16" if kind == decode_gemv.HALF else "*i32",
                 scale_ptr="*fp32" if kind == decode_gemv.INT8 else "*fp16", min_ptr="*fp16", norm_ptr="*bf16",
                 res_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32", arrivals_ptr="*i32", eps="fp32")
    constexprs = dict(N=N, K=K, PROLOGUE=decode_gemv.NONE, WEIGHT=kind, GROUP=group, GATED=False,
                      HAS_RESIDUAL=residual, DEPENDENT=False, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split)
    return compile_for_hopper(decode_gemv._decode_gemv_kernel, types, constexprs, warps, stages=3)


def compile_attention(head_dim: int = 128, group: int = 1, warps: int = 4):
    """`layers/tree_attention._tree_attention_kernel` as a batch-1 decode step of bf16 launches it (rotary
    and cache write folded in, one query row, dependent launch), with the cache strides specialised as
    multiples of 16, as Triton does at launch (without, every cache read compiles to 2-byte loads)."""
    from specinfer.layers import tree_attention

    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", out_ptr="*bf16", part_out_ptr="*fp32",
                 part_max_ptr="*fp32", part_sum_ptr="*fp32", arrivals_ptr="*i32", slots_ptr="*i64",
                 prefix_ptr="*i32", mask_ptr="*i1", cos_ptr="*fp32", sin_ptr="*fp32", write_slots_ptr="*i64",
                 write_offsets_ptr="*i64", scale="fp32")
    constexprs = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=16, BLOCK_N=64 if head_dim <= 128 else 32,
                      MAX_SPLITS=tree_attention.MAX_SPLITS, PRECISION="tf32",
                      ROTATE=tree_attention.UNFUSED_ROTATION, DEPENDENT=True)
    aligned = frozenset({"stride_ks", "stride_kh", "stride_kl", "stride_vs", "stride_vh", "stride_vl"})
    return compile_for_hopper(tree_attention._tree_attention_kernel, types, constexprs, warps, stages=1,
                              aligned=aligned)


def loops(sass: str) -> list[list[str]]:
    """Every loop's instructions, from its label to the branch back to it, in program order."""
    lines, labels, found = sass.splitlines(), {}, []
    for i, line in enumerate(lines):
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = i
        branch = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", line)
        if branch and branch.group(1) in labels and labels[branch.group(1)] < i:
            found.append([re.match(r"\s*/\*[0-9a-f]+\*/\s*(.*?)\s*;", x).group(1)
                          for x in lines[labels[branch.group(1)]:i + 1] if re.match(r"\s*/\*[0-9a-f]{4,}\*/", x)])
    return found


def disassemble(compiled) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([tool, "-c", cubin.name], capture_output=True, text=True, check=True).stdout


def longest_loop(sass: str) -> list[str]:
    """The instructions of the longest loop."""
    return max(loops(sass), key=len, default=[])


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="int8,int4,int4-pairs")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--k", type=int, default=16384, help="input width (large, so that every shape loops)")
    p.add_argument("--n", type=int, default=12288)
    p.add_argument("--attention", action="store_true",
                   help="instead: each loop of tree attention's batch-1 decode variant (head dim 128), in order")
    args = p.parse_args()
    if args.attention:
        print("| loop | instructions a pass | most issued |")
        print("|---:|---:|---|")
        for i, body in enumerate(loops(disassemble(compile_attention()))):
            top = ", ".join(f"{op} {n}" for op, n in collections.Counter(map(opcode, body)).most_common(5))
            print(f"| {i} | {len(body)} | {top} |")
        return
    print("| kind | rows a strip | columns a step | warps | splits | instructions a weight | most issued |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in args.kinds.split(","):
        kind = KINDS[name]
        for block_n, block_k, warps, split in decode_gemv.strip_shapes(kind, args.group_size):
            compiled = compile_kernel(kind, args.group_size, args.n, args.k, block_n, block_k, warps, split,
                                      residual=split > 1)
            body = longest_loop(disassemble(compiled))
            per_weight = len(body) * 32 * warps / (block_n * block_k)
            top = ", ".join(f"{op} {n}" for op, n in collections.Counter(map(opcode, body)).most_common(4))
            print(f"| {name} | {block_n} | {block_k} | {warps} | {split} | {per_weight:.2f} | {top} |")


if __name__ == "__main__":
    main()
