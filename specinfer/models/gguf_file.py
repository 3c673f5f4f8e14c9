"""Read a LLaMA-architecture GGUF file into our config and Hugging Face-named fp32 tensors, and its
Q4_1 blocks as they are (for int4 layers that keep the file's own values, `read_q4_1_blocks`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import SpecInferError
from .config import ModelConfig

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def _open(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct/numpy errors, ... on a damaged file
        raise SpecInferError(f"{str(path)!r} is not a readable GGUF file: {err}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise SpecInferError(f"{str(path)!r}: GGUF architecture {arch!r} is not supported (supported: llama)")
    try:
        num_heads = _field(reader, "llama.attention.head_count")
        hidden = _field(reader, "llama.embedding_length")
        tokens = _field(reader, "tokenizer.ggml.tokens") or []
        return ModelConfig(
            family="llama",
            vocab_size=_field(reader, "llama.vocab_size") or len(tokens),
            hidden_size=hidden,
            intermediate_size=_field(reader, "llama.feed_forward_length"),
            num_layers=_field(reader, "llama.block_count"),
            num_heads=num_heads,
            num_kv_heads=_field(reader, "llama.attention.head_count_kv", num_heads),
            head_dim=_field(reader, "llama.rope.dimension_count") or hidden // num_heads,
            max_position_embeddings=_field(reader, "llama.context_length", 2048),
            tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
            rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=[_field(reader, "tokenizer.ggml.eos_token_id")],
        )
    except TypeError:
        raise SpecInferError(f"{str(path)!r}: GGUF header lacks LLaMA hyperparameters") from None


def read_gguf_config(path: Path) -> ModelConfig:
    """The file's `ModelConfig` alone (the reader maps the file; no tensor is read)."""
    return gguf_config(_open(path), path)


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from gguf.quants import dequantize

    reader = _open(path)
    cfg = gguf_config(reader, path)
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", leave=False):
        name = _hf_name(t.name)
        if name is None:
            continue
        shape = tuple(reversed([int(d) for d in t.shape]))  # GGUF lists dims fastest-first
        weight = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        weight = weight.reshape(shape)
        # llama.cpp stores q/k rows interleaved per rotary pair; undo to the half-split layout we use.
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, cfg.num_kv_heads)
        tensors[name] = weight
    return cfg, tensors


# Q4_1: blocks of 32 weights, each fp16 scale d, fp16 minimum m and 16 bytes of 4-bit values q
# (low nibbles are weights 0-15, high nibbles 16-31); weight = q * d + m.
Q4_1_BLOCK, Q4_1_BYTES = 32, 20


def read_q4_1_blocks(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per Q4_1 weight matrix (Hugging Face name): its 4-bit values [out, in] (uint8, 0..15), scales and
    minimums [out, in / 32] (fp32), rows in our layout. Other tensor types are not included."""
    from gguf import GGMLQuantizationType

    reader = _open(path)
    cfg = gguf_config(reader, path)
    blocks = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None or t.tensor_type != GGMLQuantizationType.Q4_1 or len(t.shape) != 2:
            continue
        rows, cols = int(t.shape[1]), int(t.shape[0])
        raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, cols // Q4_1_BLOCK, Q4_1_BYTES)
        scale = torch.from_numpy(raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        minimum = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        nibbles = torch.from_numpy(raw[..., 4:].copy())  # [rows, blocks, 16]
        q = torch.cat((nibbles & 0xF, nibbles >> 4), dim=-1).reshape(rows, cols)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads
            q, scale, minimum = (_unpermute(x, heads) for x in (q, scale, minimum))
        blocks[name] = (q.contiguous(), scale.contiguous(), minimum.contiguous())
    return blocks


def _hf_name(gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    return f"{_GLOBAL_NAMES[stem]}.{kind}" if stem in _GLOBAL_NAMES else None


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
