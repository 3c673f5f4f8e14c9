"""specinfer: exact tree-based speculative inference for LLM serving."""

from .config import EngineConfig, GenerationConfig, SpeculationConfig
from .errors import SpecInferError
from .llm import LLM, GenerationResult

__all__ = ["LLM", "GenerationResult", "GenerationConfig", "SpeculationConfig", "EngineConfig", "SpecInferError"]
__version__ = "0.1.0"
