"""Model hyperparameters, read from a Hugging Face `config.json` (or a GGUF header)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SpecInferError

SUPPORTED_FAMILIES = ("llama", "opt")


@dataclass(slots=True)
class ModelConfig:
    family: str  # "llama" or "opt"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    # LLaMA
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    # OPT
    layer_norm_eps: float = 1e-5
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise SpecInferError(
                f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise SpecInferError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` for a LLaMA-family model (what `boost-tune` saves SSMs as)."""
        if self.family != "llama":
            raise SpecInferError("only LLaMA-family models can be saved")
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "hidden_act": self.activation,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids or None,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from the fields of a Hugging Face `config.json`."""
        model_type = hf.get("model_type")
        try:
            if model_type in ("llama", "mistral"):
                return cls._from_llama(hf)
            if model_type == "opt":
                return cls._from_opt(hf)
        except KeyError as missing:
            raise SpecInferError(f"config.json lacks the field {missing} that a {model_type} model needs") from None
        raise SpecInferError(
            f"unsupported model_type {model_type!r} in config.json; supported: llama (and LLaMA-architecture "
            "models such as SmolLM2), opt"
        )

    @classmethod
    def _from_llama(cls, hf: dict[str, Any]) -> "ModelConfig":
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        # transformers >= 5 keeps theta and scaling together in `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if hf.get("sliding_window") and hf.get("model_type") == "mistral":
            raise SpecInferError("sliding-window attention (Mistral) is not supported")
        return cls(
            family="llama",
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            activation=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_list(hf.get("eos_token_id")),
        )

    @classmethod
    def _from_opt(cls, hf: dict[str, Any]) -> "ModelConfig":
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        return cls(
            family="opt",
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["ffn_dim"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=hidden // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
            do_layer_norm_before=hf.get("do_layer_norm_before", True),
            enable_bias=hf.get("enable_bias", True),
            layer_norm_elementwise_affine=hf.get("layer_norm_elementwise_affine", True),
            activation=hf.get("activation_function", "relu"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_list(hf.get("eos_token_id")),
        )


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
