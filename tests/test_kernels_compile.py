"""The GPU kernels compile for Hopper (sm_90) on a machine without a GPU: Triton's front end and the
bundled `ptxas` need no driver, so a kernel that would fail to build on the GPU fails here first.
What the kernels compute is tested in the interpreter (CPU) and on the GPU (`gpu` marker)."""

from __future__ import annotations

import importlib.util
import inspect

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def compile_for_hopper(kernel, pointer_types: dict[str, str], constexprs: dict):
    """`kernel` built for sm_90 with every argument not named in `pointer_types` or `constexprs` an i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = inspect.signature(kernel.fn).parameters
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


@pytest.mark.parametrize("rotate", [True, False], ids=["decode", "tree"])
@pytest.mark.parametrize("dependent", [True, False], ids=["dependent", "serial"])
def test_tree_attention_compiles_for_hopper(rotate, dependent):
    from specinfer.layers import tree_attention

    half, fp32, index = "*bf16", "*fp32", "*i64"
    types = dict(q_ptr=half, k_ptr=half, v_ptr=half, out_ptr=half, part_out_ptr=fp32, part_max_ptr=fp32,
                 part_sum_ptr=fp32, arrivals_ptr="*i32", slots_ptr=index, prefix_ptr=index, mask_ptr="*i1",
                 cos_ptr=fp32, sin_ptr=fp32, write_slots_ptr=index, write_offsets_ptr=index, scale="fp32")
    constexprs = dict(GROUP=1, HEAD_DIM=128, BLOCK_M=16, BLOCK_N=64, MAX_SPLITS=tree_attention.MAX_SPLITS,
                      PRECISION="tf32", ROTATE=tree_attention.UNFUSED_ROTATION if rotate else 0, DEPENDENT=dependent)
    ptx = compile_for_hopper(tree_attention._tree_attention_kernel, types, constexprs).asm["ptx"]
    # The splits' combination: one arrival per program, released and acquired at GPU scope, and the
    # partials read past the multiprocessor's own cache.
    assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx
    assert ("griddepcontrol.wait" in ptx) == dependent
    # The decode variant's rotary products rounded one by one (no multiply-add, no flush to zero), as
    # PyTorch's are.
    assert ("mul.rn.f32 a" in ptx) == rotate


@pytest.mark.parametrize("weight", ["half", "int8", "int4", "int4-pairs"])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("form", ["residual", "norm", "norm+swiglu"])
def test_decode_product_compiles_for_hopper(weight, split, form):
    """The batch-1 product kernel (layers/decode_gemv.py) in its o/down form (a residual add), its q/k/v
    form (a norm) and its gate/up form (a norm and SwiGLU), unsplit and with the row's columns split among
    programs: the splits meet through one GPU-scope arrival count a strip, and the last reads the others'
    sums (and shares of the row's squares) past its multiprocessor's cache."""
    from specinfer.layers import decode_gemv

    kind = {"half": decode_gemv.HALF, "int8": decode_gemv.INT8, "int4": decode_gemv.INT4,
            "int4-pairs": decode_gemv.INT4_PAIRS}[weight]
    half = "*bf16"
    types = dict(x_ptr=half, w_ptr=half if weight == "half" else "*i32", scale_ptr="*fp32" if weight == "int8" else "*fp16",
                 min_ptr="*fp16", norm_ptr=half, res_ptr=half, out_ptr=half, part_ptr="*fp32", arrivals_ptr="*i32",
                 eps="fp32")
    constexprs = dict(N=4096, K=4096, PROLOGUE=decode_gemv.NONE if form == "residual" else decode_gemv.RMSNORM,
                      WEIGHT=kind, GROUP=64, GATED=form == "norm+swiglu", HAS_RESIDUAL=form == "residual",
                      DEPENDENT=False, BLOCK_N=32, BLOCK_K=256, SPLIT_K=split)
    ptx = compile_for_hopper(decode_gemv._decode_gemv_kernel, types, constexprs).asm["ptx"]
    assert ("atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx) == (split > 1)
    assert ("fma.rn.bf16x2" in ptx) == (weight == "int4-pairs")  # two products an instruction


@pytest.mark.parametrize("variant", ["norm", "gated", "residual"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_rows_product_compiles_for_hopper(variant, dtype):
    """The few-rows product kernel (layers/rows_product.py) in its three forms: its tiles go through the
    tensor cores (wgmma on sm_90, or mma), fp32 layers in fp32 rather than tf32."""
    from specinfer.layers import rows_product

    act = f"*{dtype}"
    types = dict(x_ptr=act, w_ptr=act, norm_ptr=act, res_ptr=act, out_ptr=act, eps="fp32")
    constexprs = dict(N=1152, K=576, D=64 if variant == "residual" else 576, NORM=variant != "residual", GATED=variant == "gated",
                      HAS_RESIDUAL=variant == "residual", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    ptx = compile_for_hopper(rows_product._rows_product_kernel, types, constexprs).asm["ptx"]
    if dtype == "bf16":
        assert "wgmma" in ptx or "mma.sync" in ptx
    else:
        assert "tf32" not in ptx
