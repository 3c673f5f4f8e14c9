"""The Python API for the common case: load an LLM and its SSMs, generate for a list of prompts.

    from specinfer import LLM, GenerationConfig
    llm = LLM()                                  # the default SmolLM2-135M-Instruct + its draft
    results = llm.generate(["What is speculative decoding?"], GenerationConfig(max_new_tokens=64))
    print(results[0].output_text, results[0].mean_tokens_per_step)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import EngineConfig, GenerationConfig, SpeculationConfig
from .default_model import (
    DEFAULT_SSMS,
    EARLY_EXIT_DRAFT,
    TUNED_PREFIX,
    DEFAULT_DRAFT_VOCAB_SIZE,
    default_draft_vocab_size,
    default_model_path,
    default_tree,
    draft_vocab_ranking,
    is_default_model,
    tuned_ssm_path,
)
from .distributed.parallel import from_environment
from .engine.offload import offload
from .engine.request_manager import RequestManager
from .errors import SpecInferError
from .layers import cpu_linear
from .layers.cpu_dtype import auto_cpu_dtype, layer_products
from .models.compile import compile_blocks
from .models.fuse import fuse_projections
from .models.gguf_file import read_q4_1_blocks
from .models.draft_vocab import draft_vocabulary, read_ranking, use_draft_vocabulary
from .models.early_exit import early_exit_draft
from .models.loader import load_model, read_config
from .quant import quantize_model
from .spec.tree_fit import load_tree_file
from .tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class GenerationResult:
    request_id: int
    prompt: str
    output_text: str
    output_tokens: list[int]
    finish_reason: str
    num_llm_steps: int
    num_accepted: int  # speculated tokens the LLM kept
    mean_tokens_per_step: float  # tokens committed per LLM step (accepted + the LLM's own)
    latency_s: float


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        ssms: list[str] | None = None,
        tokenizer: str | Path | None = None,
        engine: EngineConfig | None = None,
        speculation: SpeculationConfig | None = None,
    ) -> None:
        """`model`: a Hugging Face folder or a GGUF file (None: the default model). `ssms`: folders, GGUF
        files, `self:N` for the LLM's own first N layers, or `tuned:N` for the boost-tuned SSMs shipped for
        the default model (None: `tuned:1` with the default model, `self:4` with any other). `speculation`
        None: the default expansion, or with the default model and its tuned SSMs the tree fitted to them."""
        self.engine_config = engine or EngineConfig()
        if speculation is None:  # the default model drafts a tree fitted to its tuned SSMs
            tree = default_tree(model, ssms, self.engine_config.device)
            speculation = SpeculationConfig(tree=load_tree_file(tree) if tree else None)
        self.speculation = speculation
        if self.engine_config.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpecInferError("--device cuda was asked for, but no CUDA GPU is visible")
        # Under tensor parallelism every rank runs all of this on its own device, with its slice of the LLM.
        self.tp, device_name = from_environment(self.engine_config.tensor_parallel_size, self.engine_config.device)
        device = torch.device(device_name)
        model_path = Path(model) if model is not None else default_model_path()
        # The models' activations (weights too, unless quantized), and how it was chosen, in words.
        self.dtype, self.dtype_reason = self._dtype(device, model_path)
        dtype = self.dtype
        self.model_path = model_path
        budget = self.engine_config.gpu_memory_gb
        # Offloading loads on the host first: the model may not fit the device at all.
        self.model = load_model(model_path, "cpu" if budget else device, dtype, tp=self.tp)
        if self.engine_config.quantization:
            blocks = None
            if self.engine_config.quantization == "int4" and model_path.suffix == ".gguf" and self.tp is None:
                blocks = read_q4_1_blocks(model_path)  # Q4_1 layers keep the file's own 4-bit values
            quantize_model(self.model, self.engine_config.quantization, self.engine_config.quant_group_size, blocks,
                           lm_head=self.engine_config.quantize_lm_head)
        if self.engine_config.fuse_projections:
            fuse_projections(self.model)
        if budget:
            pinned = self.engine_config.pinned_memory_gb
            offload(self.model, device, int(budget * 2**30), None if pinned is None else int(pinned * 2**30))
        self.tokenizer: Tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model_path)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise SpecInferError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the LLM only {self.model.config.vocab_size}: "
                "it does not belong to this model"
            )
        if ssms is None:
            ssms = list(DEFAULT_SSMS) if is_default_model(model_path) else [EARLY_EXIT_DRAFT]
        ssm_specs = [] if self.speculation.mode == "incremental" else list(ssms)
        self.ssms = [self._load_ssm(spec, device, dtype) for spec in ssm_specs]
        self._use_draft_vocabulary(model, ssms)
        if self.engine_config.compile:
            for model in [self.model, *self.ssms]:
                compile_blocks(model, self.engine_config.fold_decode, self.engine_config.fold_rows)
        config = self.engine_config
        if (device.type == "cpu" and config.pack_cpu_weights and cpu_linear.available(dtype) and self.tp is None
                and not config.compile):
            cpu_linear.pack_linears([self.model, *self.ssms])  # weights blocked once for oneDNN (layers/cpu_linear.py)
        self.eos_token_ids = self.tokenizer.eos_token_ids or self.model.config.eos_token_ids
        self._managers: dict[str, RequestManager] = {}
        self.manager = self.manager_for(self.speculation.mode)

    def set_speculation(self, speculation: SpeculationConfig) -> None:
        """Change the expansion or mode for later calls (SSMs stay loaded; managers are rebuilt)."""
        self.speculation = speculation
        self._managers.clear()
        self.manager = self.manager_for(speculation.mode)

    def manager_for(self, mode: str) -> RequestManager:
        """The request manager running `mode` (tree, sequence or incremental) over the loaded models."""
        if mode not in self._managers:
            speculation = dataclasses.replace(self.speculation, mode=mode)
            self._managers[mode] = RequestManager(
                self.model, self.ssms, self.engine_config, speculation, self.eos_token_ids, self.tokenizer
            )
        return self._managers[mode]

    def _dtype(self, device: torch.device, model_path: Path) -> tuple[torch.dtype, str]:
        """The models' dtype, and how it was chosen."""
        name, config = self.engine_config.dtype, self.engine_config
        if name != "auto":
            return _DTYPES[name], "asked for"
        if device.type == "cuda":
            return torch.bfloat16, "auto on a GPU"
        if config.quantization or config.tensor_parallel_size > 1:  # their CPU paths are fp32's
            return torch.float32, "auto on a CPU with " + ("quantization" if config.quantization else "tensor parallelism")
        try:  # measured on the model's own product shapes and size
            model_config = read_config(model_path)
            layer, num_layers = tuple(layer_products(model_config)), model_config.num_layers
        except (SpecInferError, OSError, AttributeError, KeyError, TypeError, ValueError):  # loading says what is wrong
            layer, num_layers = None, None
        dtype, why = auto_cpu_dtype(layer, num_layers)  # bf16 where this CPU's products measure faster in it
        return dtype, f"auto: {why}"

    def _load_ssm(self, spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        if spec.startswith("self:"):
            try:
                num_layers = int(spec.removeprefix("self:"))
            except ValueError:
                raise SpecInferError(f"SSM {spec!r}: expected self:N with N a number of layers") from None
            return early_exit_draft(self.model, num_layers)
        if spec.startswith(TUNED_PREFIX):
            if not is_default_model(self.model_path):
                raise SpecInferError(f"SSM {spec!r} was tuned for the default model ({self.model_path.name} is "
                                     "another): boost-tune SSMs for this LLM with `specinfer boost-tune`")
            spec = str(tuned_ssm_path(spec))
        ssm = load_model(spec, device, dtype, shared_from=self.model)
        if self.engine_config.ssm_quantization:
            quantize_model(ssm, self.engine_config.ssm_quantization, self.engine_config.quant_group_size)
        if self.engine_config.fuse_projections:
            fuse_projections(ssm)
        ssm_path = Path(spec)
        if ssm_path.is_dir() and _has_tokenizer(ssm_path):
            if load_tokenizer(ssm_path).vocab() != self.tokenizer.vocab():
                raise SpecInferError(f"SSM {spec!r} has a different tokenizer vocabulary from the LLM's")
        return ssm

    def _use_draft_vocabulary(self, model, ssms: list[str]) -> None:
        size, ranking = self.engine_config.draft_vocab_size, self.engine_config.draft_vocab_file
        ranked = read_ranking(ranking) if ranking else None  # read (and checked) even where unused
        if size is None:
            size = DEFAULT_DRAFT_VOCAB_SIZE if ranking else default_draft_vocab_size(model, ssms)
            size = size if self.tp is None else 0
        vocab = self.model.config.vocab_size
        if not size or size >= vocab or not self.ssms:
            return
        if self.tp is not None:
            raise SpecInferError("a draft vocabulary cannot be combined with tensor parallelism yet")
        ids = draft_vocabulary(ranked if ranked is not None else draft_vocab_ranking(self.model_path), size, vocab)
        for ssm in self.ssms:  # an SSM sharing the LLM's head gets its own cut of it; the LLM keeps the whole
            use_draft_vocabulary(ssm, ids)

    def encode_prompt(self, prompt: str, use_chat_template: bool) -> list[int]:
        if use_chat_template and self.tokenizer.has_chat_template:
            return self.tokenizer.encode_chat(prompt)
        return self.tokenizer.encode(prompt)

    def generate(
        self,
        prompts: str | list[str],
        config: GenerationConfig | None = None,
        max_sequence_length: int | None = None,
        use_chat_template: bool = True,
        progress: bool = False,
        mode: str | None = None,
    ) -> list[GenerationResult]:
        """Serve all prompts together (continuous batching) and return their results in order. `mode`
        overrides the speculation mode for this call (e.g. "incremental" for a baseline)."""
        manager = self.manager_for(mode or self.speculation.mode)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise SpecInferError("no prompts given")
        ids = []
        for prompt in prompts:
            if not prompt.strip():
                raise SpecInferError("a prompt is empty")
            tokens = self.encode_prompt(prompt, use_chat_template)
            ids.append(manager.register_new_request(tokens, max_sequence_length, config, prompt_text=prompt))
        total = sum(manager.requests[i].num_remaining for i in ids)
        with tqdm(total=total, desc=f"generating ({manager.speculation.mode})", unit="tok", disable=not progress) as bar:
            done = 0
            while manager.has_work():
                manager.step()
                now = sum(len(manager.requests[i].output_tokens) for i in ids)
                bar.update(now - done)
                done = now
        return [self._result(manager, i) for i in ids]

    def _result(self, manager: RequestManager, request_id: int) -> GenerationResult:
        r = manager.pop_request(request_id)
        return GenerationResult(
            request_id=r.id,
            prompt=r.prompt or "",
            output_text=self.tokenizer.decode(r.output_tokens),
            output_tokens=list(r.output_tokens),
            finish_reason=r.finish_reason or "",
            num_llm_steps=r.stats.num_llm_steps,
            num_accepted=r.stats.num_accepted,
            mean_tokens_per_step=r.stats.mean_tokens_per_step,
            latency_s=(r.stats.finish_time or time.perf_counter()) - r.stats.arrival_time,
        )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))
