"""Offloading: transformer blocks that do not fit the device budget live in (pinned) host memory and
stream to the device one block at a time, the next block's copy running on a side stream while the
current block computes.

Two device-side slots hold streamed blocks' weights (blocks of one model have the same shapes). Before
block i runs, the compute stream waits for its copy and the block's parameters are pointed at its slot;
right after block i has been launched, the copy of the next streamed block starts into the other slot,
once whatever used that slot last has finished. The KV cache, embeddings, LM head and resident blocks stay
on the device. On a CPU "device" the same code path runs with plain copies, which is how it is tested.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import SpecInferError

log = logging.getLogger(__name__)


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class LayerStreamer:
    def __init__(self, model: nn.Module, device: torch.device, num_resident: int) -> None:
        self.device = device
        self.blocks = list(model.layers)[num_resident:]
        if not self.blocks:
            raise SpecInferError("nothing to offload: every layer fits")
        cuda = device.type == "cuda"
        self.host = []  # per streamed block: its tensors in host memory, by name
        for block in self.blocks:
            tensors = {}
            for name, p in block.named_parameters():
                host = p.detach().to("cpu")
                tensors[name] = host.pin_memory() if cuda else host.clone()
                p.data = torch.empty(0, dtype=p.dtype, device=device)  # no device copy until streamed in
            self.host.append(tensors)
        self.slots = [
            {name: torch.empty_like(t, device=device) for name, t in self.host[0].items()} for _ in range(2)
        ]
        self.loaded: list[int | None] = [None, None]  # which streamed block each slot holds (or is receiving)
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else None for _ in self.blocks]
        self.released = [torch.cuda.Event() if cuda else None for _ in range(2)]
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(self._before(i))
            block.register_forward_hook(self._after(i))
        self._copy_in(0)

    @property
    def streamed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.host for t in tensors.values())

    def _copy_in(self, i: int) -> None:
        slot = self.slots[i % 2]
        self.loaded[i % 2] = i
        if self.copy_stream is None:
            for name, t in self.host[i].items():
                slot[name].copy_(t)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.released[i % 2])  # the slot's last user has finished
            for name, t in self.host[i].items():
                slot[name].copy_(t, non_blocking=True)
            self.ready[i].record(self.copy_stream)

    def _before(self, i: int):
        def hook(block: nn.Module, args):
            if self.loaded[i % 2] != i:  # a pass that skipped blocks (an early-exit draft): fetch it now
                self._copy_in(i)
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[i])
            slot = self.slots[i % 2]
            for name, p in block.named_parameters():
                p.data = slot[name]
        return hook

    def _after(self, i: int):
        def hook(block: nn.Module, args, output):
            if self.copy_stream is not None:
                self.released[i % 2].record(torch.cuda.current_stream(self.device))
            self._copy_in((i + 1) % len(self.blocks))  # the next block, or the first one of the next pass
        return hook


def offload(model: nn.Module, device: torch.device, weight_budget_bytes: int,
            pinned_budget_bytes: int | None = None) -> nn.Module:
    """Move `model` (loaded on the CPU) to `device`, keeping as many leading blocks resident as fit in
    `weight_budget_bytes` together with everything that is not a block and the two streaming slots; the
    rest stream from host memory. Returns the model, with `model.streamer` set (None if all fits)."""
    blocks = list(model.layers)
    per_block = _nbytes(blocks[0])
    others = _nbytes(model) - sum(_nbytes(b) for b in blocks)
    if others + len(blocks) * per_block <= weight_budget_bytes:
        model.streamer = None
        return model.to(device)
    num_resident = max((weight_budget_bytes - others - 2 * per_block) // per_block, 0)
    if others + 2 * per_block > weight_budget_bytes:
        raise SpecInferError(
            f"a device budget of {weight_budget_bytes / 2**30:.2f} GiB cannot hold the embeddings, LM head and "
            f"two streamed layers ({(others + 2 * per_block) / 2**30:.2f} GiB)"
        )
    streamed = (len(blocks) - num_resident) * per_block
    if pinned_budget_bytes is not None and streamed > pinned_budget_bytes:
        raise SpecInferError(
            f"{len(blocks) - num_resident} offloaded layers need {streamed / 2**30:.2f} GiB of pinned host memory, "
            f"but the budget is {pinned_budget_bytes / 2**30:.2f} GiB"
        )
    streamer = LayerStreamer(model, device, int(num_resident))  # takes the streamed blocks' weights first
    model.to(device)
    model.streamer = streamer
    log.info("offloading: %d of %d layers resident on %s, %d streamed from host memory (%.2f GiB)",
             num_resident, len(blocks), device, len(blocks) - num_resident, streamed / 2**30)
    return model
