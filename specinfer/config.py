"""The few knobs of the engine, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecInferError

MODES = ("tree", "sequence", "incremental")
DEFAULT_EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)


@dataclass(slots=True)
class GenerationConfig:
    """How tokens are chosen. `do_sample=False` is greedy; otherwise temperature, then top-k, then top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int = 0
    max_new_tokens: int | None = None  # None: until EOS or the request's max sequence length

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise SpecInferError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpecInferError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpecInferError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise SpecInferError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(slots=True)
class SpeculationConfig:
    """`tree`: every SSM expands `expansion` (children per depth) and the trees merge; `sequence`: the first
    SSM speculates a chain as deep as `expansion`; `incremental`: no speculation. `adaptive` lets a request
    sit out speculation while its draft does not pay; outputs are the same either way."""

    mode: str = "tree"
    expansion: tuple[int, ...] = DEFAULT_EXPANSION
    # Speculate for a request only while its draft is measured to pay (engine/speculation_controller.py).
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecInferError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.expansion = tuple(self.expansion)
        if not self.expansion or any(not isinstance(w, int) or w < 1 for w in self.expansion):
            raise SpecInferError(f"expansion must be one or more positive integers, got {self.expansion}")
        if len(self.expansion) > 32 or max(self.expansion) > 16:
            raise SpecInferError(f"expansion {self.expansion} is too large (at most 32 levels of at most 16 children)")

    @property
    def draft_widths(self) -> tuple[int, ...]:
        if self.mode == "incremental":
            return ()
        if self.mode == "sequence":
            return (1,) * len(self.expansion)
        return self.expansion

    @property
    def max_tree_nodes(self) -> int:
        """Upper bound on tree nodes per SSM, root included."""
        total, level = 1, 1
        for width in self.draft_widths:
            level *= width
            total += level
        return total


def parse_expansion(text: str) -> tuple[int, ...]:
    """'1,1,3,1' -> (1, 1, 3, 1), with a clear error for anything else."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SpecInferError(f"expansion must be comma-separated positive integers like 1,1,3,1, got {text!r}") from None
    return SpeculationConfig(expansion=widths).expansion


@dataclass(slots=True)
class EngineConfig:
    max_batch_size: int = 8
    max_sequence_length: int = 1024  # prompt + generated tokens, per request
    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    tensor_parallel_size: int = 1  # processes (GPUs) the LLM is split over; see specinfer/distributed
    quantization: str | None = None  # None, "int8" (per channel) or "int4" (per group); see specinfer/quant
    quant_group_size: int = 64  # input columns sharing one int4 scale
    # Offloading: the LLM's weights may take this much device memory (GiB); layers beyond it stream from
    # host memory, which may hold at most `pinned_memory_gb` of them. None: everything on the device.
    gpu_memory_gb: float | None = None
    pinned_memory_gb: float | None = None
    # Fuse each block's elementwise kernels with torch.compile (models/compile.py); slower start-up.
    compile: bool = False
    # One matrix product for q/k/v and one for gate/up (models/fuse.py). Off where weights get saved.
    fuse_projections: bool = True

    def __post_init__(self) -> None:
        if self.compile and (self.tensor_parallel_size > 1 or self.gpu_memory_gb):
            raise SpecInferError("compile cannot be combined with tensor parallelism or offloading")
        if self.quantization not in (None, "int8", "int4"):
            raise SpecInferError(f"quantization must be int8 or int4 (or none), got {self.quantization!r}")
        if self.quant_group_size < 2 or self.quant_group_size % 2:
            raise SpecInferError(f"quant_group_size must be an even number >= 2, got {self.quant_group_size}")
        if self.tensor_parallel_size < 1:
            raise SpecInferError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_batch_size < 1:
            raise SpecInferError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_sequence_length < 2:
            raise SpecInferError(f"max_sequence_length must be >= 2, got {self.max_sequence_length}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpecInferError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
