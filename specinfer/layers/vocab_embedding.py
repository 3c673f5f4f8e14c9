"""Token embedding and LM head, split by vocabulary across tensor-parallel ranks (plain without)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def vocab_rows(vocab_size: int, tp) -> int:
    """Rows of the embedding and LM head on one rank: the vocabulary padded to a multiple of the ranks."""
    return vocab_size if tp is None else -(-vocab_size // tp.size)


class VocabEmbedding(nn.Embedding):
    """Rank r holds token ids [r * rows, (r + 1) * rows); other ids embed to zero there, and one
    all-reduce sums the ranks' parts into the full embedding."""

    def __init__(self, vocab_size: int, dim: int, tp=None) -> None:
        super().__init__(vocab_rows(vocab_size, tp), dim)
        self.tp = tp
        self.first_id = 0 if tp is None else tp.rank * self.num_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return super().forward(tokens)
        local = tokens - self.first_id
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


def vocab_logits(lm_head: nn.Linear, hidden: torch.Tensor, vocab_size: int, tp) -> torch.Tensor:
    """Full-vocabulary fp32 logits; under tensor parallelism each rank's slice, gathered."""
    logits = lm_head(hidden)
    if tp is not None:
        logits = tp.gather_last_dim(logits)[..., :vocab_size]
    return logits.float()
