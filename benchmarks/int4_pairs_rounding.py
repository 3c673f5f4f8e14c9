"""The rounding of the experimental int4 bf16-pair kernel (layers/decode_gemv.py, `_word_in_pairs`,
`SPECINFER_INT4_PAIRS=1`), emulated in float64 on the CPU: no GPU needed.

    python benchmarks/int4_pairs_rounding.py [--k 4096] [--group-size 64]

Normal weights quantized to int4 in groups (fp16 scale and minimum, as QuantizedLinear stores them), one bf16
input row. Each 32-bit word's nibbles i and i + 4 are multiplied as a bf16 pair: one fused multiply-add
(128 + q) x + c, rounded once to bf16, and the word's four pair products summed in bf16, its two halves in
fp32. With c = -128 x the products are q x, q in [0, 15]; with c = bf16(-136 x) they are (q - 8) x plus c's
rounding, which the kernel takes off per group (`_input_pair`'s `carried`). Prints each variant's relative
error (Frobenius norm over the output rows) against the float64 product of the dequantized weights, before
the output's own rounding to bf16.
"""

from __future__ import annotations

import argparse

import torch


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


def pair_sums(q: torch.Tensor, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per word [N, K / 8]: the bf16 pair arithmetic over its eight nibbles (the kernel's inline PTX)."""
    words, xs, cs = q.view(q.shape[0], -1, 8), x.view(-1, 8), c.view(-1, 8)
    low = high = None
    for i in range(4):
        new_low = bf16((128 + words[:, :, i]) * xs[:, i] + cs[:, i])  # fma.rn.bf16x2: exact, then one rounding
        new_high = bf16((128 + words[:, :, i + 4]) * xs[:, i + 4] + cs[:, i + 4])
        low, high = (new_low, new_high) if low is None else (bf16(low + new_low), bf16(high + new_high))
    return (low.float() + high.float()).double()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4096, help="input width")
    p.add_argument("--n", type=int, default=256, help="output rows")
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    k, n, g = args.k, args.n, args.group_size
    w = torch.randn(n, k, dtype=torch.float64).view(n, k // g, g) * 0.02
    low, high = w.min(-1).values, w.max(-1).values
    scale = ((high - low) / 15).to(torch.float16).double()
    minimum = low.to(torch.float16).double()
    q = ((w - minimum[..., None]) / scale[..., None]).round().clamp(0, 15).view(n, k)
    x = bf16(torch.randn(k, dtype=torch.float64))
    reference = (q.view(n, k // g, g) * scale[..., None] + minimum[..., None]).view(n, k) @ x
    group_sum = x.view(k // g, g).sum(-1)

    def finish(words: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        """Per group: (pair sums - what c carries beyond -128 x) * scale + minimum * sum x."""
        per_group = words.view(n, k // g, g // 8).sum(-1) - carried.view(k // g, g).sum(-1)
        return (per_group * scale + minimum * group_sum).sum(-1)

    def error(out: torch.Tensor) -> float:
        return float((out - reference).norm() / reference.norm())

    plain = finish(pair_sums(q, x, -128 * x), torch.zeros_like(x))
    c = bf16(-136 * x)
    centred = finish(pair_sums(q, x, c), c + 128 * x)
    print(f"k {k}, group {g}: relative error, c = -128 x (products q x): {error(plain):.2e}; "
          f"c = bf16(-136 x) (products (q - 8) x, the kernel's): {error(centred):.2e}")


if __name__ == "__main__":
    main()
