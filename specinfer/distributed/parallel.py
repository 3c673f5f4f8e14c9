"""Tensor parallelism over `torch.distributed`: NCCL between GPUs, gloo between CPU processes.

Megatron-style: attention heads and the MLP's hidden units are split across ranks, column-wise into a
layer and row-wise out of it, with one all-reduce after each attention and each MLP; the embedding and
LM head are split by vocabulary. Every rank ends a forward pass with the same full logits, so every rank
runs the same scheduler, SSMs, trees and verification and reaches the same decisions with no further
communication (sampling draws from generators seeded alike on every rank), except for the one decision
made from wall-clock time: the adaptive controller times each step as its slowest rank
(`max_over_ranks`), so that every rank speculates for the same requests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SpecInferError


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def max_over_ranks(self, value: float) -> float:
        """The largest of every rank's `value` (a host number; NCCL needs it on this rank's GPU)."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        x = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return float(x.item())

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def shard(self, total: int) -> tuple[int, int]:
        """This rank's [start, end) of `total` units split evenly (`total` must divide)."""
        if total % self.size:
            raise SpecInferError(f"{total} cannot be split evenly over tensor-parallel size {self.size}")
        per_rank = total // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def from_environment(size: int, device: str) -> tuple[TensorParallel | None, str]:
    """Join the process group that torchrun (or `spawn`) set up through RANK/WORLD_SIZE/MASTER_ADDR, and
    pick this rank's device; returns (None, device) for a single process."""
    if size == 1:
        return None, device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise SpecInferError(
            f"tensor-parallel size {size} needs {size} processes, found WORLD_SIZE={world}: launch with "
            f"`torchrun --nproc-per-node {size} -m specinfer ...` or pass --tensor-parallel-size to the CLI"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if device.startswith("cuda"):
        if torch.cuda.device_count() < size and "LOCAL_WORLD_SIZE" in os.environ and int(
                os.environ["LOCAL_WORLD_SIZE"]) > torch.cuda.device_count():
            raise SpecInferError(f"{os.environ['LOCAL_WORLD_SIZE']} ranks on this host but only "
                                 f"{torch.cuda.device_count()} GPUs")
        device = f"cuda:{local_rank % max(torch.cuda.device_count(), 1)}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return TensorParallel(dist.get_rank(), dist.get_world_size()), device
