"""OpenAI-compatible HTTP API on FastAPI + uvicorn, in front of the batching Engine.

FastAPI/pydantic do the HTTP and request validation, uvicorn the serving and the graceful shutdown on
SIGTERM (stop accepting, finish in-flight requests, then stop the engine). lmforge adds the OpenAI
request/response shapes, the API key check, server-sent-event streaming, and the limits that keep one
client from starving the others (``ServeLimits``: body size, messages, max_tokens, n, stop strings, a
bounded queue answered with 429), and cancels the work of a client that disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lmforge.data.tokenize import Encoder
from lmforge.errors import DataError, LmforgeError
from lmforge.inference import openmp
from lmforge.inference.adapter_set import AdapterSet
from lmforge.inference.engine import Busy, Engine, Job, Unavailable
from lmforge.inference.generate import Completion, GenerationOptions, encode_prompt
from lmforge.inference.loading import LoadedModel
from lmforge.inference.row_lora import RowAdapter
from lmforge.inference.score import conversation_ids, score_sequences


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for (defaults = the `lmforge serve` flags' defaults)."""

    max_queue: int = 256  # sequences waiting for a batch slot; more -> 429 with Retry-After
    max_body_bytes: int = 1 << 20  # request body; more -> 413
    max_messages: int = 256  # chat messages (also: prompts in one completions request)
    max_tokens: int = 4096  # largest max_tokens a request may ask for (the model's context bounds it too)
    max_n: int = 16  # choices per request
    max_stop: int = 8  # stop strings per request
    max_stop_length: int = 256  # characters per stop string
    retry_after: int = 1  # seconds a client told 429 should wait


# ------------------------------------------------------------------------------------------ request bodies
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields lmforge has no use for (user, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not in the OpenAI API; vLLM and others accept it too
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch generators take 64 bits (choice i: seed + i)
    stream_options: dict | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class LoadLoraRequest(BaseModel):  # vLLM's body for POST /v1/load_lora_adapter
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1, max_length=256)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: Any  # a text, {"messages": [...]}, or a list of either (checked by hand: one clear message)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status,
                        headers=headers)


def _kind(status: int) -> str:
    """The OpenAI error type for an HTTP status."""
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")


class BadRequest(HTTPException):
    """A 400 (or other 4xx) that names the request field at fault."""

    def __init__(self, param: str, message: str, status: int = 400):
        super().__init__(status, f"{param}: {message}")
        self.param = param


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413, by its Content-Length before it is
    read, or (chunked bodies) as soon as the bytes read pass the limit. Written by hand because neither
    uvicorn nor Starlette bounds request bodies."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _too_large(self) -> str:
        return f"the request body is larger than the server's limit of {self.limit} bytes (--max-body-bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = _error(413, self._too_large()) if length.isdigit() else _error(400, "bad Content-Length")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI re-raises HTTPException from reading the body: our handler answers
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited, send)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body was read already, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _message_text(msg: ChatMessage, i: int) -> str:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or ""
    parts = []
    for part in msg.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise HTTPException(400, f"messages[{i}].content: only text parts are supported")
        parts.append(part["text"])
    return "".join(parts)


class RewardScorer:
    """A reward model behind ``POST /v1/score``: texts tokenised as given, conversations rendered as reward
    training renders prompt + answer (``lmforge.inference.score``); one forward at a time."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 8):
        self.loaded, self.batch_size = loaded, batch_size
        self.tok = loaded.tokenizer
        self.encoder = Encoder(loaded.tokenizer)
        self.lock = threading.Lock()

    def encode(self, item, i: int, field: str) -> list[int]:
        if isinstance(item, str):
            ids = self.tok(item)["input_ids"]
            if not ids:
                raise BadRequest(field, "an empty text has no token to score")
            return ids
        if isinstance(item, dict) and set(item) == {"messages"} and isinstance(item["messages"], list) \
                and item["messages"]:
            try:
                msgs = [ChatMessage(**m) if isinstance(m, dict) else None for m in item["messages"]]
            except (TypeError, ValueError):
                msgs = [None]
            if None in msgs:
                raise BadRequest(field, "messages must be a list of {role, content} objects")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, k)}
                        for k, m in enumerate(msgs)]
            try:
                return conversation_ids(self.encoder, messages)
            except DataError as e:
                raise BadRequest(field, str(e)) from None
        raise BadRequest(field, 'must be a text or {"messages": [...]} (or a non-empty list of them)')

    def score(self, seqs: list[list[int]]) -> list[float]:
        with self.lock:
            return score_sequences(self.loaded.model, self.tok.pad_token_id, seqs, self.batch_size)


# ------------------------------------------------------------------------------------------ the app
class Api:
    def __init__(self, engine: Engine | None, model_id: str, api_key: str | None, default_max_tokens: int,
                 limits: ServeLimits, scorer: RewardScorer | None = None, adapters: AdapterSet | None = None):
        self.engine = engine
        self.scorer = scorer
        self.adapters = adapters
        self.model_id = model_id
        # the header value expected; compared as bytes (Starlette decodes headers as latin-1)
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.default_max_tokens = default_max_tokens
        self.limits = limits
        self.tok = engine.generator.tok if engine else scorer.tok
        config = (engine.generator.model if engine else scorer.loaded.model).config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def served(self) -> list[str]:
        return [self.model_id] + [name for name, _ in self.adapters.names()] if self.adapters else [self.model_id]

    def check_model(self, name: str, generates: bool) -> None:
        """404 for a model not served here; 400 when the route needs the other kind of model."""
        if name != self.model_id and not (self.adapters and name in self.adapters):
            served = ", ".join(repr(n) for n in self.served())
            raise HTTPException(404, f"model {name!r} is not served here; this server has {served}")
        if generates and self.engine is None:
            raise BadRequest("model", f"{name!r} is a reward model: it scores sequences (POST /v1/score), it does "
                                      "not generate")
        if not generates and self.scorer is None:  # (an adapter is generative too)
            raise BadRequest("model", f"{name!r} is a generative model, not a reward model: POST /v1/score needs a "
                                      "reward model (what method: reward writes)")

    def key_ok(self, request: Request) -> bool:
        if self.expected is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, self.expected)  # constant time: the key is not guessable by timing

    def check_key(self, request: Request) -> None:
        if not self.key_ok(request):
            raise HTTPException(401, "invalid or missing API key (send Authorization: Bearer KEY)")

    def check_limits(self, req: _Sampling, max_tokens: int | None, field: str) -> None:
        """The request's own asks against ServeLimits (a 400 naming the field)."""
        lim = self.limits
        if max_tokens is not None and max_tokens > lim.max_tokens:
            raise BadRequest(field, f"{max_tokens} is more than this server allows ({lim.max_tokens})")
        if req.n > lim.max_n:
            raise BadRequest("n", f"{req.n} choices asked; this server allows at most {lim.max_n}")
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stops) > lim.max_stop:
            raise BadRequest("stop", f"{len(stops)} stop strings given; this server allows at most {lim.max_stop}")
        if any(len(s) > lim.max_stop_length for s in stops):
            raise BadRequest("stop", f"a stop string is longer than {lim.max_stop_length} characters")

    def options(self, req: _Sampling, max_tokens: int | None) -> GenerationOptions:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenerationOptions(max_new_tokens=max_tokens or self.default_max_tokens, do_sample=req.temperature > 0,
                                 temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, stop=stop,
                                 seed=req.seed or 0)

    async def adapter(self, name: str) -> RowAdapter | None:
        """The adapter a request's ``model`` names (None: the base), read again from its path if it was dropped
        from memory (--max-adapters). Its jobs hold it, so unloading it later does not cut them short."""
        if name == self.model_id or self.adapters is None:
            return None
        try:
            return await asyncio.to_thread(openmp.released(self.adapters.get), name)
        except KeyError:
            raise HTTPException(404, f"model {name!r} is not served here (it was unloaded)") from None
        except Exception as e:  # its files changed or went away since it was loaded
            raise HTTPException(500, f"adapter {name!r} could not be read again: {type(e).__name__}: {e}") from None

    def jobs(self, req: _Sampling, prompts: list[list[int]], max_tokens: int | None,
             adapter: RowAdapter | None = None) -> tuple[list[Job], asyncio.Queue]:
        most = self.engine.max_queue
        if most is not None and len(prompts) * req.n > most:  # it would never fit: a 400, not an endless 429
            raise BadRequest("n", f"{len(prompts)} prompts x n={req.n} sequences; the server queues at most {most}")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        jobs = []
        virtual = adapter.virtual.shape[0] if adapter is not None and adapter.virtual is not None else 0
        context = self.context and self.context - virtual  # a prompt-tuning adapter's virtual tokens take positions
        of = f"{self.context}" + (f" ({virtual} of them the adapter's virtual tokens)" if virtual else "")
        for p in prompts:
            opts = self.options(req, max_tokens)
            if context and len(p) >= context:
                raise HTTPException(400, f"the prompt has {len(p)} tokens; the model's context is {of}")
            if context and len(p) + opts.max_new_tokens > context:
                if max_tokens:
                    raise HTTPException(400, f"prompt ({len(p)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                             f"model's context of {of}")
                opts.max_new_tokens = context - len(p)
            for _ in range(req.n):  # choice i of a seeded request samples with seed + i, so the n choices differ
                jobs.append(Job(p, GenerationOptions(**{**opts.__dict__, "seed": opts.seed + len(jobs)}), loop,
                                events, index=len(jobs), seeded=req.seed is not None, stream=req.stream,
                                adapter=adapter))
        try:
            self.engine.submit_all(jobs)
        except Busy as e:
            raise HTTPException(429, str(e), headers={"Retry-After": str(self.limits.retry_after)}) from None
        except Unavailable as e:
            raise HTTPException(503, str(e)) from None
        return jobs, events

    async def results(self, jobs: list[Job], events: asyncio.Queue, request: Request) -> list[Completion]:
        """Wait for every job's completion; if the client disconnects first, cancel the jobs (freeing their
        batch slots) and stop waiting."""
        gone = asyncio.ensure_future(_disconnected(request))
        out: list[Completion | None] = [None] * len(jobs)
        pending = len(jobs)
        try:
            while pending:
                event = asyncio.ensure_future(events.get())
                await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise HTTPException(499, "the client closed the connection")  # nobody reads this
                index, kind, value = event.result()
                if kind == "error":
                    raise HTTPException(*value)
                if kind == "done":
                    out[index] = value
                    pending -= 1
        finally:
            gone.cancel()
            if pending:
                self.engine.cancel(jobs)
        return out  # type: ignore[return-value]


def _usage(results: list[Completion], n: int) -> dict:
    prompt = sum(r.prompt_tokens for r in results) // n  # each prompt is counted once, not once per choice
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(engine: Engine, jobs: list[Job], events: asyncio.Queue, chunk, final_chunk, include_usage: bool,
               n: int):
    """Server-sent events: one chunk per text delta, a last chunk with finish_reason per choice, then [DONE].
    Starlette cancels this generator when the client disconnects: the jobs are cancelled then."""
    sent = [""] * len(jobs)
    results: list[Completion] = []
    pending = len(jobs)
    try:
        while pending:
            index, kind, value = await events.get()
            if kind == "error":  # the status line (200) is sent already: the error goes in the stream
                status, message = value
                error = {"message": message, "type": _kind(status), "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
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
    finally:
        if pending:
            engine.cancel(jobs)
    if include_usage:
        yield f"data: {json.dumps(final_chunk(None, None, _usage(results, n)))}\n\n"
    yield "data: [DONE]\n\n"


def create_app(engine: Engine | None, model_id: str, api_key: str | None = None, default_max_tokens: int = 256,
               limits: ServeLimits | None = None, scorer: RewardScorer | None = None,
               adapters: AdapterSet | None = None, allow_adapter_loading: bool = False) -> FastAPI:
    """The app for a generative model (``engine``; ``adapters`` over it, chosen by a request's ``model``, loaded
    and unloaded at run time with ``allow_adapter_loading``) or a reward model (``scorer``, no engine)."""
    limits = limits or ServeLimits()
    if engine is not None and engine.max_queue is None:
        engine.max_queue = limits.max_queue
    api = Api(engine, model_id, api_key, default_max_tokens, limits, scorer, adapters)

    @asynccontextmanager
    async def lifespan(app):
        if engine is None:
            yield
            return
        engine.start()
        yield
        engine.stop()  # uvicorn gets here after in-flight requests finished (graceful shutdown)

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), _kind(exc.status_code), getattr(exc, "param", None),
                      exc.headers)

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
    async def health(request: Request):
        """200 {"status": "ok"} or 503 {"status": "unhealthy"}; the figures and the error only with the key."""
        if engine is None:
            return {"status": "ok"}
        if not engine.healthy():
            body = {"status": "unhealthy"}
            if api.key_ok(request):
                body["error"] = engine.failure or "the engine thread has stopped"
            return JSONResponse(body, status_code=503)
        if not api.key_ok(request):
            return {"status": "ok"}
        batches = engine.batches
        return {"status": "ok", "batches": len(batches), "requests": sum(batches),
                "largest_batch": engine.largest_batch(),
                "decode_steps": engine.decoder.steps if engine.decoder else None,
                "queued": engine.queue.qsize(), "running": len(engine.held), "cancelled": engine.cancelled,
                "restarts": engine.restarts}

    @app.get("/v1/models", dependencies=[Depends(api.check_key)])
    async def models():
        """The base and each adapter with ``root`` (where it came from) and ``parent`` (its base), as vLLM has them;
        an adapter also with its ``kind``. Every kind shares the continuous batch with the base and the others."""
        card = {"object": "model", "created": 0, "owned_by": "lmforge"}
        root = str((engine.generator.loaded if engine else scorer.loaded).name)
        data = [{"id": model_id, **card, "root": root, "parent": None}]
        for name, where in adapters.names() if adapters else []:  # kind: lora, dora or prompt_tuning (one batch)
            data.append({"id": name, **card, "root": where, "parent": model_id, "kind": adapters.kind(name)})
        return {"object": "list", "data": data}

    if allow_adapter_loading and adapters is not None:
        _adapter_routes(app, api)

    @app.post("/v1/chat/completions", dependencies=[Depends(api.check_key)])
    async def chat(req: ChatRequest, request: Request):
        api.check_model(req.model, generates=True)
        if len(req.messages) > limits.max_messages:
            raise BadRequest("messages", f"{len(req.messages)} messages; this server allows at most "
                                         f"{limits.max_messages}")
        max_tokens = req.max_completion_tokens or req.max_tokens
        api.check_limits(req, max_tokens, "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m, i)}
                    for i, m in enumerate(req.messages)]
        prompt = encode_prompt({"messages": messages}, api.tok)
        jobs, events = api.jobs(req, [prompt], max_tokens, await api.adapter(req.model))
        return await _respond(api, req, jobs, events, request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(api.check_key)])
    async def completions(req: CompletionRequest, request: Request):
        api.check_model(req.model, generates=True)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts or not all(texts):
            raise HTTPException(400, "prompt: must be a non-empty string or a list of them")
        if len(texts) > limits.max_messages:
            raise BadRequest("prompt", f"{len(texts)} prompts; this server allows at most {limits.max_messages}")
        api.check_limits(req, req.max_tokens, "max_tokens")
        prompts = [encode_prompt({"prompt": t}, api.tok) for t in texts]
        jobs, events = api.jobs(req, prompts, req.max_tokens, await api.adapter(req.model))
        return await _respond(api, req, jobs, events, request, chat=False)

    @app.post("/v1/score", dependencies=[Depends(api.check_key)])
    async def score(req: ScoreRequest):
        api.check_model(req.model, generates=False)
        items = req.input if isinstance(req.input, list) else [req.input]
        if not items:
            raise BadRequest("input", "an empty list: nothing to score")
        if len(items) > limits.max_messages:
            raise BadRequest("input", f"{len(items)} inputs; this server allows at most {limits.max_messages}")
        seqs = [scorer.encode(x, i, f"input[{i}]" if isinstance(req.input, list) else "input")
                for i, x in enumerate(items)]
        for i, s in enumerate(seqs):
            if api.context and len(s) > api.context:
                raise BadRequest("input", f"input {i} has {len(s)} tokens; the model's context is {api.context}")
        scores = await asyncio.to_thread(scorer.score, seqs)
        return {"object": "list", "model": api.model_id,
                "data": [{"object": "score", "index": i, "score": v} for i, v in enumerate(scores)]}

    return app


def _adapter_routes(app: FastAPI, api: Api) -> None:
    """vLLM's run-time adapter routes (``--allow-adapter-loading``); their bodies and answers are vLLM's too."""

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(api.check_key)])
    async def load_lora_adapter(req: LoadLoraRequest):
        if req.lora_name == api.model_id or req.lora_name in api.adapters:
            raise BadRequest("lora_name", f"the lora adapter {req.lora_name!r} has already been loaded" if
                             req.lora_name in api.adapters else f"{req.lora_name!r} is the base model's name")
        try:
            await asyncio.to_thread(openmp.released(api.adapters.add), req.lora_name, req.lora_path)
        except LmforgeError as e:
            raise BadRequest("lora_path", str(e)) from None
        except Exception as e:  # unreadable files (a corrupt safetensors file, permissions): the client's adapter
            raise BadRequest("lora_path", f"adapter {req.lora_name!r} cannot be loaded from {req.lora_path}: "
                                          f"{type(e).__name__}: {e}") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(api.check_key)])
    async def unload_lora_adapter(req: UnloadLoraRequest):
        if not api.adapters.remove(req.lora_name):
            raise HTTPException(404, f"the lora adapter {req.lora_name!r} cannot be found")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


async def _respond(api: Api, req: _Sampling, jobs: list[Job], events: asyncio.Queue, request: Request, chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {"id": rid, "created": created, "model": req.model}
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
        return StreamingResponse(_sse(api.engine, jobs, events, chunk, final_chunk, include_usage, req.n),
                                 media_type="text/event-stream")
    results = await api.results(jobs, events, request)
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
