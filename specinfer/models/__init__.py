"""Model families as plain `nn.Module`s: `forward(tokens, kv_cache, meta)` -> hidden states."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .llama import LlamaModel
from .opt import OPTModel

MODEL_CLASSES: dict[str, type[nn.Module]] = {"llama": LlamaModel, "opt": OPTModel}


def build_model(cfg: ModelConfig, tp=None) -> nn.Module:
    """`tp`: a `distributed.parallel.TensorParallel` for this rank's part of a split model (None: whole)."""
    return MODEL_CLASSES[cfg.family](cfg, tp)


__all__ = ["ModelConfig", "LlamaModel", "OPTModel", "build_model"]
