"""specinfer: exact tree-based speculative inference for LLM serving."""

from .config import EngineConfig, GenerationConfig, SpeculationConfig
from .errors import SpecInferError
from .llm import LLM, GenerationResult
from .spec.tree_fit import load_tree_file

__all__ = ["LLM", "GenerationResult", "GenerationConfig", "SpeculationConfig", "EngineConfig", "SpecInferError",
           "load_tree_file"]
__version__ = "0.1.0"
