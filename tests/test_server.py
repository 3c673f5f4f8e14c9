"""`specinfer serve` as users meet it: a real server process on 127.0.0.1, the official `openai` client and
raw HTTP, under load and under faults. The LLM is a small random LLaMA with SmolLM2's tokenizer (so chat
templates and real text work) and a noisy copy of it as the SSM (so speculation accepts some tokens)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from specinfer.distributed.launch import free_port
from specinfer.exactness import divergence_margin
from specinfer.models.loader import load_model
from specinfer.tokenizer import load_tokenizer

from .conftest import save_random_llama

openai = pytest.importorskip("openai")

MODEL = "tiny-llama"
CONTEXT = 160
FP32_BOUND = 1e-4  # the stated fp32 rounding bound of the CPU tests (README, "Exactness under rounding")
PROMPTS = [
    "Tell me about the sea.",
    "Why is the sky blue?",
    "List three fruits",
    "Write a haiku about autumn leaves falling on a quiet pond",
    "a",
    "How do I sort a list in Python? Show an example.",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_gguf):
    root = tmp_path_factory.mktemp("server")
    tokenizer = load_tokenizer(default_gguf)
    vocab = len(tokenizer.hf)
    shape = dict(vocab_size=vocab, max_position_embeddings=256, eos_token_id=tokenizer.hf.eos_token_id)
    llm = save_random_llama(root / "llm", **shape)
    tokenizer.hf.save_pretrained(root / "llm")
    save_random_llama(root / "ssm", noise_from=llm, **shape)
    return root



class ServerProcess:
    def __init__(self, root: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "specinfer", "serve", "--llm", str(root / "llm"), "--ssm", str(root / "ssm"),
               "--served-model-name", MODEL, "--port", str(self.port), "--max-sequence-length", str(CONTEXT),
               "--expansion", "1,2,1", "--no-adaptive", "--log-level", "warning", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        # A session of its own, so that stop() also ends any tensor-parallel ranks it spawned.
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", **kwargs)

    def metric(self, prefix: str) -> float:
        """Sum of the samples whose name (and labels) start with `prefix`."""
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(prefix) and line[len(prefix)] in " {},")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def server(model_dir):
    s = ServerProcess(model_dir, "--max-batch-size", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def token_ids(model_dir):
    tokenizer = load_tokenizer(model_dir / "llm")
    return [tokenizer.encode(p) for p in PROMPTS]


def _complete(url: str, prompt, max_tokens: int = 16, **fields) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            **fields}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_openai_client_completes_chats_and_streams(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]

    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.choices[0].text
    assert done.usage.completion_tokens == 12 or done.choices[0].finish_reason == "stop"
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                         temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 10  # the chat template wraps the messages
    parts = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_choices_seeds_and_stop_strings(server):
    client = server.client()
    kwargs = dict(model=MODEL, prompt="Tell me a story", max_tokens=12, temperature=1.0, seed=7, n=3)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # a seed fixes the samples
    assert len({c.text for c in first.choices}) > 1  # choices draw with different seeds
    assert 3 <= first.usage.completion_tokens <= 36 and first.usage.prompt_tokens == again.usage.prompt_tokens

    full = client.completions.create(model=MODEL, prompt="Why is the sky blue?", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    cut = client.completions.create(model=MODEL, prompt="Why is the sky blue?", max_tokens=24, temperature=0,
                                    stop=[stop, "never-appears"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Why is the sky blue?", max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def _same_or_tie(model, prompt: list[int], alone: list[int], together: list[int]) -> None:
    margin = divergence_margin(model, prompt, alone, together)
    assert margin is None or margin <= FP32_BOUND, f"outputs differ where the LLM's top-two margin is {margin}"


def test_load_every_request_answered_and_exact(server, model_dir, token_ids):
    alone = [_complete(server.url, ids)["choices"][0]["token_ids"] for ids in token_ids]
    num_requests, num_clients = 200, 32

    async def run() -> list[tuple[int, dict]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(num_requests):
            queue.put_nowait(i)
        results = []

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                k = i % len(PROMPTS)
                if i % 3 == 0:  # a third stream, the rest take one JSON body
                    stream = await client.completions.create(
                        model=MODEL, prompt=token_ids[k], max_tokens=16, temperature=0, stream=True,
                        extra_body={"return_token_ids": True})
                    ids = [t async for chunk in stream for c in chunk.choices for t in c.model_extra["token_ids"]]
                else:
                    reply = await client.completions.create(
                        model=MODEL, prompt=token_ids[k], max_tokens=16, temperature=0,
                        extra_body={"return_token_ids": True})
                    ids = reply.choices[0].model_extra["token_ids"]
                results.append((k, ids))

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(num_clients))), timeout=600)
        await client.close()
        return results

    start = time.time()
    results = asyncio.run(run())
    assert len(results) == num_requests  # every request answered; any error would have raised
    model = load_model(model_dir / "llm", torch.device("cpu"), torch.float32)
    for k, ids in results:
        _same_or_tie(model, token_ids[k], alone[k], ids)
    assert server.metric("specinfer_requests_total") >= num_requests
    assert httpx.get(server.url + "/health").json()["outstanding_requests"] == 0
    print(f"{num_requests} requests from {num_clients} clients in {time.time() - start:.1f} s")


@pytest.mark.parametrize("body, status, param", [
    ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -3}, 422, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 422, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 422, "temperature"),
    ({"model": MODEL, "prompt": 42}, 422, "prompt"),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 422, "n"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 422, "top_p"),
    ({"model": MODEL}, 422, "prompt"),
    ({"model": MODEL, "prompt": "hi " * 400}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_malformed_and_misrouted_requests(server):
    url = server.url
    bad_json = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": ', timeout=30,
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    chat_errors = [
        ({"model": MODEL, "messages": []}, 422),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 422),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 400}]}, 400),
    ]
    for body, status in chat_errors:
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == status and "error" in reply.json(), reply.text
    assert httpx.get(url + "/v1/nowhere").status_code == 404
    assert httpx.get(url + "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        server.client(max_retries=0).completions.create(model="gpt-4", prompt="hi")
    assert _complete(url, "still serving")["choices"][0]["text"] is not None


def test_client_disconnect_cancels_and_frees_its_slot(server):
    cancelled = server.metric("specinfer_requests_total{outcome=\"cancelled\"")
    body = {"model": MODEL, "prompt": "Go on and on", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it started streaming
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["outstanding_requests"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["outstanding_requests"] == 0
    assert server.metric("specinfer_requests_total{outcome=\"cancelled\"") == cancelled + 1
    assert _complete(server.url, "after a disconnect")["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("flags", [("--mode", "incremental", "--overlap"), ("--no-adaptive", "--overlap-trees")])
def test_servers_with_steps_in_flight_answer_as_the_tree_server(server, model_dir, token_ids, flags):
    """`--overlap` (on by default with CUDA; here forced on the CPU): plain steps queued ahead of their
    read-back; `--overlap-trees`: each next draft launched before the read-back. Under load, with stop
    strings, a sampled neighbour and a client that disconnects."""
    alone = [_complete(server.url, ids)["choices"][0]["token_ids"] for ids in token_ids]
    overlapped = ServerProcess(model_dir, *flags, "--max-batch-size", "4")
    try:
        body = {"model": MODEL, "prompt": "Go on and on", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True}
        with httpx.stream("POST", overlapped.url + "/v1/completions", json=body, timeout=60) as reply:
            assert next(line for line in reply.iter_lines() if line.startswith("data:"))  # then it disconnects

        async def run() -> list[tuple[int, list[int]]]:
            client = openai.AsyncOpenAI(base_url=overlapped.url + "/v1", api_key="unused", max_retries=0, timeout=120)

            async def one(i: int) -> tuple[int, list[int]]:
                k = i % len(PROMPTS)
                if i % 7 == 3:  # sampled requests ride along
                    await client.completions.create(model=MODEL, prompt=token_ids[k], max_tokens=8, temperature=1.0, n=2)
                    return -1, []
                reply = await client.completions.create(model=MODEL, prompt=token_ids[k], max_tokens=16, temperature=0,
                                                        extra_body={"return_token_ids": True})
                return k, reply.choices[0].model_extra["token_ids"]

            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), timeout=600)
            await client.close()
            return results

        results = asyncio.run(run())
        model = load_model(model_dir / "llm", torch.device("cpu"), torch.float32)
        for k, ids in results:
            if k >= 0:
                _same_or_tie(model, token_ids[k], alone[k], ids)
        full = _complete(overlapped.url, "Why is the sky blue?", 24)["choices"][0]["text"]
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        cut = _complete(overlapped.url, "Why is the sky blue?", 24, stop=[stop])["choices"][0]
        assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
        assert httpx.get(overlapped.url + "/health").json()["outstanding_requests"] == 0
    finally:
        overlapped.stop()


def test_full_server_sheds_load_and_drains_on_sigterm(model_dir):
    s = ServerProcess(model_dir, "--max-batch-size", "2", "--max-queued-requests", "2")
    try:
        body = {"model": MODEL, "prompt": "Count with me", "max_tokens": 140, "temperature": 0}

        async def burst(n: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(client.post(s.url + "/v1/completions", json=body) for _ in range(n)))

        replies = asyncio.run(burst(12))
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 4, statuses
        busy = next(r for r in replies if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "server_overloaded"
        # The openai client retries a 503 after Retry-After, so it gets through once the burst is over.
        assert s.client(max_retries=5).completions.create(model=MODEL, prompt="hi", max_tokens=4).choices

        # SIGTERM while streams are in flight: they finish in full, then the process exits cleanly.
        async def streams_then_sigterm() -> list[list[dict]]:
            started = asyncio.Semaphore(0)
            async with httpx.AsyncClient(timeout=120) as client:
                async def one() -> list[dict]:
                    chunks = []
                    async with client.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data:") and line != "data: [DONE]":
                                chunks.append(json.loads(line[5:]))
                                if len(chunks) == 1:
                                    started.release()
                    return chunks

                tasks = [asyncio.create_task(one()) for _ in range(3)]
                for _ in tasks:
                    await started.acquire()
                s.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        finished = asyncio.run(streams_then_sigterm())
        for chunks in finished:
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == 140
        assert s.proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()


def test_tensor_parallel_server_matches_single_process(server, model_dir, token_ids):
    """--tensor-parallel-size 2 (gloo on CPU): rank 0 serves HTTP and rank 1 replays its engine calls.
    Concurrent requests (so registrations and steps interleave) give the single-process server's greedy
    tokens, up to fp32 rounding ties (the all-reduce sums in another order); SIGTERM ends both ranks."""
    prompts = token_ids[:4]
    alone = [_complete(server.url, ids, max_tokens=12)["choices"][0]["token_ids"] for ids in prompts]
    s = ServerProcess(model_dir, "--tensor-parallel-size", "2", "--max-batch-size", "4")
    try:
        async def together() -> list[list[int]]:
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            replies = await asyncio.gather(*(client.completions.create(
                model=MODEL, prompt=ids, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
                for ids in prompts))
            await client.close()
            return [r.choices[0].model_extra["token_ids"] for r in replies]

        model = load_model(model_dir / "llm", torch.device("cpu"), torch.float32)
        for _ in range(2):  # the second round after the first has left: ids and slots keep agreeing
            for ids, expected, got in zip(prompts, alone, asyncio.run(together())):
                _same_or_tie(model, ids, expected, got)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()
