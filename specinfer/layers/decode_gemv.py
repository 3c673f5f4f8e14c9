"""One-row matrix products with the block's elementwise work folded in: the batch-1 decode step (Triton).

At batch 1 a LLaMA block reads each weight once per token, and between its four products it runs small
kernels of its own: the residual add and RMSNorm before q/k/v and before gate/up, SwiGLU before down.
Inside a CUDA graph each costs its launch and a drain of the GPU (on an H200, a 7B step spent ~0.3 ms of
4.5 in them, `docs/benchmarks/scale_study.md`; a step of the 135M default model is mostly such gaps).
Here each product takes its input's elementwise work into its own loop over the input row, which every
program reads anyway:

- RMSNorm: sum_k w_nk (g_k x_k / rms(x)) = (sum_k w_nk g_k x_k) / rms(x), so each program accumulates
  the row's sum of squares beside its products and scales its outputs at the end (no pass before);
- SwiGLU, in the gate/up product's epilogue: each program takes the gate and the up rows of the same
  units (interleaved in its strip) and writes silu(gate) * up, so that the down product reads a plain
  row (formed as down reads it, every program of down would compute the whole row's sigmoids: two
  ops a column on the quarter-rate multi-function unit, which bound the down product);
- the residual add that ends a half of the block: out = residual + product, in the products' epilogue.

A block is then four products, the rotary/cache-write kernel and attention. Each program streams a strip
of BLOCK_N output rows of the weight once and reduces along K (a `tl.dot` tile would pad the row to 16
and spend its registers on an accumulator it mostly wastes); with nothing folded in, the same kernel
serves quantized layers' one-row products elsewhere (quant/linear.py). Values round as the unfused block rounds them where it can (the product's output in
the activation dtype before the residual add, the SwiGLU output); the normalised row stays in fp32, so
results differ from the unfused block's by rounding only.

Weights are half precision, int8 with a per-row scale, or int4 in groups (quant/linear.py). Packed
weights are read as 32-bit words and widened with integer masks, not int-to-float conversions, which
Hopper issues at 16 a clock per SM (an eighth of its fp32 rate): at int4's two values a byte that rate,
not memory, would bound the step. A field v < 2^23 or'ed into the mantissa of 2^23 reads as the float
2^23 + v, so `(word & mask) | 0x4B000000` minus 2^23 is the field exactly; a field left in place (nibble
i still times 16^i) is undone by scaling its input by 16^-i, an exact power of two, so most fields need
no shift either. int4 groups apply their scale and minimum once per group:
    sum_k w_k x_k = scale_g * sum_k q_k x_k + minimum_g * sum_k x_k,
with scale and minimum read in fp16 (`QuantizedLinear.half_groups`: 4 bytes a group against the 64 bytes
of a 128-wide group's weights; fp32 would take 8).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..quant.linear import QuantizedLinear
from . import dependent_launch

try:
    import triton
    import triton.language as tl

    from .dependent_launch import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: the unfused block serves every step
    triton = None

NONE, RMSNORM = 0, 1  # what is folded in before the product
HALF, INT8, INT4, INT4_PAIRS = 0, 1, 2, 3  # how the weight is stored (INT4_PAIRS: int4 computed in bf16 pairs)


def available(x: torch.Tensor) -> bool:
    """Whether these kernels can run on `x`'s device (Triton's CPU interpreter counts, for tests)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def foldable(linear: nn.Module) -> bool:
    """A layer these kernels read: a plain linear layer, or an int8 or int4 one (quant/linear.py), without
    bias, its input width a whole number of 32-bit words of packed weights (int4: groups as wide as a word
    at least, their scale and minimum exact in fp16)."""
    if isinstance(linear, QuantizedLinear):
        if linear.mode == "int8":
            return linear.bias is None and linear.in_features % 4 == 0
        return (linear.bias is None and linear.group_size % 8 == 0 and linear.in_features % linear.group_size == 0
                and linear.half_groups() is not None)
    return isinstance(linear, nn.Linear) and linear.bias is None


def decode_product(x: torch.Tensor, linear: nn.Module, norm: nn.Module | None = None, gated: bool = False,
                   residual: torch.Tensor | None = None, dependent: bool = False,
                   strip: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """`linear` applied to one row `x` (any shape holding one row, [..., K]) after `norm` (an RMSNorm with
    `weight` and `eps`), plus `residual` if given: a row of `linear.out_features` in x's shape. `gated`:
    linear's rows are [gate; up] (a fused gate/up projection) and the row returned is silu(gate) * up,
    half as long. `dependent`: launched as a dependent of the kernel before
    (dependent_launch.py), which reads the first weights before that kernel has finished; only for
    weights that no kernel writes while a step runs (not offloaded layers). `strip`: one of
    `strip_shapes` in place of the autotuner's choice (tests of every choice).

    A product may split the row's columns among several programs per strip (`SPLIT_K`): a 4096-row
    layer has too few strips to keep the GPU's memory busy once a strip is wide enough to share the
    row's work, and a wider one's strips may fill the multiprocessors unevenly. The splits' sums (and,
    with a norm folded in, their shares of the row's sum of squares) meet in a per-layer buffer, and
    the last split to arrive adds them up in split order (the same sum on every run) and finishes the
    strip."""
    group = 1
    if isinstance(linear, QuantizedLinear) and linear.mode == "int8":
        kind, weight, scale, minimum = INT8, linear.qweight.view(torch.int32), linear.scale, None
    elif isinstance(linear, QuantizedLinear):
        (scale, minimum), group = linear.half_groups(), linear.group_size
        kind, weight = INT4, linear.qweight.view(torch.int32)
        if x.is_cuda and os.environ.get("SPECINFER_INT4_PAIRS") == "1":  # experimental: see _word_in_pairs
            kind = INT4_PAIRS
    else:
        kind, weight, scale, minimum = HALF, linear.weight, None, None
    N, K = linear.out_features, linear.in_features
    row = x.reshape(-1)
    if row.shape[0] != K:
        raise ValueError(f"decode_product takes one row of {K} values, got {tuple(x.shape)}")
    if gated and (N % 2 or residual is not None):
        raise ValueError("a gated product needs as many gate rows as up rows, and no residual")
    width = N // 2 if gated else N
    out = torch.empty(width, dtype=x.dtype, device=x.device)
    unread = out  # a placeholder for the pointers a variant does not read
    partials, arrivals = _split_buffers(linear, x.device, norm is not None)
    args = (row.contiguous(), weight, unread if scale is None else scale, unread if minimum is None else minimum,
            unread if norm is None else norm.weight, unread if residual is None else residual.reshape(-1), out,
            partials, arrivals, N, float(norm.eps) if norm is not None else 0.0, K,
            RMSNORM if norm is not None else NONE, kind, group, gated, residual is not None)
    if strip is not None:
        block_n, block_k, warps, split = strip
        if not _split_fits(K, block_k, split) or (split > 1 and block_n < MIN_SPLIT_ROWS):
            raise ValueError(f"strip {strip} cannot split this product")
        _decode_gemv_kernel[(triton.cdiv(N, block_n), split)](*args, False, BLOCK_N=block_n, BLOCK_K=block_k,
                                                               SPLIT_K=split, num_warps=warps, num_stages=3)
    elif os.environ.get("TRITON_INTERPRET") == "1":
        block_k = max(64, group)
        split = 2 if _split_fits(K, block_k, 2) else 1  # the split path too
        _decode_gemv_kernel[(triton.cdiv(N, 16), split)](*args, False, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=split)
    else:
        # Dependent launches only where they paid (H200, 7B-shaped, in flight: bf16 4.01 -> 3.91 ms, while
        # int8 went 2.84 -> 2.93 and int4 2.83 -> 2.95: their kernels are bound by instructions, probably
        # short of what the next kernel's early, waiting programs take), and inside CUDA graphs: eager
        # calls, the autotuner's timings among them (first use, before any capture), launch serially.
        dependent = (dependent and (kind == HALF or dependent_launch.quantized_products()) and dependent_launch.enabled(x)
                     and torch.cuda.is_current_stream_capturing())
        _tuned(kind, group)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])](
            *args, dependent, **dependent_launch.launch_options(dependent))
    return out.view(*x.shape[:-1], width)


if triton is not None:

    @triton.jit
    def _row_input(x_ptr, norm_ptr, kk, k_ok, K: tl.constexpr, PROLOGUE: tl.constexpr, act: tl.constexpr,
                   MASK_K: tl.constexpr):
        """The product's input at columns kk in fp32, after the prologue, and the raw row's squares."""
        if MASK_K:
            raw = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        else:
            raw = tl.load(x_ptr + kk).to(tl.float32)
        x = raw
        if PROLOGUE == 1:  # RMSNorm: the gain now, 1 / rms(x) once the whole row has been seen
            if MASK_K:
                x = raw * tl.load(norm_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            else:
                x = raw * tl.load(norm_ptr + kk).to(tl.float32)
        return x, raw * raw

    @triton.jit
    def _field(words, SHIFT: tl.constexpr, BITS: tl.constexpr, IN_PLACE: tl.constexpr, OFFSET: tl.constexpr):
        """The BITS-bit field of 32-bit `words` at bit SHIFT as fp32, minus OFFSET, times 2^SHIFT when IN_PLACE
        (no shift then: the field must stay under 2^23), through the mantissa of 2^23 (see the module's note).
        2^23 + OFFSET is one exact constant: one subtraction a weight."""
        mask: tl.constexpr = (1 << BITS) - 1
        if IN_PLACE:
            bits = (words & (mask << SHIFT)) | 0x4B000000
        elif SHIFT + BITS == 32:
            bits = (words >> SHIFT) | 0x4B000000
        else:
            bits = ((words >> SHIFT) & mask) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)

    @triton.jit
    def _bf16_pair(low, high):
        """Two bf16 vectors as pairs in 32-bit words (low in the low half)."""
        return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [low, high], dtype=tl.uint32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _input_pair(x_ptr, norm_ptr, p, p_ok, I: tl.constexpr, K: tl.constexpr, PROLOGUE: tl.constexpr,
                    act: tl.constexpr, MASKED: tl.constexpr):
        """The inputs at columns 8p + I and 8p + I + 4 (nibbles I and I + 4 of word p) as a bf16 pair x, the
        pair c = bf16(-136 x) that `_word_in_pairs` adds to (128 + q) x, the sum of c + 128 x over the two
        (what a product carries beyond q x: -8 x and c's rounding, exact in fp32, taken off per group), and
        the inputs' squares' and values' sums."""
        low, low_sq = _row_input(x_ptr, norm_ptr, 8 * p + I, p_ok, K, PROLOGUE, act, MASKED)
        high, high_sq = _row_input(x_ptr, norm_ptr, 8 * p + I + 4, p_ok, K, PROLOGUE, act, MASKED)
        low_x, high_x = low.to(tl.bfloat16).to(tl.float32), high.to(tl.bfloat16).to(tl.float32)
        low_c, high_c = (low_x * -136.0).to(tl.bfloat16), (high_x * -136.0).to(tl.bfloat16)
        carried = (low_c.to(tl.float32) + 128.0 * low_x) + (high_c.to(tl.float32) + 128.0 * high_x)
        return (_bf16_pair(low_x.to(tl.bfloat16), high_x.to(tl.bfloat16)), _bf16_pair(low_c, high_c), carried,
                low_sq + high_sq, low + high)

    @triton.jit
    def _word_in_pairs(words, x04, x15, x26, x37, c04, c15, c26, c37):
        """sum_i q_i x_i over the eight nibbles of each 32-bit word, two at a time in bf16 pairs: nibbles i
        and i + 4 (bits 4i and 16 + 4i) OR-ed into the mantissas of a pair of 128.0 read as 128 + q, and
        one fused multiply-add a pair, (128 + q) x + c with c = bf16(-136 x): (q - 8) x plus c's rounding,
        rounded once (the caller takes c + 128 x off per group, `_input_pair`); the four pair products summed
        in bf16 and the pair's halves in fp32. 18 instructions a word, 2.25 a weight, against 4.5 for the
        fp32 path (benchmarks/kernel_sass.py); bf16 has fp32's range, so no input overflows. The price is
        rounding: a 4096-wide product of normal weights quantized in groups of 64, emulated in float64
        (benchmarks/int4_pairs_rounding.py), is 2.9e-3 off in relative norm before the output's own
        rounding (about 1e-6 for the fp32 path; 7.8e-3 with c = -128 x, whose products q x in [0, 15 x]
        are large against a group's sum with its minimum, where (q - 8) x is centred). Experimental
        (`SPECINFER_INT4_PAIRS=1`): whether speculation over it stays within the rounding bounds of
        incremental decoding is untested."""
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 t, p, a, b;
            .reg .b16 l, h;
            .reg .f32 fl, fh;
            lop3.b32 p, $1, 0x000F000F, 0x43004300, 0xEA;
            fma.rn.bf16x2 a, p, $2, $6;
            shr.u32 t, $1, 4;
            lop3.b32 p, t, 0x000F000F, 0x43004300, 0xEA;
            fma.rn.bf16x2 b, p, $3, $7;
            add.rn.bf16x2 a, a, b;
            shr.u32 t, $1, 8;
            lop3.b32 p, t, 0x000F000F, 0x43004300, 0xEA;
            fma.rn.bf16x2 b, p, $4, $8;
            add.rn.bf16x2 a, a, b;
            shr.u32 t, $1, 12;
            lop3.b32 p, t, 0x000F000F, 0x43004300, 0xEA;
            fma.rn.bf16x2 b, p, $5, $9;
            add.rn.bf16x2 a, a, b;
            mov.b32 {l, h}, a;
            cvt.f32.bf16 fl, l;
            cvt.f32.bf16 fh, h;
            add.f32 $0, fl, fh;
            }""",
            "=f,r,r,r,r,r,r,r,r,r", [words, x04, x15, x26, x37, c04, c15, c26, c37], dtype=tl.float32,
            is_pure=True, pack=1)

    @triton.jit
    def _strip_tile(w_ptr, cols, col_ok, k, K: tl.constexpr, WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr,
                    MASK_N: tl.constexpr):
        """The strip's weights for columns k .. k + BLOCK_K: half-precision values, or the 32-bit words
        that hold them packed (int8: four a word, int4: eight). Masked only where the shape needs it: a
        mask the compiler cannot prove true splits each 16-byte load into predicated 4-byte ones."""
        PER_WORD: tl.constexpr = 1 if WEIGHT == 0 else (4 if WEIGHT == 1 else 8)
        WIDTH: tl.constexpr = BLOCK_K // PER_WORD  # elements (half) or words a row of the tile
        p = tl.max_contiguous(tl.multiple_of(k // PER_WORD + tl.arange(0, WIDTH), WIDTH), WIDTH)
        pointers = w_ptr + cols[:, None] * (K // PER_WORD) + p[None, :]
        if K % BLOCK_K != 0:
            tile = tl.load(pointers, mask=col_ok[:, None] & (p < K // PER_WORD)[None, :], other=0)
        elif MASK_N:
            tile = tl.load(pointers, mask=col_ok[:, None], other=0)
        else:
            tile = tl.load(pointers)
        return tile if WEIGHT == 0 else tile.to(tl.uint32, bitcast=True)

    @triton.jit
    def _accumulate(acc, squares, tile, k, x_ptr, scale_ptr, min_ptr, norm_ptr, cols, col_ok, K: tl.constexpr,
                    PROLOGUE: tl.constexpr, WEIGHT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, act: tl.constexpr):
        """Fold the strip's tile for columns k .. k + BLOCK_K into its sums (and the row's squares)."""
        if WEIGHT == 0:
            kk = k + tl.arange(0, BLOCK_K)
            x, sq = _row_input(x_ptr, norm_ptr, kk, kk < K, K, PROLOGUE, act, K % BLOCK_K != 0)
            squares += sq
            acc += tile.to(tl.float32) * x[None, :]
        elif WEIGHT == 1:
            p = k // 4 + tl.arange(0, BLOCK_K // 4)
            p_ok = p < K // 4
            words = tile ^ 0x80808080  # q + 128 in each byte
            for j in tl.static_range(4):
                x, sq = _row_input(x_ptr, norm_ptr, 4 * p + j, p_ok, K, PROLOGUE, act, K % BLOCK_K != 0)
                squares += sq
                if j < 2:  # bytes 0 and 1 stay in place: (q + 128) * 256^j
                    v = _field(words, 8 * j, 8, True, 128.0 * (1 << (8 * j)))
                    acc += v * (x * (1.0 / (1 << (8 * j))))[None, :]
                else:
                    acc += _field(words, 8 * j, 8, False, 128.0) * x[None, :]
        else:
            WORDS: tl.constexpr = BLOCK_K // 8
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            num_groups: tl.constexpr = K // GROUP
            p = k // 8 + tl.arange(0, WORDS)
            p_ok = p < K // 8
            qx = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            x_sum = tl.zeros((WORDS,), dtype=tl.float32)
            carried = tl.zeros((WORDS,), dtype=tl.float32)  # INT4_PAIRS: beyond q x in the products
            if WEIGHT == 3:  # INT4_PAIRS: a word's eight products in bf16 pairs (_word_in_pairs)
                MASKED: tl.constexpr = K % BLOCK_K != 0
                x04, c04, d, sq, xs = _input_pair(x_ptr, norm_ptr, p, p_ok, 0, K, PROLOGUE, act, MASKED)
                squares, x_sum, carried = squares + sq, x_sum + xs, carried + d
                x15, c15, d, sq, xs = _input_pair(x_ptr, norm_ptr, p, p_ok, 1, K, PROLOGUE, act, MASKED)
                squares, x_sum, carried = squares + sq, x_sum + xs, carried + d
                x26, c26, d, sq, xs = _input_pair(x_ptr, norm_ptr, p, p_ok, 2, K, PROLOGUE, act, MASKED)
                squares, x_sum, carried = squares + sq, x_sum + xs, carried + d
                x37, c37, d, sq, xs = _input_pair(x_ptr, norm_ptr, p, p_ok, 3, K, PROLOGUE, act, MASKED)
                squares, x_sum, carried = squares + sq, x_sum + xs, carried + d
                qx = _word_in_pairs(tile, x04[None, :], x15[None, :], x26[None, :], x37[None, :],
                                    c04[None, :], c15[None, :], c26[None, :], c37[None, :])
            else:
                for i in tl.static_range(8):
                    x, sq = _row_input(x_ptr, norm_ptr, 8 * p + i, p_ok, K, PROLOGUE, act, K % BLOCK_K != 0)
                    squares += sq
                    x_sum += x
                    if i < 5:  # nibbles 0-4 stay in place: q * 16^i, under 2^23
                        qx += _field(tile, 4 * i, 4, True, 0.0) * (x * (1.0 / (1 << (4 * i))))[None, :]
                    else:
                        qx += _field(tile, 4 * i, 4, False, 0.0) * x[None, :]
            g = k // GROUP + tl.arange(0, GROUPS)
            g_ok = col_ok[:, None] & (g < num_groups)[None, :]
            scale = tl.load(scale_ptr + cols[:, None] * num_groups + g[None, :], mask=g_ok, other=0.0)
            minimum = tl.load(min_ptr + cols[:, None] * num_groups + g[None, :], mask=g_ok, other=0.0)
            per_group = tl.sum(tl.reshape(qx, (BLOCK_N, GROUPS, WORDS // GROUPS)), axis=2)
            group_sum = tl.sum(tl.reshape(x_sum, (GROUPS, WORDS // GROUPS)), axis=1)
            if WEIGHT == 3:
                per_group -= tl.sum(tl.reshape(carried, (GROUPS, WORDS // GROUPS)), axis=1)[None, :]
            acc += per_group * scale.to(tl.float32) + minimum.to(tl.float32) * group_sum[None, :]
        return acc, squares

    @triton.jit
    def _decode_gemv_kernel(x_ptr, w_ptr, scale_ptr, min_ptr, norm_ptr, res_ptr, out_ptr, part_ptr, arrivals_ptr,
                            N: tl.constexpr, eps, K: tl.constexpr,
                            PROLOGUE: tl.constexpr, WEIGHT: tl.constexpr, GROUP: tl.constexpr, GATED: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr, DEPENDENT: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        # w: [N, K] half precision; or int8 [N, K] with a per-row fp32 scale, read as int32 [N, K / 4];
        # or int4 [N, K / 2] bytes read as int32 [N, K / 8] (nibble i of a word is column 8p + i), with fp16
        # scale and minimum [N, K / GROUP]. K is a compile-time constant: a model has a few widths, and
        # masks on the last block then fold away where BLOCK_K divides it.
        pid = tl.program_id(0)
        strip = tl.arange(0, BLOCK_N)
        if GATED:  # a strip of BLOCK_N / 2 units: gate row u at 2i, up row N / 2 + u at 2i + 1
            units = pid * (BLOCK_N // 2) + strip // 2
            cols = units + (strip % 2) * (N // 2)
            col_ok = units < N // 2
            MASK_N: tl.constexpr = (N // 2) % (BLOCK_N // 2) != 0
        else:
            cols = pid * BLOCK_N + strip
            col_ok = cols < N
            MASK_N: tl.constexpr = N % BLOCK_N != 0
        act = out_ptr.dtype.element_ty
        if WEIGHT == 0:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        elif WEIGHT == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
            squares = tl.zeros((BLOCK_K // 4,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
            squares = tl.zeros((BLOCK_K // 8,), dtype=tl.float32)
        # This program's columns: all of them, or split `split`'s share of whole steps (none is empty:
        # _split_fits).
        STEPS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
        CHUNK: tl.constexpr = (STEPS + SPLIT_K - 1) // SPLIT_K
        split = tl.program_id(1)
        k_lo = split * (CHUNK * BLOCK_K)
        if SPLIT_K > 1:
            k_hi = tl.minimum(k_lo + CHUNK * BLOCK_K, K)
        else:
            k_hi = K
        # The first tile of weights is read before waiting on the kernel before (dependent_launch.py):
        # weights are no kernel's output, and their first trip to memory then overlaps its tail.
        tile = _strip_tile(w_ptr, cols, col_ok, k_lo, K, WEIGHT, BLOCK_K, MASK_N)
        if DEPENDENT:
            gdc_launch_dependents()
            gdc_wait()
        acc, squares = _accumulate(acc, squares, tile, k_lo, x_ptr, scale_ptr, min_ptr, norm_ptr, cols, col_ok, K,
                                   PROLOGUE, WEIGHT, GROUP, BLOCK_N, BLOCK_K, act)
        for k in range(k_lo + BLOCK_K, k_hi, BLOCK_K):  # a for loop, so that Triton pipelines the loads
            tile = _strip_tile(w_ptr, cols, col_ok, k, K, WEIGHT, BLOCK_K, MASK_N)
            acc, squares = _accumulate(acc, squares, tile, k, x_ptr, scale_ptr, min_ptr, norm_ptr, cols, col_ok, K,
                                       PROLOGUE, WEIGHT, GROUP, BLOCK_N, BLOCK_K, act)
        out = tl.sum(acc, axis=1)
        if SPLIT_K == 1:
            _finish(out, cols, col_ok, pid, scale_ptr, res_ptr, out_ptr, tl.sum(squares, axis=0), eps, N, K,
                    PROLOGUE, WEIGHT, GATED, HAS_RESIDUAL, BLOCK_N)
        else:
            # Each split's sums into the layer's buffer (with a norm, its share of the row's squares after
            # them: SPLIT_K * N sums, then one a split and strip); the barrier orders every thread's writes
            # before the count (released at GPU scope), and the last arrival's acquire then sees every split's.
            squares_ptr = part_ptr + SPLIT_K * N + pid
            strips = tl.num_programs(0)
            tl.store(part_ptr + split * N + cols, out, mask=col_ok)
            if PROLOGUE == 1:
                tl.store(squares_ptr + split * strips, tl.sum(squares, axis=0))
            tl.debug_barrier()
            if tl.atomic_add(arrivals_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
                tl.store(arrivals_ptr + pid, 0)  # ready for the layer's next call
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                sum_squares = 0.0
                for s in tl.static_range(SPLIT_K):  # in split order, whichever split arrived last
                    total += tl.load(part_ptr + s * N + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
                    if PROLOGUE == 1:
                        sum_squares += tl.load(squares_ptr + s * strips, cache_modifier=".cg")
                _finish(total, cols, col_ok, pid, scale_ptr, res_ptr, out_ptr, sum_squares, eps, N, K, PROLOGUE,
                        WEIGHT, GATED, HAS_RESIDUAL, BLOCK_N)

    @triton.jit
    def _finish(out, cols, col_ok, pid, scale_ptr, res_ptr, out_ptr, sum_squares, eps, N: tl.constexpr,
                K: tl.constexpr, PROLOGUE: tl.constexpr, WEIGHT: tl.constexpr, GATED: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
        """The strip's epilogue on its rows' sums (and the input row's sum of squares): int8's row scale,
        the norm's 1 / rms, SwiGLU or the residual add, and the store."""
        act = out_ptr.dtype.element_ty
        if WEIGHT == 1:
            out = out * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        if PROLOGUE == 1:
            out = out / tl.sqrt(sum_squares / K + eps)
        if GATED:  # gate and up round to the activation dtype first, as the unfused block stores them
            gate, up = tl.split(tl.reshape(out.to(act).to(tl.float32), (BLOCK_N // 2, 2)))
            units = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(out_ptr + units, (gate * tl.sigmoid(gate) * up).to(act), mask=units < N // 2)
        else:
            if HAS_RESIDUAL:  # the product rounds to the activation dtype first, as a separate add would see it
                out = out.to(act).to(tl.float32) + tl.load(res_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + cols, out.to(act), mask=col_ok)


_TUNED: dict[tuple[int, int], object] = {}
MAX_SPLIT_K = 8
MIN_SPLIT_ROWS = 16  # the narrowest strip that splits (strip_shapes): bounds the squares' slots


def strip_shapes(kind: int, group: int) -> list[tuple[int, int, int, int]]:
    """The autotuner's choices for one weight kind: (rows a strip, columns a step, warps, splits).

    The packed kinds' instructions a weight (the loop's `sass`, sm_90) fall as one thread holds more
    rows of its columns, since the input row's work (loads, nibble scales, sums) is shared by the rows
    a thread holds: int4 group 64, 6.8 at 16 x 512 on 4 warps against 4.5 at 64 x 512 on 2; int8 4.6
    and 4.1. Wide strips leave a 4096-row layer few programs (64 strips of 64 rows for 132
    multiprocessors), and a wider layer's strips may fill them unevenly (192 strips of a 12288-row q/k/v
    product: two on some multiprocessors, one on others): there the row's columns may split among
    programs, and narrow unsplit strips stay in the set. Splits were timed on an H100 for o and down
    (int4 block 1.75x -> 1.96x bf16's speed, quant_kernels_h100_bf16_split.md); for the products with a
    norm folded in (q/k/v, gate/up) they are the autotuner's to take or leave."""
    if kind == HALF:
        shapes = [(n, k, w) for n in (4, 8, 16) for k in (128, 256, 512) for w in (4, 8)] + [(32, 256, 2), (32, 512, 4)]
        split = [(16, 256, 4, 2), (16, 512, 4, 4), (32, 256, 2, 4)]
    elif kind == INT8:
        shapes = [(64, 256, 2), (64, 256, 1), (32, 512, 2), (32, 256, 1), (16, 1024, 2), (16, 512, 1), (16, 512, 4),
                  (8, 1024, 4), (8, 512, 1), (4, 1024, 4)]
        split = [(64, 256, 2, 4), (32, 512, 2, 4), (32, 256, 1, 4), (16, 512, 1, 4), (64, 256, 1, 8)]
    else:
        shapes = [(64, 512, 2), (64, 256, 1), (32, 512, 1), (32, 1024, 2), (32, 512, 4), (16, 1024, 1), (16, 512, 2),
                  (16, 512, 4), (8, 512, 1), (8, 1024, 2)]
        split = [(64, 256, 1, 4), (64, 512, 2, 4), (32, 256, 1, 4), (32, 512, 2, 4), (64, 256, 1, 8), (32, 256, 1, 8)]
    assert all(n >= MIN_SPLIT_ROWS for n, *_ in split)
    shapes = [(n, k, w, 1) for n, k, w in shapes] + split
    if kind in (INT4, INT4_PAIRS):  # whole groups a step
        shapes = [shape for shape in shapes if shape[1] % group == 0] or [(16, group, 4, 1)]
    return shapes


def _split_fits(K: int, block_k: int, splits: int) -> bool:
    """Whether K's columns split into `splits` shares of whole unmasked steps, none of them empty."""
    steps = K // block_k
    return splits == 1 or (K % block_k == 0 and (splits - 1) * -(-steps // splits) < steps)


def _split_buffers(linear: nn.Module, device: torch.device, normed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own fp32 buffer for its splits' sums (`normed`: and their shares of the row's squares,
    one a split and strip; split strips hold MIN_SPLIT_ROWS rows at least) and its zeroed arrival counts (one per strip),
    made on its first call (eager, before any graph captures it): a layer's products run one after
    another, so no two launches share them while either runs."""
    N = linear.out_features
    size = MAX_SPLIT_K * (N + (N // MIN_SPLIT_ROWS + 1 if normed else 0))
    buffers = getattr(linear, "_decode_split_buffers", None)
    if buffers is None or buffers[0].device != device or buffers[0].numel() < size:
        buffers = (torch.empty(size, device=device, dtype=torch.float32),
                   torch.zeros(N, device=device, dtype=torch.int32))
        linear._decode_split_buffers = buffers
    return buffers


def _prune(configs, named_args, **kwargs):
    """The autotuner's choices this product can take: splits only of whole steps (see _split_fits)."""
    fitting = [c for c in configs if _split_fits(named_args["K"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"])]
    return fitting or [c for c in configs if c.kwargs["SPLIT_K"] == 1]


def _tuned(kind: int, group: int):
    """The kernel autotuned per shape and variant, for one weight kind and group size (built on first use;
    each shape and variant compiles its configs once, and Triton caches them on disk after)."""
    if (kind, group) not in _TUNED:
        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split}, num_warps=w, num_stages=3)
                   for n, k, w, split in strip_shapes(kind, group)]
        if os.environ.get("SPECINFER_QUICK_AUTOTUNE") == "1":  # tests: the first and last choices (a split one
            # where the product can split)
            configs = [configs[0], configs[-1]]
        _TUNED[kind, group] = triton.autotune(
            configs=configs, key=["N", "K", "PROLOGUE", "GATED", "HAS_RESIDUAL"],
            prune_configs_by={"early_config_prune": _prune})(_decode_gemv_kernel)
    return _TUNED[kind, group]
