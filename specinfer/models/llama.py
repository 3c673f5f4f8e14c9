"""LLaMA family (Llama 2/3, SmolLM2 and kin): RMSNorm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import decode_gemv, rows_product, tree_attention
from ..layers.attention import AttentionMetadata, cached_attention, write_kv
from ..layers.decode_gemv import decode_product, foldable
from ..layers.rotary import RotaryEmbedding, apply_rotary
from ..layers.vocab_embedding import VocabEmbedding, vocab_logits, vocab_rows
from .config import ModelConfig
from .fuse import concat_linears


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, the residual stream's add first: (norm(x + residual), x + residual).
        Compiled, the add and the norm are one kernel."""
        if residual is not None:
            x = residual = x + residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = self.weight * x32.to(x.dtype)
        return normed if residual is None else (normed, residual)


class LlamaAttention(nn.Module):
    """Under tensor parallelism `cfg` holds this rank's heads; o_proj's partial sums are all-reduced."""

    def __init__(self, cfg: ModelConfig, tp=None) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one product (models/fuse.py)

    def fuse_projections(self) -> None:
        if self.qkv_proj is None:
            self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, H, T, D] and kv [B, T, 2, Hkv, D] (keys, then values: one cache write),
        rotary embedding applied. Queries and keys rotate together and values are copied beside them, in
        one fused kernel when compiled."""
        if self.qkv_proj is None:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        else:
            qkv = self.qkv_proj(x)
        return self.rotate(qkv, rope)

    def rotate(self, qkv: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """The q/k/v product's output [B, T, (H + 2 Hkv) D] -> q and kv as `project` returns them."""
        B, T, _ = qkv.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = qkv.view(B, T, H + 2 * Hkv, self.head_dim)
        cos, sin = rope
        qkv = torch.cat((apply_rotary(qkv[:, :, : H + Hkv], cos, sin), qkv[:, :, H + Hkv :]), dim=2)
        return qkv[:, :, :H].transpose(1, 2), qkv[:, :, H:].unflatten(2, (2, Hkv))

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """attended [B, H, T, D] -> [B, T, hidden]."""
        B, _, T, _ = attended.shape
        out = self.o_proj(attended.transpose(1, 2).reshape(B, T, -1))
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp=None) -> None:
        super().__init__()
        self.tp = tp
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one product (models/fuse.py)

    def fuse_projections(self) -> None:
        if self.gate_up_proj is None:
            self.gate_up_proj = concat_linears([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out = self.down_proj(F.silu(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, tp=None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, tp)

    def forward(self, x, residual, rope, cache_k, cache_v, meta: AttentionMetadata, cache_kv=None):
        """(x, residual) -> (x, residual): this block's output is x + residual. The sum is left to the next
        norm, which fuses it (the first block gets residual None)."""
        q, residual = self.pre_attention(x, residual, rope, cache_k, cache_v, meta, cache_kv)
        return self.post_attention(cached_attention(q, cache_k, cache_v, meta), residual)

    # The two halves around attention over the cache: what models/compile.py fuses.
    def pre_attention(self, x, residual, rope, cache_k, cache_v, meta: AttentionMetadata, cache_kv=None):
        """Queries [B, H, T, D] and the residual stream; the new keys and values go into the cache."""
        normed, residual = self.input_layernorm(x, residual) if residual is not None else (self.input_layernorm(x), x)
        q, kv = self.self_attn.project(normed, rope)
        write_kv(kv, cache_k, cache_v, meta, cache_kv)
        return q, residual

    def post_attention(self, attended: torch.Tensor, residual: torch.Tensor):
        normed, residual = self.post_attention_layernorm(self.self_attn.output(attended), residual)
        return self.mlp(normed), residual

    def decode(self, h, rope, cache_k, cache_v, meta: AttentionMetadata, cache_kv=None) -> torch.Tensor:
        """One token of one request through the block, each product with its norm, SwiGLU or residual add
        folded in (layers/decode_gemv.py): the residual stream h [1, 1, hidden] -> the stream after it."""
        attention, mlp = self.self_attn, self.mlp
        # Products may start reading their weights while the kernel before them finishes (dependent_launch.py,
        # half-precision weights): a folded model's weights are resident and constant (compile_blocks
        # refuses offloaded models).
        qkv = decode_product(h, attention.qkv_proj, norm=self.input_layernorm, dependent=True)
        if tree_attention.decode_supported(qkv, cache_k, meta.tree_mask):  # rotary, cache write, attention: one kernel
            attended = tree_attention.decode_attention(
                qkv, rope, attention.num_heads, cache_k, cache_v, meta.write_slots, meta.write_offsets,
                meta.read_slots, meta.prefix_lens, meta.tree_mask)
        else:
            q = self.rotate_and_store(qkv, rope, cache_k, cache_v, meta, cache_kv)
            attended = cached_attention(q, cache_k, cache_v, meta)  # [1, H, 1, D]: one row of H * D
        h = decode_product(attended.reshape(1, 1, -1), attention.o_proj, residual=h, dependent=True)
        activation = decode_product(h, mlp.gate_up_proj, norm=self.post_attention_layernorm, gated=True, dependent=True)
        return decode_product(activation, mlp.down_proj, residual=h, dependent=True)

    def rows(self, h, rope, cache_k, cache_v, meta: AttentionMetadata, cache_kv=None) -> torch.Tensor:
        """A few rows (a token tree, a drafting level, a small batch) through the block as `decode` takes one:
        each product with its norm, SwiGLU or residual add (layers/rows_product.py), six kernels in all.
        The residual stream h [B, T, hidden] -> the stream after the block."""
        attention, mlp = self.self_attn, self.mlp
        qkv = rows_product.rows_product(h, attention.qkv_proj, norm=self.input_layernorm)
        q = self.rotate_and_store(qkv, rope, cache_k, cache_v, meta, cache_kv)
        attended = cached_attention(q, cache_k, cache_v, meta)  # [B, H, T, D], read in place
        h = rows_product.rows_product(attended, attention.o_proj, residual=h, heads=True)
        activation = rows_product.rows_product(h, mlp.gate_up_proj, norm=self.post_attention_layernorm, gated=True)
        return rows_product.rows_product(activation, mlp.down_proj, residual=h)

    def rows_folded(self) -> bool:
        """Whether `rows` can serve this block: fused projections of plain (unquantized) weights."""
        attention, mlp = self.self_attn, self.mlp
        return attention.tp is None and attention.qkv_proj is not None and mlp.gate_up_proj is not None and all(
            rows_product.foldable(linear)
            for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj))

    def rotate_and_store(self, qkv, rope, cache_k, cache_v, meta: AttentionMetadata, cache_kv=None) -> torch.Tensor:
        """`decode`'s rotary embedding and cache write: queries [B, H, T, D] (one kernel when compiled)."""
        q, kv = self.self_attn.rotate(qkv, rope)
        write_kv(kv, cache_k, cache_v, meta, cache_kv)
        return q

    def decodes_folded(self) -> bool:
        """Whether `decode` can serve this block: fused projections, each a layer the kernels read."""
        attention, mlp = self.self_attn, self.mlp
        return attention.tp is None and attention.qkv_proj is not None and mlp.gate_up_proj is not None and all(
            foldable(linear) for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj))


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's `LlamaForCausalLM` minus the `model.` prefix. `tp`: this
    rank's part under tensor parallelism (specinfer/distributed), `cfg` then holding its share of heads."""

    def __init__(self, cfg: ModelConfig, tp=None) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaBlock(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_rows(cfg.vocab_size, tp), bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # One-token passes (batch-1 decoding) through `LlamaBlock.decode` where every block can take it;
        # models/compile.py turns it on.
        self.fold_decode = False
        # Passes of 2 to rows_product.MAX_ROWS tokens through `LlamaBlock.rows` (models/compile.py's
        # `fold_rows`; experimental until timed against the compiled halves on a GPU).
        self.fold_rows = False
        # Whether every block passes a LlamaBlock check ("decodes_folded", "rows_folded"), by check, once
        # first asked.
        self._every_block: dict[str, bool] = {}

    def forward(self, tokens: torch.Tensor, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, hidden]; keys/values go into `kv_cache`."""
        x, residual = self.embed_tokens(tokens), None
        rope = self.rotary(meta.positions)
        joint = getattr(kv_cache, "layers", None)  # keys and values of a layer in one tensor (KVCache)
        if self.fold_decode and tokens.numel() == 1 and self._folds("decodes_folded", x):
            for i, layer in enumerate(self.layers):
                x = layer.decode(x, rope, kv_cache.keys[i], kv_cache.values[i], meta, None if joint is None else joint[i])
            return self.norm(x)
        if self.fold_rows and 1 < tokens.numel() <= rows_product.MAX_ROWS and self._folds("rows_folded", x):
            for i, layer in enumerate(self.layers):
                x = layer.rows(x, rope, kv_cache.keys[i], kv_cache.values[i], meta, None if joint is None else joint[i])
            return self.norm(x)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, kv_cache.keys[i], kv_cache.values[i], meta,
                                None if joint is None else joint[i])
        return self.norm(x, residual)[0]

    def _folds(self, check: str, x: torch.Tensor) -> bool:
        """Whether every block passes `check` (asked once: the layers' kinds are settled by the time a pass
        runs, quantized and fused) and the folded kernels can run on x's device."""
        if check not in self._every_block:
            self._every_block[check] = all(getattr(layer, check)() for layer in self.layers)
        return self._every_block[check] and decode_gemv.available(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return vocab_logits(self.lm_head, hidden, self.config.vocab_size, self.tp)
