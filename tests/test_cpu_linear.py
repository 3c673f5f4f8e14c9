"""CPU linear layers with prepacked oneDNN weights (layers/cpu_linear.py): the values of `F.linear` up to
rounding, the layers of a CPU engine's models turned (weights dropped only where nothing else holds
them), and speculation still exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specinfer.layers import cpu_linear
from specinfer.layers.cpu_linear import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not cpu_linear.available(torch.float32), reason="no oneDNN in this PyTorch build")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_products_match_plain_ones_for_every_row_count(dtype, tolerance):
    if not cpu_linear.available(dtype):
        pytest.skip(f"no packed {dtype} products here")
    torch.manual_seed(0)
    for bias in (True, False):
        layer = nn.Linear(40, 48, bias=bias, dtype=dtype)
        weight = layer.weight.detach().clone()
        bias_values = None if layer.bias is None else layer.bias.detach().clone()
        pack_linears([layer])
        assert type(layer) is PackedLinear and not hasattr(layer, "weight")  # only the packed copy is left
        for shape in [(1, 40), (2, 40), (3, 40), (1, 3, 40), (4, 40), (21, 40), (2, 5, 40)]:
            x = torch.randn(shape, dtype=dtype)
            got = layer(x)
            expected = nn.functional.linear(x.float(), weight.float(), None if bias_values is None else bias_values.float())
            assert got.shape == (*shape[:-1], 48) and got.dtype == dtype
            scale = expected.abs().max().item()
            assert (got.float() - expected).abs().max().item() <= tolerance * scale, shape
        x = torch.randn(40, 6, dtype=dtype).t()  # a non-contiguous input
        assert torch.allclose(layer(x).float(), layer(x.contiguous()).float())


def test_only_plain_linear_layers_are_turned_and_shared_weights_kept():
    class Other(nn.Linear):
        pass

    first = nn.Sequential(nn.Linear(8, 8), Other(8, 8), nn.ReLU(), nn.Embedding(10, 8))
    tied = nn.Linear(8, 10, bias=False)
    tied.weight = first[3].weight  # a head tied to the embedding
    second = nn.Sequential(first[0], tied)  # a layer shared by two models
    pack_linears([first, second])
    assert type(first[0]) is PackedLinear and second[0] is first[0] and not hasattr(first[0], "weight")
    assert type(first[1]) is Other and hasattr(first[1], "weight")
    assert type(tied) is PackedLinear and tied.weight is first[3].weight  # the embedding still reads it


def test_cpu_engine_packs_and_speculation_stays_exact(tmp_path):
    """Each prompt served by a tree and incrementally: verifications of several tokens, SSM catch-ups."""
    from specinfer import LLM, EngineConfig, GenerationConfig, SpeculationConfig

    from .conftest import save_random_llama
    from .test_cli import VOCAB, write_byte_level_tokenizer

    reference = save_random_llama(tmp_path / "llm", vocab_size=VOCAB)
    save_random_llama(tmp_path / "ssm", noise_from=reference, vocab_size=VOCAB)
    write_byte_level_tokenizer(tmp_path / "llm")
    llm = LLM(str(tmp_path / "llm"), [str(tmp_path / "ssm"), "self:1"], engine=EngineConfig(max_sequence_length=128),
              speculation=SpeculationConfig(expansion=(1, 2, 1), adaptive=False))
    linears = [m for model in [llm.model, *llm.ssms] for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert hasattr(llm.model.lm_head, "weight")  # heads keep theirs: later SSMs may share it
    config = GenerationConfig(max_new_tokens=12)
    accepted = 0
    for prompt in ["hello there", "a tree of tokens"]:
        tree = llm.generate([prompt], config, use_chat_template=False, progress=False)[0]
        plain = llm.generate([prompt], config, use_chat_template=False, progress=False, mode="incremental")[0]
        assert tree.output_tokens == plain.output_tokens
        accepted += tree.num_accepted
    assert accepted > 0
