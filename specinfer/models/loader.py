"""Load weights from a local Hugging Face folder (config.json + safetensors or pytorch_model.bin) or a
GGUF file (dequantized with the `gguf` package). Nothing is ever downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..errors import SpecInferError
from . import build_model
from .config import ModelConfig
from .gguf_file import read_gguf, read_gguf_config

# Checkpoint prefixes that our modules do not have (ours are the decoder itself).
_PREFIXES = ("model.decoder.", "decoder.", "model.")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# config.json key of an SSM saved without embeddings and LM head: it uses those of the LLM it serves.
SHARED_EMBEDDINGS_KEY = "specinfer_shares_llm_embeddings"


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    shared_from: nn.Module | None = None,
    tp=None,
) -> nn.Module:
    """Build our model for the checkpoint at `path` and load its weights onto `device` in `dtype`.
    `shared_from`: the LLM, for an SSM saved without embeddings and LM head (they are then shared).
    `tp`: load only this tensor-parallel rank's slice of every weight (distributed/sharding.py)."""
    path = Path(path)
    if not path.exists():
        raise SpecInferError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise SpecInferError(f"{str(path)!r} is a file but not a .gguf; pass a GGUF file or a model folder")
        cfg, tensors = read_gguf(path)
    else:
        raw = read_hf_config_dict(path)
        cfg = ModelConfig.from_hf_dict(raw)
        tensors = read_hf_weights(path)
        if raw.get(SHARED_EMBEDDINGS_KEY):
            tensors.update(_shared_embeddings(cfg, shared_from, path))
    if tp is not None:
        from ..distributed.sharding import local_config, shard_tensors

        tensors = shard_tensors(cfg, {_strip_prefix(k): v for k, v in tensors.items()}, tp)
        cfg = local_config(cfg, tp)
    return instantiate(cfg, tensors, device, dtype, source=str(path), tp=tp)


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of the checkpoint at `path` (a folder or a GGUF file), weights unread."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf_config(path)
    return read_hf_config(path)


def read_hf_config_dict(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SpecInferError(f"{str(folder)!r} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise SpecInferError(f"{config_file} is not valid JSON: {err}") from None


def read_hf_config(folder: Path) -> ModelConfig:
    return ModelConfig.from_hf_dict(read_hf_config_dict(folder))


def _shared_embeddings(cfg: ModelConfig, llm: nn.Module | None, path: Path) -> dict[str, torch.Tensor]:
    if llm is None:
        raise SpecInferError(f"{str(path)!r} is an SSM that uses its LLM's embeddings; load it as an SSM of that LLM")
    if getattr(llm, "tp", None) is not None:
        raise SpecInferError(f"{str(path)!r} shares its LLM's embeddings, which tensor parallelism splits; "
                             "such SSMs do not yet run with --tensor-parallel-size > 1")
    shape = (cfg.vocab_size, cfg.hidden_size)
    if tuple(llm.embed_tokens.weight.shape) != shape:
        raise SpecInferError(
            f"{str(path)!r} needs its LLM's embeddings of shape {shape}, but this LLM's are "
            f"{tuple(llm.embed_tokens.weight.shape)}: it was trained for another LLM"
        )
    tensors = {"embed_tokens.weight": llm.embed_tokens.weight}
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = llm.lm_head.weight
    return tensors


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    try:
        if files:
            for f in tqdm(files, desc="loading safetensors", disable=len(files) < 2):
                tensors.update(load_file(f))
        else:
            files = sorted(folder.glob("pytorch_model*.bin"))
            if not files:
                raise SpecInferError(f"{str(folder)!r} has no *.safetensors or pytorch_model*.bin weight files")
            for f in tqdm(files, desc="loading pytorch_model.bin", disable=len(files) < 2):
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    except (SafetensorError, OSError, RuntimeError, EOFError) as err:
        raise SpecInferError(f"cannot read weights in {str(folder)!r}: {err}") from None
    return tensors


def instantiate(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype, source: str,
    tp=None,
) -> nn.Module:
    with torch.device("meta"):
        model = build_model(cfg, tp)
    expected = dict(model.state_dict())
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        key = _strip_prefix(name)
        if key not in expected:
            raise SpecInferError(f"{source}: unexpected weight {name!r} for a {cfg.family} model")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise SpecInferError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[key].shape)}"
            )
        state[key] = tensor.to(device=device, dtype=dtype)
    missing = set(expected) - set(state)
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise SpecInferError(f"{source}: missing weights {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
