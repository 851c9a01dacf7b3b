"""OpenAI-compatible HTTP API on FastAPI + uvicorn, in front of the batching Engine.

FastAPI/pydantic do the HTTP and request validation, uvicorn the serving and the graceful shutdown on
SIGTERM (stop accepting, finish in-flight requests, then stop the engine). lmforge adds the OpenAI
request/response shapes, the API key check and server-sent-event streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.errors import LmforgeError
from lmforge.inference.engine import Engine, Job
from lmforge.inference.generate import Completion, GenerationOptions, encode_prompt


# ------------------------------------------------------------------------------------------ request bodies
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields lmforge has no use for (user, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not in the OpenAI API; vLLM and others accept it too
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _message_text(msg: ChatMessage, i: int) -> str:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or ""
    parts = []
    for part in msg.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise HTTPException(400, f"messages[{i}].content: only text parts are supported")
        parts.append(part["text"])
    return "".join(parts)


# ------------------------------------------------------------------------------------------ the app
class Api:
    def __init__(self, engine: Engine, model_id: str, api_key: str | None, default_max_tokens: int):
        self.engine = engine
        self.model_id = model_id
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.tok = engine.generator.tok
        config = engine.generator.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def check_key(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise HTTPException(401, "invalid or missing API key (send Authorization: Bearer KEY)")

    def options(self, req: _Sampling, max_tokens: int | None) -> GenerationOptions:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenerationOptions(max_new_tokens=max_tokens or self.default_max_tokens, do_sample=req.temperature > 0,
                                 temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, stop=stop,
                                 seed=req.seed or 0)

    def jobs(self, req: _Sampling, prompts: list[list[int]], max_tokens: int | None) -> tuple[list[Job], asyncio.Queue]:
        if req.model != self.model_id:
            raise HTTPException(404, f"model {req.model!r} is not served here; this server has {self.model_id!r}")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        jobs = []
        for p in prompts:
            opts = self.options(req, max_tokens)
            if self.context and len(p) >= self.context:
                raise HTTPException(400, f"the prompt has {len(p)} tokens; the model's context is {self.context}")
            if self.context and len(p) + opts.max_new_tokens > self.context:
                if max_tokens:
                    raise HTTPException(400, f"prompt ({len(p)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                             f"model's context of {self.context}")
                opts.max_new_tokens = self.context - len(p)
            for _ in range(req.n):  # choice i of a seeded request samples with seed + i, so the n choices differ
                jobs.append(Job(p, GenerationOptions(**{**opts.__dict__, "seed": opts.seed + len(jobs)}), loop,
                                events, index=len(jobs), seeded=req.seed is not None, stream=req.stream))
        for job in jobs:
            self.engine.submit(job)
        return jobs, events

    async def results(self, jobs: list[Job], events: asyncio.Queue) -> list[Completion]:
        out: list[Completion | None] = [None] * len(jobs)
        pending = len(jobs)
        while pending:
            index, kind, value = await events.get()
            if kind == "error":
                raise HTTPException(503, value)
            if kind == "done":
                out[index] = value
                pending -= 1
        return out  # type: ignore[return-value]


def _usage(results: list[Completion], n: int) -> dict:
    prompt = sum(r.prompt_tokens for r in results) // n  # each prompt is counted once, not once per choice
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(jobs: list[Job], events: asyncio.Queue, chunk, final_chunk, include_usage: bool, n: int):
    """Server-sent events: one chunk per text delta, a last chunk with finish_reason per choice, then [DONE]."""
    sent = [""] * len(jobs)
    results: list[Completion] = []
    pending = len(jobs)
    while pending:
        index, kind, value = await events.get()
        if kind == "error":
            yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
            return
        if kind == "delta":
            sent[index] += value
            yield f"data: {json.dumps(chunk(index, value))}\n\n"
            continue
        pending -= 1
        results.append(value)
        rest = value.text[len(sent[index]):] if value.text.startswith(sent[index]) else ""
        if rest:
            yield f"data: {json.dumps(chunk(index, rest))}\n\n"
        yield f"data: {json.dumps(final_chunk(index, value.finish_reason))}\n\n"
    if include_usage:
        yield f"data: {json.dumps(final_chunk(None, None, _usage(results, n)))}\n\n"
    yield "data: [DONE]\n\n"


def create_app(engine: Engine, model_id: str, api_key: str | None = None, default_max_tokens: int = 256) -> FastAPI:
    api = Api(engine, model_id, api_key, default_max_tokens)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()  # uvicorn gets here after in-flight requests finished (graceful shutdown)

    app = FastAPI(title="lmforge", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return _error(400, f"{where}: {first.get('msg')}", param=where)

    @app.exception_handler(LmforgeError)
    async def lmforge_error(request, exc: LmforgeError):
        return _error(400, str(exc))

    @app.get("/health")
    async def health():
        batches = engine.batches
        return {"status": "ok", "batches": len(batches), "requests": sum(batches),
                "largest_batch": engine.largest_batch(),
                "decode_steps": engine.decoder.steps if engine.decoder else None}

    @app.get("/v1/models", dependencies=[Depends(api.check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "lmforge"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(api.check_key)])
    async def chat(req: ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
                    for i, m in enumerate(req.messages)]
        prompt = encode_prompt({"messages": messages}, api.tok)
        jobs, events = api.jobs(req, [prompt], req.max_completion_tokens or req.max_tokens)
        return await _respond(api, req, jobs, events, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(api.check_key)])
    async def completions(req: CompletionRequest):
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts or not all(texts):
            raise HTTPException(400, "prompt: must be a non-empty string or a list of them")
        prompts = [encode_prompt({"prompt": t}, api.tok) for t in texts]
        jobs, events = api.jobs(req, prompts, req.max_tokens)
        return await _respond(api, req, jobs, events, chat=False)

    return app


async def _respond(api: Api, req: _Sampling, jobs: list[Job], events: asyncio.Queue, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {"id": rid, "created": created, "model": api.model_id}
    if req.stream:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i, text):
            choice = {"index": i, "delta": {"role": "assistant", "content": text}} if chat else {"index": i, "text": text}
            return {**head, "object": obj, "choices": [{**choice, "finish_reason": None}]}

        def final_chunk(i, reason, usage=None):
            if usage is not None:
                return {**head, "object": obj, "choices": [], "usage": usage}
            choice = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
            return {**head, "object": obj, "choices": [{**choice, "finish_reason": reason}]}

        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(jobs, events, chunk, final_chunk, include_usage, req.n),
                                 media_type="text/event-stream")
    results = await api.results(jobs, events)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
    else:
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(results)]
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": _usage(results, req.n)}


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run uvicorn in this thread; it handles SIGINT/SIGTERM by draining in-flight requests first."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # uvicorn re-raises SIGTERM after draining, so the exit status would say "killed"; the drain
                # succeeded, so exit 0 like any clean shutdown
                self._captured_signals.clear()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)
    server = _Server(config)
    print(f"[lmforge] serving on http://{host}:{port}/v1 (health: /health)", flush=True)
    server.run()
