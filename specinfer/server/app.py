"""The OpenAI-compatible HTTP front end (FastAPI). It validates, tokenizes, submits to the engine loop and
relays its events, as one JSON body or as server-sent events; it never runs the model itself."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import GenerationConfig
from ..errors import SpecInferError
from ..llm import LLM
from .engine_loop import EngineLoop, Event, Overloaded, ShuttingDown, Submission
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5  # how often a waiting handler checks whether its client is still there


class Server:
    """What the routes share: the loaded model, its engine loop and the metrics."""

    def __init__(self, llm: LLM, model_name: str, max_queued: int, manager=None) -> None:
        self.llm = llm
        self.model_name = model_name
        self.created = int(time.time())
        self.context_length = llm.engine_config.max_sequence_length
        self.metrics = Metrics()
        self.engine = EngineLoop(manager or llm.manager, llm.tokenizer, max_queued, self.metrics)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def plan(self, prompts: list[list[int]], body: CompletionRequest | ChatCompletionRequest,
             max_tokens: int | None) -> list[tuple[list[int], GenerationConfig]]:
        """Per choice, its prompt and sampling settings; refuses what cannot fit the context."""
        if body.top_k > self.llm.model.config.vocab_size:
            raise APIError(400, f"top_k {body.top_k} exceeds the vocabulary size", "top_k")
        plans = []
        for tokens in prompts:
            if not tokens:
                raise APIError(400, "the prompt is empty", "prompt")
            vocab = self.llm.model.config.vocab_size
            if any(not 0 <= t < vocab for t in tokens):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
            room = self.context_length - len(tokens)
            wanted = max_tokens if max_tokens is not None else room
            if room < 1 or wanted > room:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                    f"{len(tokens) + max(wanted, 1)} tokens ({len(tokens)} in the prompt, {max(wanted, 1)} for the "
                    "completion). Please reduce the prompt or the completion length.",
                    "max_tokens" if room >= 1 else "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                    "context_length_exceeded",
                )
            for j in range(body.n):
                seed = body.seed + j if body.seed is not None else random.getrandbits(63)
                sampling = GenerationConfig(
                    do_sample=body.temperature > 0, temperature=body.temperature or 1.0, top_p=body.top_p,
                    top_k=body.top_k, seed=seed, max_new_tokens=wanted,
                )
                plans.append((tokens, sampling))
        return plans

    def submit(self, plans, stop: list[str]) -> tuple[list[Submission], asyncio.Queue]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        submissions = [Submission(i, tokens, sampling, stop, events, loop) for i, (tokens, sampling) in enumerate(plans)]
        try:
            self.engine.submit(submissions)
        except Overloaded:
            self.metrics.requests.labels(outcome="rejected").inc(len(submissions))
            raise APIError(503, "The server is at capacity; retry after a moment", code="server_overloaded",
                           type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown:
            raise APIError(503, "The server is shutting down", code="shutting_down", type="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return submissions, events


def build_app(llm: LLM, model_name: str, max_queued: int = 256, manager=None) -> FastAPI:
    """`manager`: what the engine loop drives, by default `llm.manager` (tensor parallelism passes its
    rank-0 `LockstepManager`)."""
    server = Server(llm, model_name, max_queued, manager)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        # uvicorn has already let the requests in flight finish; this ends the engine thread.
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="specinfer", version="0.1.0", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "outstanding_requests": server.engine.outstanding}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return _model_card(server)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        body.refuse_unsupported()
        prompts = _completion_prompts(body.prompt, llm)
        plans = server.plan(prompts, body, body.max_tokens)
        submissions, events = server.submit(plans, body.stop_strings())
        reply = _Reply("cmpl", server.model_name, prompts, body.n, body.return_token_ids)
        stream = _relay(server.engine, submissions, events, request)
        if body.stream:
            return _sse(reply.completion_chunks(stream, _include_usage(body)))
        return await reply.completion(stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        body.refuse_unsupported()
        try:
            prompt = llm.tokenizer.encode_messages([{"role": m.role, "content": m.text()} for m in body.messages])
        except SpecInferError as err:
            raise APIError(400, str(err), "messages") from None
        plans = server.plan([prompt], body, body.output_limit())
        submissions, events = server.submit(plans, body.stop_strings())
        reply = _Reply("chatcmpl", server.model_name, [prompt], body.n, body.return_token_ids)
        stream = _relay(server.engine, submissions, events, request)
        if body.stream:
            return _sse(reply.chat_chunks(stream, _include_usage(body)))
        return await reply.chat(stream)

    return app


# --- requests in -----------------------------------------------------------------------------------


def _completion_prompts(prompt, llm: LLM) -> list[list[int]]:
    """OpenAI's four prompt shapes: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [llm.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if isinstance(prompt[0], str):
        return [llm.tokenizer.encode(p) for p in prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(p) for p in prompt]


async def _relay(engine: EngineLoop, submissions: list[Submission], events: asyncio.Queue,
                 request: Request) -> AsyncIterator[Event]:
    """The engine's events for these choices until each has finished; cancels the rest if the client
    disconnects or the consumer stops early."""
    pending = {s.index for s in submissions}
    try:
        while pending:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if event.finish_reason is not None:
                pending.discard(event.index)
            yield event
    finally:
        if pending:
            engine.cancel([s for s in submissions if s.index in pending])


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def encode():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# --- responses out ---------------------------------------------------------------------------------


class _Reply:
    """Builds one response (or its stream of chunks) in the OpenAI format."""

    def __init__(self, prefix: str, model: str, prompts: list[list[int]], n: int, with_token_ids: bool) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.with_token_ids = with_token_ids
        # Choices of one prompt share it, so it counts once in `usage`, as OpenAI counts it for n > 1.
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.num_choices = len(prompts) * n
        self.completion_tokens: dict[int, int] = {}  # per finished choice

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    @staticmethod
    def _finish_reason(event: Event) -> str | None:
        return "stop" if event.finish_reason == "cancelled" else event.finish_reason

    async def _collect(self, stream: AsyncIterator[Event]) -> list[dict]:
        choices: dict[int, dict] = {}
        async with aclosing(stream):  # if we stop early (an error), the rest is cancelled at once
            async for event in stream:
                if event.error is not None:
                    raise APIError(500, event.error, type="server_error")
                choice = choices.setdefault(event.index, {"text": [], "token_ids": [], "finish_reason": None})
                choice["text"].append(event.text)
                choice["token_ids"].extend(event.token_ids)
                if event.finish_reason is not None:
                    choice["finish_reason"] = self._finish_reason(event)
                    self.completion_tokens[event.index] = event.completion_tokens
        return [{"index": i, **choices[i], "text": "".join(choices[i]["text"])} for i in sorted(choices)]

    def _with_ids(self, choice: dict, token_ids: list[int]) -> dict:
        if self.with_token_ids:
            choice["token_ids"] = token_ids
        return choice

    async def completion(self, stream: AsyncIterator[Event]) -> dict:
        choices = [
            self._with_ids({"index": c["index"], "text": c["text"], "logprobs": None,
                            "finish_reason": c["finish_reason"]}, c["token_ids"])
            for c in await self._collect(stream)
        ]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage()}

    async def chat(self, stream: AsyncIterator[Event]) -> dict:
        choices = [
            self._with_ids({"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                            "logprobs": None, "finish_reason": c["finish_reason"]}, c["token_ids"])
            for c in await self._collect(stream)
        ]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}

    def completion_chunks(self, stream: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[dict]:
        return self._chunks(stream, include_usage, "text_completion",
                            lambda event, first: {"text": event.text, "logprobs": None})

    def chat_chunks(self, stream: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[dict]:
        def delta(event: Event, first: bool) -> dict:
            d = {"role": "assistant", "content": event.text} if first else {"content": event.text}
            return {"delta": d, "logprobs": None}

        return self._chunks(stream, include_usage, "chat.completion.chunk", delta)

    async def _chunks(self, stream: AsyncIterator[Event], include_usage: bool, object_name: str,
                      content: Callable[[Event, bool], dict]) -> AsyncIterator[dict]:
        started: set[int] = set()
        async with aclosing(stream):
            async for event in stream:
                if event.error is not None:
                    yield error_body(event.error, "server_error")
                    return
                quiet = not event.text and not (self.with_token_ids and event.token_ids)
                if quiet and event.finish_reason is None and event.index in started:
                    continue  # tokens that add no text yet (held back for a stop string or a partial character)
                choice = self._with_ids({"index": event.index, **content(event, event.index not in started),
                                         "finish_reason": self._finish_reason(event)}, event.token_ids)
                started.add(event.index)
                chunk = {**self._head(object_name), "choices": [choice]}
                if event.finish_reason is not None:
                    self.completion_tokens[event.index] = event.completion_tokens
                    if len(self.completion_tokens) == self.num_choices:
                        chunk["usage"] = self.usage()  # usage in every response: on the stream's last chunk
                yield chunk
        if include_usage:
            yield {**self._head(object_name), "choices": [], "usage": self.usage()}


def _model_card(server: Server) -> dict:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "specinfer",
            "max_model_len": server.context_length}


# --- errors ----------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"The body is not valid JSON: {first.get('msg', '')}"), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = loc[0] if loc else None  # the top-level field, as OpenAI names it
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors
        )
        return JSONResponse(error_body(message, param=where, code="invalid_value"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), type_), status_code=err.status_code,
                            headers=getattr(err, "headers", None))
