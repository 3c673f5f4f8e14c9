"""OPT family: learned positions (offset 2), LayerNorm before or after each block, ReLU MLP,
optional `project_in`/`project_out` when the embedding width differs from the hidden size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecInferError
from ..layers.attention import AttentionMetadata, cached_attention, write_kv
from ..layers.vocab_embedding import VocabEmbedding, vocab_logits, vocab_rows
from .config import ModelConfig
from .fuse import concat_linears

# OPT's learned position table reserves its first two rows (a fairseq padding convention).
POSITION_OFFSET = 2
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class OPTAttention(nn.Module):
    """Under tensor parallelism `cfg` holds this rank's heads; out_proj's partial sums are all-reduced."""

    def __init__(self, cfg: ModelConfig, tp=None) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        h, width, bias = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.enable_bias
        self.q_proj = nn.Linear(h, width, bias=bias)
        self.k_proj = nn.Linear(h, width, bias=bias)
        self.v_proj = nn.Linear(h, width, bias=bias)
        self.out_proj = nn.Linear(width, h, bias=bias)
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one product (models/fuse.py)

    def fuse_projections(self) -> None:
        if self.qkv_proj is None:
            self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, H, T, D] and kv [B, T, 2, H, D] (keys, then values: one cache write)."""
        B, T, _ = x.shape
        if self.qkv_proj is None:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        else:
            qkv = self.qkv_proj(x)
        qkv = qkv.view(B, T, 3, self.num_heads, self.head_dim)
        return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1:]

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """attended [B, H, T, D] -> [B, T, hidden]."""
        B, _, T, _ = attended.shape
        out = self.out_proj(attended.transpose(1, 2).reshape(B, T, -1))
        return out if self.tp is None else self.tp.all_reduce(out)


class OPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, tp=None) -> None:
        super().__init__()
        self.tp = tp
        h, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, tp)
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, elementwise_affine=affine)
        self.fc1 = nn.Linear(h, cfg.intermediate_size, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, h, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, elementwise_affine=affine)
        if cfg.activation not in ACTIVATIONS:
            raise SpecInferError(f"unsupported OPT activation {cfg.activation!r}")
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x, cache_k, cache_v, meta: AttentionMetadata, cache_kv=None) -> torch.Tensor:
        q = self.pre_attention(x, cache_k, cache_v, meta, cache_kv)
        return self.post_attention(x, cached_attention(q, cache_k, cache_v, meta))

    # The two halves around attention over the cache: what models/compile.py fuses.
    def pre_attention(self, x: torch.Tensor, cache_k, cache_v, meta: AttentionMetadata, cache_kv=None):
        """Queries [B, H, T, D]; the new keys and values go into the cache."""
        q, kv = self.self_attn.project(self.self_attn_layer_norm(x) if self.pre_norm else x)
        write_kv(kv, cache_k, cache_v, meta, cache_kv)
        return q

    def post_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.output(attended)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        mlp = self.fc2(self.act(self.fc1(h)))
        x = x + (mlp if self.tp is None else self.tp.all_reduce(mlp))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTModel(nn.Module):
    """Parameter names follow Hugging Face's `OPTForCausalLM` minus the `model.decoder.` prefix."""

    def __init__(self, cfg: ModelConfig, tp=None) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        embed_dim = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, embed_dim, tp)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        needs_projection = embed_dim != cfg.hidden_size
        self.project_in = nn.Linear(embed_dim, cfg.hidden_size, bias=False) if needs_projection else None
        self.project_out = nn.Linear(cfg.hidden_size, embed_dim, bias=False) if needs_projection else None
        # The 350m checkpoint (post-norm) has no final LayerNorm.
        self.final_layer_norm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=cfg.layer_norm_elementwise_affine)
            if cfg.do_layer_norm_before
            else None
        )
        self.layers = nn.ModuleList(OPTBlock(cfg, tp) for _ in range(cfg.num_layers))
        self.lm_head = nn.Linear(embed_dim, vocab_rows(cfg.vocab_size, tp), bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(meta.positions + POSITION_OFFSET)
        joint = getattr(kv_cache, "layers", None)  # keys and values of a layer in one tensor (KVCache)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache.keys[i], kv_cache.values[i], meta, None if joint is None else joint[i])
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return vocab_logits(self.lm_head, hidden, self.config.vocab_size, self.tp)
