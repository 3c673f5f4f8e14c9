"""CPU products of 2 or 3 rows computed as 4 (layers/cpu_rows.py): the same values up to rounding, the
layers of a CPU engine's models turned, and speculation still exact."""

from __future__ import annotations

import torch
from torch import nn

from specinfer.layers.cpu_rows import RowPaddedLinear, linear_rows, pad_small_products


def test_padded_products_match_plain_ones_for_every_row_count():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40), torch.randn(48)
    for shape in [(40,), (1, 40), (2, 40), (3, 40), (1, 3, 40), (3, 1, 40), (4, 40), (5, 40)]:
        x = torch.randn(shape)
        got = linear_rows(x, weight, bias)
        assert got.shape == (*shape[:-1], 48)
        assert torch.allclose(got, nn.functional.linear(x, weight, bias), atol=1e-5, rtol=1e-5), shape


def test_only_plain_linear_layers_are_turned():
    class Other(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), Other(8, 8), nn.ReLU())
    weight = model[0].weight
    pad_small_products(model)
    assert type(model[0]) is RowPaddedLinear and model[0].weight is weight  # the same parameters
    assert type(model[1]) is Other


def test_cpu_engine_pads_and_speculation_stays_exact(tmp_path, monkeypatch):
    """One request at a time with a 2-node chain: verifications of 3 tokens, SSM catch-ups of 2."""
    from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig
    from specinfer.layers import cpu_rows

    from .conftest import save_random_llama
    from .test_cli import VOCAB, write_byte_level_tokenizer

    reference = save_random_llama(tmp_path / "llm", vocab_size=VOCAB)
    save_random_llama(tmp_path / "ssm", noise_from=reference, vocab_size=VOCAB)
    write_byte_level_tokenizer(tmp_path / "llm")
    llm = LLM(str(tmp_path / "llm"), [str(tmp_path / "ssm")], engine=EngineConfig(max_sequence_length=128),
              speculation=SpeculationConfig(expansion=(1, 1), adaptive=False))
    assert isinstance(llm.model.lm_head, RowPaddedLinear) and isinstance(llm.ssms[0].lm_head, RowPaddedLinear)
    padded_rows = []
    product = cpu_rows.linear_rows
    monkeypatch.setattr(cpu_rows, "linear_rows", lambda x, w, b=None: padded_rows.append(x.numel() // x.shape[-1])
                        or product(x, w, b))
    config = GenerationConfig(max_new_tokens=12)
    for prompt in ["hello there", "a tree of tokens"]:
        tree = llm.generate([prompt], config, use_chat_template=False, progress=False)[0]
        plain = llm.generate([prompt], config, use_chat_template=False, progress=False, mode="incremental")[0]
        assert tree.output_tokens == plain.output_tokens
    assert {2, 3} <= set(padded_rows)
