"""The few knobs of the engine, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecInferError
from .spec.tree import TreeShape
from .spec.tree_ladder import TreeLadder, growth_order

MODES = ("tree", "sequence", "incremental")
DEFAULT_EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)
MAX_TREE_NODES = 1024  # per SSM, root excluded


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
    """`tree`: every SSM drafts a tree, by `expansion` (children per depth) or by `tree`, a fitted shape
    given as rank paths (`spec/tree_fit.py`; it takes precedence); the trees merge. `sequence`: the first
    SSM speculates a chain as deep as the tree. `incremental`: no speculation. `adaptive` drafts, step by
    step, the part of the tree that is measured to pay at the running batch size (nested trees of 1, 3, 7,
    ... nodes), or nothing; outputs are the same either way."""

    mode: str = "tree"
    expansion: tuple[int, ...] = DEFAULT_EXPANSION
    # Draft only as much as is measured to pay (engine/speculation_controller.py).
    adaptive: bool = True
    tree: tuple[tuple[int, ...], ...] | None = None  # rank paths, e.g. ((0,), (1,), (0, 0))
    # How sampled requests draft. False: each SSM's top-k tokens, drafted on the device like greedy trees
    # and verified by drawing the LLM's token at every node and descending where the draw is a child (a
    # top-k child is a point mass); no distribution leaves the device. True: draws from each SSM's own
    # sampling distribution, drafted on the host and verified by multi-step speculative sampling. Either
    # way the output follows exactly the LLM's sampling distribution (spec/verify.py).
    sampled_children: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecInferError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.expansion = tuple(self.expansion)
        if not self.expansion or any(not isinstance(w, int) or w < 1 for w in self.expansion):
            raise SpecInferError(f"expansion must be one or more positive integers, got {self.expansion}")
        if len(self.expansion) > 32 or max(self.expansion) > 16:
            raise SpecInferError(f"expansion {self.expansion} is too large (at most 32 levels of at most 16 children)")
        if self.tree is not None:
            shape = TreeShape.from_paths(self.tree)  # validates
            self.tree = growth_order(self.tree)  # kept in the given order where it nests (tree_ladder)
            if len(shape) > MAX_TREE_NODES + 1 or shape.depth > 32:
                raise SpecInferError(f"the tree has {len(shape) - 1} nodes and depth {shape.depth}: at most "
                                     f"{MAX_TREE_NODES} nodes and depth 32")

    @property
    def tree_shape(self) -> TreeShape | None:
        """The shape every SSM drafts (None when nothing is drafted)."""
        if self.mode == "incremental":
            return None
        if self.tree is not None:
            shape = TreeShape.from_paths(self.tree)
            return shape if self.mode == "tree" else TreeShape.from_widths((1,) * shape.depth)
        return TreeShape.from_widths(self.expansion if self.mode == "tree" else (1,) * len(self.expansion))

    @property
    def tree_ladder(self) -> TreeLadder | None:
        """The trees the engine may draft: with `adaptive`, the nested trees of 1, 3, 7, ... nodes up to the
        whole one (`spec/tree_ladder.py`), else the whole tree alone. None when nothing is drafted."""
        shape = self.tree_shape
        if shape is None:
            return None
        if not self.adaptive:
            return TreeLadder.single(shape)
        return TreeLadder.from_paths(self.tree if self.tree is not None and self.mode == "tree" else shape.paths[1:])

    @property
    def max_tree_nodes(self) -> int:
        """Tree nodes per SSM, root included (1 when nothing is drafted)."""
        shape = self.tree_shape
        return len(shape) if shape is not None else 1


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
    dtype: str = "auto"  # auto: bfloat16 on GPU; on CPU bfloat16 where faster (layers/cpu_dtype.py)
    tensor_parallel_size: int = 1  # processes (GPUs) the LLM is split over; see specinfer/distributed
    quantization: str | None = None  # None, "int8" (per channel) or "int4" (per group); see specinfer/quant
    quant_group_size: int = 64  # input columns sharing one int4 scale
    # Offloading: the LLM's weights may take this much device memory (GiB); layers beyond it stream from
    # host memory, which may hold at most `pinned_memory_gb` of them. None: everything on the device.
    gpu_memory_gb: float | None = None
    pinned_memory_gb: float | None = None
    # Fuse each block's elementwise kernels with torch.compile (models/compile.py); slower start-up.
    compile: bool = False
    # With `compile`, on a GPU: one-token passes (batch-1 decoding) with each product's norm, SwiGLU or
    # residual add folded into its kernel (layers/decode_gemv.py). LLaMA models with plain or int8 layers.
    fold_decode: bool = True
    # With `compile`, on a GPU: passes of 2 to 128 tokens (verification, drafting) folded the same way
    # (layers/rows_product.py), LLaMA models with unquantized layers. Off until timed on a GPU.
    fold_rows: bool = False
    # One matrix product for q/k/v and one for gate/up (models/fuse.py). Off where weights get saved.
    fuse_projections: bool = True
    # CPU linear layers with weights prepacked for oneDNN (layers/cpu_linear.py); off where the models'
    # layers are copied or trained afterwards (boost-tuning)
    pack_cpu_weights: bool = True
    # SSMs score only this many of the most used tokens (models/draft_vocab.py); 0: the whole vocabulary;
    # None: 16,384 for the default model's tuned SSMs or with `draft_vocab_file`, else the whole vocabulary.
    draft_vocab_size: int | None = None
    # Which tokens: a ranking from `specinfer fit-tree` (draft_vocab.json); None: the one shipped for the
    # default model, or token ids in order for any other.
    draft_vocab_file: str | None = None
    # Queue each plain step (incremental decoding, the adaptive engine's plain steps) before the
    # step ahead of it is read back (engine/in_flight.py). None: on a GPU, where the host's work between
    # passes otherwise leaves the device idle.
    overlap_plain_steps: bool | None = None
    # Greedy tree steps: draft the next step (the controller choosing it a step early) from the accepted
    # path found on the device (spec/device_accept.py) before this step is read back, so that the host's
    # work between the read-back and the next launch runs while the device drafts. None: on a GPU with a
    # fixed tree (on an H200 it took the 64-node tree from 0.99x to 1.18x incremental decoding at batch 1
    # and never lost, batch 1-64); off with the adaptive controller, which with it lost at batch 1 in one
    # of two runs (0.90x, docs/benchmarks/batch_throughput_gpu.md).
    overlap_tree_steps: bool | None = None
    # The SSMs' own transformer layers quantized the same way (None, "int8", "int4"); `self:N` drafts share
    # the LLM's layers, quantized or not, whatever this says.
    ssm_quantization: str | None = None
    # The LLM's LM head quantized too (with `quantization`): a 7B model's is some 7% of an int4 step's
    # bytes. The embedding stays in the model's dtype.
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.compile and (self.tensor_parallel_size > 1 or self.gpu_memory_gb):
            raise SpecInferError("compile cannot be combined with tensor parallelism or offloading")
        for name in ("quantization", "ssm_quantization"):
            if getattr(self, name) not in (None, "int8", "int4"):
                raise SpecInferError(f"{name} must be int8 or int4 (or none), got {getattr(self, name)!r}")
        if self.quantize_lm_head and not self.quantization:
            raise SpecInferError("quantize_lm_head needs quantization (int8 or int4) for the LLM")
        if self.quant_group_size < 2 or self.quant_group_size % 2:
            raise SpecInferError(f"quant_group_size must be an even number >= 2, got {self.quant_group_size}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise SpecInferError(
                f"draft_vocab_size must be >= 0 (0: the whole vocabulary), got {self.draft_vocab_size}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise SpecInferError(f"gpu_memory_gb must be > 0 (none: everything on the device), got {self.gpu_memory_gb:g}")
        if self.pinned_memory_gb is not None and self.pinned_memory_gb < 0:
            raise SpecInferError(f"pinned_memory_gb must be >= 0, got {self.pinned_memory_gb:g}")
        if self.tensor_parallel_size < 1:
            raise SpecInferError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_batch_size < 1:
            raise SpecInferError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_sequence_length < 2:
            raise SpecInferError(f"max_sequence_length must be >= 2, got {self.max_sequence_length}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SpecInferError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
