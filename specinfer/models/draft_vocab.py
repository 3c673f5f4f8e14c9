"""A draft vocabulary: an SSM scores only the tokens that the LLM's answers use most.

For a small SSM the LM head is most of the work: SmolLM2-135M's head (49,152 x 576) holds 28M weights
against 10.6M in the three layers of its tuned SSMs, and every drafted level reads all of them. Scoring
the K most frequent tokens instead (as FR-Spec does) reads K rows. The LLM still verifies against the
full vocabulary, so outputs are unchanged; the SSM just never proposes a token outside the K, which
costs acceptance only where such a token would have been right.

Which tokens: a ranking file (`write_ranking`; `specinfer fit-tree` writes one from the LLM's answers, and
one ships for the default model) lists token ids from the most used; `draft_vocabulary` takes its first
K, completed by token id (BPE and SentencePiece vocabularies number tokens roughly by frequency).

The head returns full-vocabulary logits with -inf outside the K tokens, so that top-k drafting and the
draft distributions of speculative sampling (exactly 0 outside) need no change.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

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
        # The K rows as a layer of their own (so that CPU engines pack it like the others: layers/cpu_linear.py).
        self.rows = nn.Linear(lm_head.in_features, ids.numel(), bias=False, device="meta")
        self.rows.weight = nn.Parameter(lm_head.weight.detach()[ids.to(device)].clone(), requires_grad=False)
        self.vocab_size = vocab_size

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the K tokens alone, in `token_ids` order."""
        return self.rows(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.scores(hidden)
        logits = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.token_ids, scores)


def use_draft_vocabulary(ssm: nn.Module, token_ids) -> nn.Module:
    """Make `ssm` score only `token_ids` (its own head is left to the LLM it may share it with)."""
    ssm.lm_head = DraftVocabularyHead(ssm.lm_head, token_ids, ssm.config.vocab_size)
    return ssm


def rank_tokens(answers: list[list[int]]) -> list[int]:
    """Token ids by how often they occur in `answers`, the most used first (ties: first seen first)."""
    return [token for token, _ in Counter(t for answer in answers for t in answer).most_common()]


def write_ranking(path: Path, ranked: list[int], source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ranked": ranked, "from": source}))


def read_ranking(path: str | Path) -> list[int]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecInferError(f"cannot read draft vocabulary file {str(path)!r}: {err}") from None
    ranked = data.get("ranked") if isinstance(data, dict) else None
    if not isinstance(ranked, list) or not all(isinstance(t, int) for t in ranked):
        raise SpecInferError(f"draft vocabulary file {str(path)!r} must hold {{\"ranked\": [token ids]}} "
                             "(specinfer fit-tree writes one)")
    return ranked


def draft_vocabulary(ranked: list[int], size: int, vocab_size: int) -> list[int]:
    """The `size` token ids an SSM scores: `ranked` first, then the others by id."""
    if any(not 0 <= t < vocab_size for t in ranked):
        raise SpecInferError(f"draft vocabulary token ids must lie in [0, {vocab_size})")
    return list(dict.fromkeys(list(ranked) + list(range(vocab_size))))[:size]
