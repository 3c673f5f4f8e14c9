"""Programmatic dependent launch (Hopper and later): the next kernel starts before this one has finished.

A batch-1 decode step is a chain of some two hundred kernels, each of which, by stream order, starts only
once the one before it has drained: its launch, its first loads' trip to memory and the last wave's tail
all sit between two products. With programmatic dependent launch a kernel tells the GPU early that the
next one may start (`gdc_launch_dependents`), the next one's programs are placed on the multiprocessors
as ours finish, and they read what does not depend on us (their weights) before `gdc_wait`, which
returns once the kernel before has completed and its writes are visible. Every kernel launched this
way must wait before it reads its inputs and before it writes anything, and must wait at all: a kernel
that never waited could finish before its predecessor, and the next kernel's wait would then not cover
that one.

Kernels take the choice as a constexpr (`dependent`) and are launched with `launch_pdl=True` by
`launch_options`; Triton's interpreter, CPUs and GPUs before Hopper launch them as usual. Inside a CUDA
graph the dependency is captured as a programmatic edge. `SPECINFER_DEPENDENT_LAUNCH=0` turns it off
(an A/B switch for benchmarks).
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton 3.4 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


def enabled(x: torch.Tensor) -> bool:
    """Whether kernels on `x`'s device are launched as dependents."""
    switched_on = os.environ.get("SPECINFER_DEPENDENT_LAUNCH", "1") != "0"
    return gdc_wait is not None and x.is_cuda and switched_on and _hopper_or_later(x.device)


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9 and os.environ.get("TRITON_INTERPRET") != "1"


def quantized_products() -> bool:
    """Whether int8 and int4 products are launched as dependents too (`SPECINFER_DEPENDENT_QUANTIZED=1`, an
    A/B switch: on the H200 in an older kernel they were slower that way, decode_gemv.decode_product)."""
    return os.environ.get("SPECINFER_DEPENDENT_QUANTIZED") == "1"


def launch_options(dependent: bool) -> dict:
    """Keyword arguments of a Triton launch: `launch_pdl` only where it is on (the interpreter has none)."""
    return {"launch_pdl": True} if dependent else {}
