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
