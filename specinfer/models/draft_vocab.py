"""A draft vocabulary: an SSM scores only the tokens that the LLM's answers use most.

For a small SSM the LM head is most of the work: SmolLM2-135M's head (49,152 x 576) holds 28M weights
against 10.6M in the three layers of its tuned SSMs, and every drafted level reads all of them. Scoring
the K most frequent tokens instead (as FR-Spec does) reads K rows. The LLM still verifies against the
full vocabulary, so outputs are unchanged; the SSM just never proposes a token outside the K, which
costs acceptance only where such a token would have been right.

The head returns full-vocabulary logits with -inf outside the K tokens, so that top-k drafting and the
draft distributions of speculative sampling (exactly 0 outside) need no change.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SpecInferError


class DraftVocabularyHead(nn.Module):
    def __init__(self, lm_head: nn.Linear, token_ids: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        if not isinstance(lm_head, nn.Linear):
            raise SpecInferError("a draft vocabulary needs an SSM with an unquantized LM head")
        ids = torch.as_tensor(token_ids, dtype=torch.long).unique()  # sorted, once each
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
            raise SpecInferError(f"draft vocabulary token ids must lie in [0, {vocab_size})")
        device = lm_head.weight.device
        self.register_buffer("token_ids", ids.to(device), persistent=False)
        self.weight = nn.Parameter(lm_head.weight.detach()[ids.to(device)].clone(), requires_grad=False)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = nn.functional.linear(hidden, self.weight)
        logits = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.token_ids, scores)


def use_draft_vocabulary(ssm: nn.Module, token_ids) -> nn.Module:
    """Make `ssm` score only `token_ids` (its own head is left to the LLM it may share it with)."""
    ssm.lm_head = DraftVocabularyHead(ssm.lm_head, token_ids, ssm.config.vocab_size)
    return ssm
