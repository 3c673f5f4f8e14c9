"""Which slice of each weight a tensor-parallel rank holds, cut from the full checkpoint on load.

Column-parallel (output rows split): q/k/v projections by head, gate/up (LLaMA) and fc1 (OPT) by hidden
unit. Row-parallel (input columns split): o_proj/out_proj and down_proj/fc2; their bias is kept on rank
0 only, so the all-reduce adds it once. Embedding and LM head: rows split by vocabulary, padded to a
multiple of the ranks. With fewer KV heads than ranks (GQA), each rank keeps the one KV head its query
heads read, so KV heads are replicated rather than split.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import SpecInferError
from ..layers.vocab_embedding import vocab_rows
from ..models.config import ModelConfig
from .parallel import TensorParallel

_QUERY = ("q_proj.weight", "q_proj.bias")
_KEY_VALUE = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")
_ATTENTION_OUT = ("o_proj.weight", "out_proj.weight")
_MLP_IN = ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias", "fc1.weight", "fc1.bias")
_MLP_OUT = ("down_proj.weight", "fc2.weight")
_ROW_PARALLEL_BIAS = ("o_proj.bias", "out_proj.bias", "down_proj.bias", "fc2.bias")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    heads: tuple[int, int]  # this rank's query heads [start, end)
    kv_heads: tuple[int, int]
    hidden_units: tuple[int, int]  # of the MLP
    vocab: tuple[int, int]  # rows of the padded vocabulary


def _plan(cfg: ModelConfig, tp: TensorParallel) -> _Plan:
    H, Hkv, N = cfg.num_heads, cfg.num_kv_heads, tp.size
    if H % N:
        raise SpecInferError(f"{H} attention heads cannot be split over tensor-parallel size {N}")
    heads = tp.shard(H)
    if Hkv >= N:
        kv_heads = tp.shard(Hkv)
    elif N % Hkv == 0:  # each rank's query heads share one KV head: keep (replicate) that one
        group = H // Hkv
        kv_heads = (heads[0] // group, heads[0] // group + 1)
    else:
        raise SpecInferError(f"{Hkv} KV heads cannot serve tensor-parallel size {N}: use a size that divides "
                             f"or is divided by {Hkv}")
    rows = vocab_rows(cfg.vocab_size, tp)
    return _Plan(heads, kv_heads, tp.shard(cfg.intermediate_size), (tp.rank * rows, (tp.rank + 1) * rows))


def local_config(cfg: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The config of one rank's part: its share of heads and MLP units (vocabulary stays the full one)."""
    plan = _plan(cfg, tp)
    return dataclasses.replace(
        cfg, num_heads=plan.heads[1] - plan.heads[0], num_kv_heads=plan.kv_heads[1] - plan.kv_heads[0],
        intermediate_size=plan.hidden_units[1] - plan.hidden_units[0],
    )


def shard_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], tp: TensorParallel) -> dict[str, torch.Tensor]:
    """This rank's slice of every weight of the full checkpoint `tensors`."""
    plan = _plan(cfg, tp)
    D = cfg.head_dim
    out = {}
    for name, t in tensors.items():
        if name.endswith(_QUERY):
            t = t[plan.heads[0] * D : plan.heads[1] * D]
        elif name.endswith(_KEY_VALUE):
            t = t[plan.kv_heads[0] * D : plan.kv_heads[1] * D]
        elif name.endswith(_ATTENTION_OUT):
            t = t[:, plan.heads[0] * D : plan.heads[1] * D]
        elif name.endswith(_MLP_IN):
            t = t[plan.hidden_units[0] : plan.hidden_units[1]]
        elif name.endswith(_MLP_OUT):
            t = t[:, plan.hidden_units[0] : plan.hidden_units[1]]
        elif name.endswith(_ROW_PARALLEL_BIAS):
            t = t if tp.is_first else torch.zeros_like(t)
        elif name.endswith(_VOCAB):
            padded = torch.zeros(plan.vocab[1] - plan.vocab[0], t.shape[1], dtype=t.dtype)
            part = t[plan.vocab[0] : plan.vocab[1]]
            padded[: part.shape[0]] = part
            t = padded
        out[name] = t.contiguous()
    return out
