"""A free draft model: the LLM's own first layers, final norm and LM head (weights shared, no copy).

It needs no download or training and always shares the LLM's vocabulary; boost-tuned SSMs do better.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import SpecInferError
from . import build_model


def early_exit_draft(llm: nn.Module, num_layers: int) -> nn.Module:
    total = llm.config.num_layers
    if not 1 <= num_layers < total:
        raise SpecInferError(f"an early-exit draft needs 1 to {total - 1} of the LLM's {total} layers, got {num_layers}")
    cfg = dataclasses.replace(llm.config, num_layers=num_layers)
    with torch.device("meta"):
        draft = build_model(cfg, getattr(llm, "tp", None))
    for name, child in llm.named_children():
        setattr(draft, name, nn.ModuleList(list(child)[:num_layers]) if name == "layers" else child)
    return draft.eval()
