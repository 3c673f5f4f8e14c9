"""The HTTP server under load: throughput and latency percentiles against concurrent clients, with
speculation on and off, in one run on the same prompts.

    python benchmarks/serving.py                              # default model, CPU
    python benchmarks/serving.py --device cuda --clients 1,8,32,64

For each mode a `specinfer serve` process is started on 127.0.0.1; at each concurrency level that many
clients send streaming chat requests (greedy) back to back until `--requests` have been answered.
Time to first token is measured at the client (first content chunk); tokens per LLM step come from the
server's /metrics. Writes JSON and a Markdown table (device, torch version, date) to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from specinfer.distributed.launch import free_port

PROMPTS = [
    "What are three good reasons to learn a second language? Answer briefly.",
    "Write a short poem about the ocean.",
    "Explain what a hash table is to a new programmer.",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the difference between weather and climate?",
    "List five tips for better sleep.",
    "How does a bicycle stay upright?",
]
MODEL = "bench"



def start_server(args: argparse.Namespace, mode: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "specinfer", "serve", "--port", str(port), "--served-model-name", MODEL,
           "--mode", mode, "--device", args.device, "--max-batch-size", str(args.max_batch_size),
           "--max-sequence-length", "1024", "--log-level", "warning"]
    if args.llm:
        cmd += ["--llm", args.llm]
    for ssm in args.ssm or []:
        cmd += ["--ssm", ssm]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 10 minutes")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {await reply.aread()!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def load(url: str, clients: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    todo = list(range(requests))
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker() -> None:
            while todo:
                i = todo.pop()
                results.append(await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return results, time.perf_counter() - start


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_report(args: argparse.Namespace, rows: list[dict]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "serving_gpu" if args.device.startswith("cuda") else "serving_cpu"
    meta = {
        "date": datetime.date.today().isoformat(), "device": device_name(args.device), "torch": torch.__version__,
        "model": args.llm or "SmolLM2-135M-Instruct (default)", "ssms": args.ssm or ["default draft"],
        "max_tokens": args.max_tokens, "requests_per_level": args.requests, "max_batch_size": args.max_batch_size,
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
    }
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Serving under load ({'GPU' if args.device.startswith('cuda') else 'CPU'})", "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · model {meta['model']} · SSMs "
        f"{', '.join(meta['ssms'])} · streaming chat, greedy, max_tokens {args.max_tokens} · "
        f"{args.requests} requests per row · max batch {args.max_batch_size}", "",
        f"Reproduce: `{meta['command']}`", "",
        "| mode | clients | requests/s | output tokens/s | latency p50 / p90 / p99 (s) | TTFT p50 / p90 / p99 (s) "
        "| tokens per LLM step |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['latency_p50']:.2f} / {r['latency_p90']:.2f} / {r['latency_p99']:.2f} | "
            f"{r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} / {r['ttft_p99']:.2f} | {r['tokens_per_step']:.2f} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="LLM path (default: the default model)")
    p.add_argument("--ssm", action="append", help="SSM path(s) (default: the default draft)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--modes", default="tree,incremental", help="speculation modes to compare")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()
    rows = []
    for mode in args.modes.split(","):
        proc, url = start_server(args, mode)
        try:
            asyncio.run(load(url, 1, 2, 8))  # warm-up (graph capture, allocator)
            for clients in [int(c) for c in args.clients.split(",")]:
                steps0, accepted0 = metric(url, "specinfer_llm_steps_total"), metric(
                    url, "specinfer_accepted_speculated_tokens_total")
                results, elapsed = asyncio.run(load(url, clients, args.requests, args.max_tokens))
                steps = metric(url, "specinfer_llm_steps_total") - steps0
                accepted = metric(url, "specinfer_accepted_speculated_tokens_total") - accepted0
                latency = [r["latency"] for r in results]
                ttft = [r["ttft"] for r in results]
                row = {
                    "mode": mode, "clients": clients, "requests": len(results), "seconds": elapsed,
                    "requests_per_s": len(results) / elapsed,
                    "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
                    "tokens_per_step": (accepted + steps) / steps if steps else 0.0,
                    **{f"latency_p{q}": percentile(latency, q) for q in (50, 90, 99)},
                    **{f"ttft_p{q}": percentile(ttft, q) for q in (50, 90, 99)},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_report(args, rows)
        finally:
            proc.terminate()
            proc.wait(timeout=120)


if __name__ == "__main__":
    main()
