"""Steps 2 and 3 of boost-tuning: train an SSM on the LLM's answers, weighting each answer token by
whether the SSMs trained so far already cover it (the LLM's token among their top-k guesses).

Training runs our own model code: a full-sequence causal pass is one more shape of the same forward,
with a fresh KV cache that autograd sees through.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..errors import SpecInferError
from ..layers.attention import AttentionMetadata
from ..models import build_model
from ..models.early_exit import early_exit_draft
from ..models.loader import SHARED_EMBEDDINGS_KEY
from .data import Example


@dataclass(slots=True)
class TrainConfig:
    steps: int = 500
    batch_size: int = 16
    max_length: int = 384  # tokens per training sequence (prompt + answer), longer ones are cut
    learning_rate: float = 3e-4
    covered_weight: float = 0.1  # weight of answer tokens the earlier SSMs already cover
    cover_top_k: int = 3  # "covered" = the LLM's token is among an earlier SSM's top-k
    checkpoint_every: int = 100
    seed: int = 0


def make_ssm(llm: nn.Module, init: str, train_embeddings: bool = False) -> nn.Module:
    """A trainable SSM: `self:N` copies the LLM's first N layers, norm and LM head; `random:L,H` is a fresh
    L-layer LLaMA of width H with the LLM's vocabulary. A `self:N` SSM keeps the LLM's embeddings and LM
    head frozen unless `train_embeddings`: then it can share them with the LLM when saved and served, so
    it ships and loads as its layers alone (the embeddings are most of a small SSM)."""
    kind, _, spec = init.partition(":")
    try:
        if kind == "self":
            ssm = copy.deepcopy(early_exit_draft(llm, int(spec))).float().train()
            if not train_embeddings:
                ssm.embed_tokens.weight.requires_grad_(False)
                ssm.lm_head.weight.requires_grad_(False)
            return ssm
        if kind == "random":
            num_layers, hidden = (int(x) for x in spec.split(","))
            base = llm.config
            head_dim = 64 if hidden % 64 == 0 else hidden // 4
            cfg = copy.copy(base)
            cfg.family, cfg.hidden_size, cfg.num_layers = "llama", hidden, num_layers
            cfg.intermediate_size, cfg.head_dim = 3 * hidden, head_dim
            cfg.num_heads = cfg.num_kv_heads = hidden // head_dim
            cfg.tie_word_embeddings, cfg.rope_scaling = True, None
            torch.manual_seed(0)
            model = build_model(cfg).float()
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
            return model.to(next(llm.parameters()).device).train()
    except ValueError:
        pass
    raise SpecInferError(f"SSM init must be self:N or random:LAYERS,HIDDEN, got {init!r}")


def causal_logits(model: nn.Module, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tokens [B, T]; rows [K, 2] (batch, position) -> logits [K, V] at those positions."""
    B, T = tokens.shape
    device = tokens.device
    cache = _TrainingCache(model.config, B, T, device, next(model.parameters()).dtype)
    positions = torch.arange(T, device=device).expand(B, T)
    meta = AttentionMetadata(
        positions=positions,
        write_slots=torch.arange(B, device=device)[:, None].expand(B, T),
        write_offsets=positions,
        read_slots=torch.arange(B, device=device),
        prefix_lens=torch.zeros(B, dtype=torch.long, device=device),
        tree_mask=torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T),
        kv_len=T,
    )
    hidden = model(tokens, cache, meta)
    return model.compute_logits(hidden[rows[:, 0], rows[:, 1]])


class _TrainingCache:
    """Separate k/v tensors per layer: in-place writes into views of one shared tensor would hide
    their gradients from autograd. Same layout as `KVCache`, scratch slot included."""

    def __init__(self, cfg, num_slots: int, capacity: int, device, dtype) -> None:
        shape = (num_slots + 1, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]


def answer_batch(examples: list[Example], weights: list[torch.Tensor], max_length: int, device):
    """Padded inputs, the (row, position) pairs that predict answer tokens, their targets and weights."""
    seqs = [e.tokens[:max_length] for e in examples]
    T = max(len(s) for s in seqs) - 1
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    rows, targets, row_weights = [], [], []
    for b, (seq, example, w) in enumerate(zip(seqs, examples, weights)):
        tokens[b, : len(seq) - 1] = torch.tensor(seq[:-1])
        for t in range(example.answer_start - 1, len(seq) - 1):
            rows.append((b, t))
            targets.append(seq[t + 1])
            row_weights.append(float(w[t - example.answer_start + 1]))
    return (tokens.to(device), torch.tensor(rows, device=device), torch.tensor(targets, device=device),
            torch.tensor(row_weights, device=device))


@torch.no_grad()
def coverage(ssms: list[nn.Module], examples: list[Example], top_k: int, max_length: int) -> list[torch.Tensor]:
    """Per example, per answer token: True where some SSM has the LLM's token among its top-k."""
    covered = [torch.zeros(max(len(e.tokens[:max_length]) - e.answer_start, 0), dtype=torch.bool) for e in examples]
    if not ssms:
        return covered
    device = next(ssms[0].parameters()).device
    for i, example in enumerate(examples):
        if not len(covered[i]):
            continue
        tokens, rows, targets, _ = answer_batch([example], [covered[i].float()], max_length, device)
        for ssm in ssms:
            top = causal_logits(ssm.eval(), tokens, rows).topk(top_k, dim=-1).indices
            covered[i] |= (top == targets[:, None]).any(-1).cpu()
    return covered


def train_ssm(
    ssm: nn.Module,
    examples: list[Example],
    weights: list[torch.Tensor],
    config: TrainConfig,
    checkpoint: Path | None = None,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Weighted cross-entropy on the LLM's answer tokens, or with a `teacher` (the LLM) the weighted KL
    divergence from its full next-token distributions; resumes from `checkpoint` if it exists."""
    device = next(ssm.parameters()).device
    params = [p for p in ssm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    start = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        ssm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    rng = random.Random(config.seed + start)
    usable = [i for i, e in enumerate(examples) if len(e.tokens[: config.max_length]) > e.answer_start]
    if not usable:
        raise SpecInferError("no training example has answer tokens within max_length")
    ssm.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in tqdm(range(start, config.steps), initial=start, total=config.steps, desc="training SSM"):
        lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / config.steps))  # cosine decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        picked = [rng.choice(usable) for _ in range(config.batch_size)]
        tokens, rows, targets, row_weights = answer_batch(
            [examples[i] for i in picked], [weights[i] for i in picked], config.max_length, device)
        with autocast:
            logits = causal_logits(ssm, tokens, rows)
        log_q = logits.float().log_softmax(-1)
        if teacher is None:
            per_token = -log_q.gather(-1, targets[:, None])[:, 0]
        else:
            with torch.no_grad():
                log_p = causal_logits(teacher, tokens, rows).float().log_softmax(-1)
            per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(p_LLM || q_SSM)
        loss = (per_token * row_weights).sum()
        loss = loss / row_weights.sum().clamp_min(1e-6)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if checkpoint is not None and (step + 1) % config.checkpoint_every == 0:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": ssm.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, checkpoint)
    return ssm.eval()


def shares_embeddings(ssm: nn.Module) -> bool:
    """True when the SSM's embeddings and LM head were frozen in training, i.e. are still the LLM's."""
    return not (ssm.embed_tokens.weight.requires_grad or ssm.lm_head.weight.requires_grad)


def save_ssm(ssm: nn.Module, folder: Path, dtype: torch.dtype = torch.bfloat16, share_embeddings: bool = False,
             max_shard_bytes: int = 15_000_000) -> None:
    """A Hugging Face-style folder: config.json + safetensors, in shards of at most `max_shard_bytes` (with
    the standard index file). With `share_embeddings` the embeddings and LM head are left out and
    config.json says so: the loader takes them from the LLM the SSM serves."""
    folder.mkdir(parents=True, exist_ok=True)
    config = ssm.config.to_hf_dict()
    if share_embeddings:
        config[SHARED_EMBEDDINGS_KEY] = True
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for name, tensor in ssm.state_dict().items():
        if share_embeddings and name in ("embed_tokens.weight", "lm_head.weight"):
            continue
        if name == "lm_head.weight":
            if ssm.config.tie_word_embeddings:
                continue
            tensors[name] = tensor.to(dtype).contiguous().cpu()
        else:
            tensors[f"model.{name}"] = tensor.to(dtype).contiguous().cpu()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for old in folder.glob("*.safetensors"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
