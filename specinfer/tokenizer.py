"""Tokenizers, through `transformers` (never from a hub): SentencePiece `tokenizer.model`, GPT-2 BPE
`vocab.json` + `merges.txt`, `tokenizer.json`, or the vocabulary inside a GGUF file."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from .errors import SpecInferError

log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    root = os.environ.get("SPECINFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specinfer")
    return Path(root)


class Tokenizer:
    """A thin, typed face over a `transformers` tokenizer."""

    def __init__(self, hf_tokenizer, source: str) -> None:
        self.hf = hf_tokenizer
        self.source = source

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_ids(self) -> list[int]:
        return [] if self.hf.eos_token_id is None else [self.hf.eos_token_id]

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def decode(self, tokens: list[int]) -> str:
        return self.hf.decode(tokens, skip_special_tokens=True)

    def encode_chat(self, user_message: str) -> list[int]:
        """Token ids of a one-turn conversation, ready for the assistant's answer."""
        return self.encode_messages([{"role": "user", "content": user_message}])

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ({"role", "content"} dicts) through the chat template, ready for the
        assistant's answer."""
        if not self.has_chat_template:
            raise SpecInferError(f"the tokenizer from {self.source!r} has no chat template")
        try:
            ids = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # jinja raises its own types, e.g. for a role the template refuses
            raise SpecInferError(f"the chat template refused these messages: {err}") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def vocab(self) -> dict[str, int]:
        return self.hf.get_vocab()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a model folder, a tokenizer file (`tokenizer.model`, `tokenizer.json`), a folder with
    `vocab.json` + `merges.txt`, or a `.gguf` file."""
    path = Path(path)
    if not path.exists():
        raise SpecInferError(f"tokenizer path {str(path)!r} does not exist")
    try:
        return Tokenizer(_load_hf(path), str(path))
    except SpecInferError:
        raise
    except Exception as err:  # transformers raises many types for a file it cannot parse
        raise SpecInferError(f"cannot load a tokenizer from {str(path)!r}: {err}") from None


def _load_hf(path: Path):
    from transformers import AutoTokenizer, GPT2TokenizerFast, LlamaTokenizer, PreTrainedTokenizerFast

    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf_tokenizer(path)
        if path.name.endswith(".json"):
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        if path.suffix == ".model":
            return _load_sentencepiece_file(path)
        raise SpecInferError(f"{str(path)!r} is not a tokenizer file (.model, .json or .gguf)")
    names = {p.name for p in path.iterdir()}
    if "tokenizer.json" in names or "tokenizer_config.json" in names:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if {"vocab.json", "merges.txt"} <= names:  # the GPT-2 BPE files of the OPT family
        return GPT2TokenizerFast.from_pretrained(str(path), local_files_only=True)
    if "tokenizer.model" in names:
        return LlamaTokenizer.from_pretrained(str(path), local_files_only=True)
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if ggufs:
        return _load_gguf_tokenizer(path / ggufs[0])
    raise SpecInferError(
        f"no tokenizer in {str(path)!r}: expected tokenizer.json, tokenizer.model, vocab.json + merges.txt, or a .gguf"
    )


def _load_sentencepiece_file(path: Path):
    """A lone SentencePiece file under any name: load it from a folder where it is `tokenizer.model`."""
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.model").symlink_to(path.resolve())
        return LlamaTokenizer.from_pretrained(folder, local_files_only=True)


def _load_gguf_tokenizer(path: Path):
    """Converting a GGUF vocabulary takes seconds, so the result is kept under ~/.cache/specinfer."""
    from transformers import AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_dir() / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    log.info("converting the tokenizer inside %s (once; cached in %s)", path.name, cached)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        hf.save_pretrained(str(cached))
    except OSError as err:  # a read-only home only costs the conversion next time
        log.warning("could not cache the tokenizer in %s: %s", cached, err)
    return hf
