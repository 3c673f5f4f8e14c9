"""The CLI: a full run on a small random model, and one clear error (no traceback) per bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from specinfer.cli import main

from .conftest import save_random_llama

VOCAB = 256  # the byte-level alphabet, so any text tokenizes without merges


def write_byte_level_tokenizer(folder, vocab_size=VOCAB):
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    # The last id is GPT-2's end-of-text token, which its tokenizer adds if absent.
    vocab = {ch: i for i, ch in enumerate(alphabet[: min(vocab_size, len(alphabet)) - 1])}
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"<extra_{i}>"] = i
    vocab["<|endoftext|>"] = vocab_size - 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    llm = save_random_llama(root / "llm", vocab_size=VOCAB)
    save_random_llama(root / "ssm", vocab_size=VOCAB, noise_from=llm)
    write_byte_level_tokenizer(root / "llm")
    save_random_llama(root / "other_vocab", vocab_size=128)
    (root / "prompts.json").write_text(json.dumps(["hello there", "a b c"]))
    return root


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_full_run_writes_json_lines(model_dirs, capsys, tmp_path):
    out = tmp_path / "out.jsonl"
    code, stdout, err = run_cli([
        "--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"), "--ssm", "self:1",
        "--prompt-file", str(model_dirs / "prompts.json"), "--max-new-tokens", "8", "--expansion", "1,2,1",
        "--max-sequence-length", "128", "--output", str(out), "--quiet",
    ], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["hello there", "a b c"]
    for line in lines:
        assert len(line["tokens"]) == 8 and line["llm_steps"] >= 1 and line["mean_tokens_per_step"] >= 1
        assert set(line) >= {"text", "tokens", "llm_steps", "mean_tokens_per_step", "finish_reason"}
    assert "tokens per LLM step" in stdout and "speed-up" in stdout and "outputs identical" in stdout


# Bad flags given straight: (case, the flags that differ from a good run's, the error's words).
FLAG_CASES = [
    ("empty-prompt", {"--prompt": "   "}, "is empty"),
    ("prompt-too-long", {"--prompt": "x" * 600}, "leaves no room"),
    ("bad-expansion", {"--expansion": "1,x,2"}, "expansion must be"),
    ("zero-expansion", {"--expansion": "1,0"}, "expansion must be"),
    ("bad-self-ssm", {"--ssm": "self:abc"}, "self:N"),
    ("tree-nodes-without-tree", {"--tree-nodes": "4"}, "--tree-nodes cuts a tree"),
    ("negative-temperature", {"--temperature": "-1"}, "--temperature must be >= 0"),
    ("zero-gpu-budget", {"--gpu-memory-gb": "0"}, "gpu_memory_gb must be > 0"),
    ("negative-pinned-budget", {"--pinned-memory-gb": "-2"}, "pinned_memory_gb must be >= 0"),
]
# Bad files: each case writes what it names under tmp_path (`_bad_file_flags`).
FILE_CASES = [
    ("missing-llm", "does not exist"),
    ("no-config", "no config.json"),
    ("bad-config", "not valid JSON"),
    ("no-weights", "no *.safetensors"),
    ("bad-gguf", "not a readable GGUF"),
    ("tokenizer-too-big", "does not belong"),
    ("ssm-other-vocab", "share the LLM's tokenizer"),
    ("bad-json", "not valid JSON"),
    ("json-not-list", "JSON list of strings"),
    ("missing-tree", "cannot read tree file"),
    ("bad-tree", "lacks its parent"),
]


def _bad_file_flags(case: str, model_dirs, tmp_path) -> dict:
    if case == "missing-llm":
        return {"--llm": str(tmp_path / "nowhere")}
    if case == "no-config":
        return {"--llm": str(tmp_path)}
    if case in ("bad-config", "no-weights"):
        config = "{not json" if case == "bad-config" else (model_dirs / "llm" / "config.json").read_text()
        (tmp_path / "config.json").write_text(config)
        return {"--llm": str(tmp_path)}
    if case == "bad-gguf":
        (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
        return {"--llm": str(tmp_path / "model.gguf"), "--tokenizer": str(model_dirs / "llm")}
    if case == "tokenizer-too-big":
        write_byte_level_tokenizer(tmp_path, vocab_size=VOCAB + 64)
        return {"--tokenizer": str(tmp_path)}
    if case == "ssm-other-vocab":
        return {"--ssm": str(model_dirs / "other_vocab")}
    if case in ("bad-json", "json-not-list"):
        (tmp_path / "p.json").write_text("[\"unterminated" if case == "bad-json" else json.dumps({"prompt": "hi"}))
        return {"--prompt-file": str(tmp_path / "p.json")}
    if case == "bad-tree":
        (tmp_path / "tree.json").write_text(json.dumps({"paths": [[0], [1, 0, 0]]}))
    return {"--tree": str(tmp_path / "tree.json")}  # missing-tree: never written


@pytest.mark.parametrize("case,flags,expected", [pytest.param(*case, id=case[0]) for case in FLAG_CASES] +
                         [pytest.param(case, None, expected, id=case) for case, expected in FILE_CASES])
def test_bad_input_gives_one_clear_error(model_dirs, tmp_path, capsys, case, flags, expected):
    args = {"--llm": str(model_dirs / "llm"), "--prompt": "hi", "--no-chat-template": None, "--max-new-tokens": "2",
            "--max-sequence-length": "128", "--ssm": "self:1"}
    args.update(flags if flags is not None else _bad_file_flags(case, model_dirs, tmp_path))
    argv = [item for key, value in args.items() for item in ([key] if value is None else [key, value])]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("specinfer: error:") and expected in err, err
    assert "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "specinfer", "--llm", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", ["incremental", "tree"])
def test_overlapped_plain_steps_give_the_same_output(model_dirs, capsys, tmp_path, mode):
    """`--overlap` (plain steps queued ahead of their read-back; on by default with CUDA) on a CPU, through
    the CLI and the Python API's generate loop: the same tokens as without."""
    outputs = {}
    for flag in ("--overlap", "--no-overlap"):
        out = tmp_path / f"{flag}.jsonl"
        code, _, err = run_cli([
            "--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"), "--mode", mode,
            "--prompt-file", str(model_dirs / "prompts.json"), "--max-new-tokens", "12",
            "--max-sequence-length", "128", "--output", str(out), "--quiet", "--no-compare", flag,
        ], capsys)
        assert code == 0, err
        outputs[flag] = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
    assert outputs["--overlap"] == outputs["--no-overlap"] and all(len(t) == 12 for t in outputs["--overlap"])


def test_help_describes_every_flag():
    from specinfer.cli import build_parser

    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_draft_vocabulary_from_a_ranking_file(model_dirs, tmp_path, capsys):
    """--draft-vocab-file: the SSM scores the file's first tokens, completed by id; output stays exact."""
    from specinfer import LLM, EngineConfig
    from specinfer.models.draft_vocab import write_ranking

    ranking = tmp_path / "draft_vocab.json"
    write_ranking(ranking, [200, 7, 99], "a test")
    llm = LLM(str(model_dirs / "llm"), ssms=[str(model_dirs / "ssm")],
              engine=EngineConfig(max_sequence_length=128, draft_vocab_size=5, draft_vocab_file=str(ranking)))
    assert llm.ssms[0].lm_head.token_ids.tolist() == [0, 1, 7, 99, 200]
    assert not hasattr(llm.model.lm_head, "token_ids")
    code, out, _ = run_cli(["--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"), "--draft-vocab", "64",
                            "--draft-vocab-file", str(ranking), "--prompt", "hello", "--max-new-tokens", "8",
                            "--max-sequence-length", "128"], capsys)
    assert code == 0 and "outputs identical" in out
    (tmp_path / "bad.json").write_text("[1, 2]")
    code, _, err = run_cli(["--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"),
                            "--draft-vocab-file", str(tmp_path / "bad.json"), "--prompt", "hi",
                            "--max-sequence-length", "128"], capsys)
    assert code != 0 and "draft vocabulary file" in err and "Traceback" not in err


def test_overlapped_tree_steps_give_the_same_output(model_dirs, capsys, tmp_path):
    """`--overlap-trees` (each next draft launched from the device before the read-back) with a fixed tree,
    through the CLI: the same tokens as without."""
    outputs = {}
    for flags in ([], ["--overlap-trees"]):
        out = tmp_path / f"{len(flags)}.jsonl"
        code, _, err = run_cli([
            "--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"), "--no-adaptive",
            "--prompt-file", str(model_dirs / "prompts.json"), "--max-new-tokens", "40",
            "--max-sequence-length", "128", "--output", str(out), "--quiet", "--no-compare", *flags,
        ], capsys)
        assert code == 0, err
        outputs[len(flags)] = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
    assert outputs[1] == outputs[0] and all(len(t) == 40 for t in outputs[1])


def test_warm_up_serves_each_mode_once_untimed_and_changes_no_output(model_dirs, capsys, tmp_path, monkeypatch):
    """`--warm-up` (the default): each mode serves the prompts once, at most WARM_UP_TOKENS new tokens,
    before the timed runs; the timed outputs are those of a run without it."""
    from specinfer.cli import WARM_UP_TOKENS
    from specinfer.llm import LLM

    calls = []
    generate = LLM.generate

    def spy(self, prompts, config=None, *args, **kwargs):
        calls.append((kwargs.get("mode"), config.max_new_tokens))
        return generate(self, prompts, config, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate", spy)
    outputs = {}
    for flags in (["--no-warm-up"], ["--warm-up"], []):  # [] : the default, on
        calls.clear()
        out = tmp_path / f"{flags[0] if flags else 'default'}.jsonl"
        code, stdout, err = run_cli([
            "--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"),
            "--prompt-file", str(model_dirs / "prompts.json"), "--max-new-tokens", "40",
            "--max-sequence-length", "128", "--output", str(out), "--quiet", *flags,
        ], capsys)
        assert code == 0, err
        assert "outputs identical" in stdout
        outputs[out.stem] = [json.loads(line)["tokens"] for line in out.read_text().splitlines()]
        timed = [("tree", 40), ("incremental", 40)]
        assert calls == (timed if flags == ["--no-warm-up"] else
                         [("tree", WARM_UP_TOKENS), ("incremental", WARM_UP_TOKENS)] + timed)
    assert outputs["--warm-up"] == outputs["--no-warm-up"] == outputs["default"]


def test_differing_greedy_outputs_are_held_to_the_rounding_bound(model_dirs):
    """The demo's verdict on outputs that differ: the top-two margin where they first differ, against the
    dtype's bound (a tie-break the LLM may take either way is equivalent; a wide margin is a bug)."""
    import dataclasses

    from specinfer import LLM, EngineConfig
    from specinfer.cli import compare_outputs
    from specinfer.exactness import top2_margin

    llm = LLM(str(model_dirs / "llm"), ["self:1"], engine=EngineConfig(max_sequence_length=128))
    baseline = llm.generate(["hello there"], mode="incremental", use_chat_template=False)
    assert compare_outputs(llm, baseline, baseline, False, sampled=False) == "outputs identical"
    tokens = baseline[0].output_tokens
    changed = dataclasses.replace(baseline[0], output_tokens=tokens[:3] + [(tokens[3] + 1) % VOCAB] + tokens[4:])
    margin = top2_margin(llm.model, llm.encode_prompt("hello there", False) + tokens[:3])
    verdict = compare_outputs(llm, [changed], baseline, False, sampled=False)
    assert f"{margin:.3g} apart" in verdict and "0 of 1 identical" in verdict
    assert ("NOT equivalent" in verdict) == (margin > 1e-3)
    assert "sampled" in compare_outputs(llm, [changed], baseline, False, sampled=True)


def test_ssm_quantization_flag(model_dirs, capsys):
    """--ssm-quantization quantizes the SSMs' own layers (not the LLM's); output stays exact; a group size
    that does not divide the SSM's widths is a clear error."""
    from specinfer import LLM, EngineConfig
    from specinfer.quant import QuantizedLinear

    llm = LLM(str(model_dirs / "llm"), ssms=[str(model_dirs / "ssm")],
              engine=EngineConfig(max_sequence_length=128, ssm_quantization="int4", quant_group_size=32))
    assert any(isinstance(m, QuantizedLinear) for m in llm.ssms[0].modules())
    assert not any(isinstance(m, QuantizedLinear) for m in llm.model.modules())
    code, out, _ = run_cli(["--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"), "--ssm-quantization",
                            "int8", "--prompt", "hello", "--max-new-tokens", "8", "--max-sequence-length", "128"], capsys)
    assert code == 0 and "outputs identical" in out
    code, _, err = run_cli(["--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"), "--ssm-quantization",
                            "int4", "--quant-group-size", "48", "--prompt", "hi", "--max-sequence-length", "128"], capsys)
    assert code != 0 and "group size" in err and "Traceback" not in err


def test_quantize_lm_head_flag(model_dirs, capsys):
    """--quantize-lm-head quantizes the LLM's LM head beside its layers (the embedding stays); speculation
    stays exact to the quantized model; without --quantization it is a clear error."""
    from specinfer import LLM, EngineConfig
    from specinfer.quant import QuantizedLinear

    llm = LLM(str(model_dirs / "llm"), ssms=[str(model_dirs / "ssm")],
              engine=EngineConfig(max_sequence_length=128, quantization="int4", quant_group_size=32,
                                  quantize_lm_head=True))
    assert isinstance(llm.model.lm_head, QuantizedLinear) and isinstance(llm.model.embed_tokens, torch.nn.Embedding)
    code, out, _ = run_cli(["--llm", str(model_dirs / "llm"), "--ssm", str(model_dirs / "ssm"), "--quantization",
                            "int8", "--quantize-lm-head", "--prompt", "hello", "--max-new-tokens", "8",
                            "--max-sequence-length", "128"], capsys)
    assert code == 0 and "outputs identical" in out
    code, _, err = run_cli(["--llm", str(model_dirs / "llm"), "--quantize-lm-head", "--prompt", "hi",
                            "--max-sequence-length", "128"], capsys)
    assert code == 2 and "quantize_lm_head needs quantization" in err and "Traceback" not in err
