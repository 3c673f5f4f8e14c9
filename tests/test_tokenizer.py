"""Tokenizer formats: SentencePiece `tokenizer.model` (file or folder), `tokenizer.json`, GPT-2 vocab + merges."""

from __future__ import annotations

import pytest

from specinfer.errors import SpecInferError
from specinfer.tokenizer import load_tokenizer

from .test_cli import write_byte_level_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([TEXT, "a stitch in time saves nine", "to be or not to be"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return folder / "sp.model"


def test_sentencepiece_file_and_folder(sentencepiece_model, tmp_path):
    as_file = load_tokenizer(sentencepiece_model)
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    as_folder = load_tokenizer(tmp_path)
    ids = as_file.encode(TEXT)
    assert ids and as_folder.encode(TEXT) == ids
    assert as_file.decode(ids).strip() == TEXT
    assert as_file.eos_token_ids == [2]


def test_gpt2_vocab_merges_and_tokenizer_json(tmp_path):
    write_byte_level_tokenizer(tmp_path)
    bpe = load_tokenizer(tmp_path)
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT and bpe.vocab_size == 256
    saved = tmp_path / "saved"
    bpe.hf.save_pretrained(str(saved))
    from_json = load_tokenizer(saved / "tokenizer.json")
    assert from_json.encode(TEXT) == ids


def test_not_a_tokenizer(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SpecInferError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(SpecInferError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "notes.txt")
