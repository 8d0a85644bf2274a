"""The OpenAI-compatible HTTP API over an Engine (FastAPI).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with SSE streaming),
GET /v1/models[/{id}], GET /health, and the chat page at /. Bodies are parsed by hand
(schemas.parse_body) so every bad input gets an OpenAI-style 400, never FastAPI's 422.

Browser safety: a web page the user visits can send requests to a loopback server. POSTs
must declare a JSON body (a page cannot send that cross-origin without a CORS preflight,
which we refuse unless --cors-origin names the page's origin), and the Host header must
name this server (a DNS-rebinding page's requests carry its own host name).
"""
from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from frugal_rlhf.serve.engine import Delta, Engine, Failed, Finished, Job, QueueFull
from frugal_rlhf.serve.sampler import RowSettings
from frugal_rlhf.serve.schemas import APIError, ChatRequest, CompletionRequest, SamplingFields, parse_body
from frugal_rlhf.serve.tokens import context_length, max_token_bytes
from frugal_rlhf.serve.wire import Choice, Shape, sse, usage

MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_TOKENS = 256  # when a request names none (OpenAI's "until the context is full" is costly on CPU)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PAGE = Path(__file__).parent / "static" / "index.html"
_GONE = object()  # put on a request's event queue when its (non-streaming) client disconnects


@dataclass
class ServeState:
    engine: Engine
    model_name: str
    api_key: str | None
    context: int
    created: int
    max_prompt_bytes: int  # longer texts surely exceed the context: refused before tokenizing


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _check_key(request: Request) -> None:
    key = request.app.state.serve.api_key
    if not key:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       headers=challenge)
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge)


async def _read_body(request: Request) -> bytes:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"The body must be JSON sent with 'Content-Type: application/json' (got '{kind}').")
    too_large = APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    # Counted while it arrives: a chunked body declares no length, and reading it whole first
    # would hold any size in memory before the check.
    parts, size = [], 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            parts.append(chunk)
    return b"".join(parts)


def _adapter(state: ServeState, model: str | None) -> str | None:
    """The LoRA adapter a request's `model` names; None is the base model."""
    if model is None or model == state.model_name:
        return None
    if model in state.engine.adapters:
        return model
    raise APIError(404, f"The model '{model}' does not exist; GET /v1/models lists the served ones.",
                   param="model", code="model_not_found")


def _make_jobs(state: ServeState, prompt_ids: list[int], req: SamplingFields, max_tokens: int | None,
               param: str, max_param: str) -> list[Job]:
    """Check the request against the model's context and turn it into one Job per choice."""
    ctx, n = state.context, len(prompt_ids)
    if n == 0:
        raise APIError(400, "The prompt is empty.", param=param)
    if n >= ctx or (max_tokens is not None and n + max_tokens > ctx):
        asked = f"{n} in the prompt" + (f" and {max_tokens} in the completion" if max_tokens is not None else "")
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, but you requested {asked}.",
                       param=max_param if n < ctx else param, code="context_length_exceeded")
    limit = max_tokens or min(DEFAULT_MAX_TOKENS, ctx - n)
    adapter = _adapter(state, req.model)
    jobs = []
    for i in range(req.n):
        seed = None if req.seed is None else (req.seed + i) % 2 ** 64  # choice i: its own stream
        settings = RowSettings(temperature=req.effective_temperature(),
                               top_p=1.0 if req.top_p is None else float(req.top_p), seed=seed,
                               presence_penalty=float(req.presence_penalty),
                               frequency_penalty=float(req.frequency_penalty),
                               top_logprobs=req.top_count(), adapter=adapter)
        jobs.append(Job(prompt_ids=prompt_ids, max_tokens=limit, settings=settings, stop=req.stop_strings()))
    return jobs


def _check_prompt_bytes(state: ServeState, texts: list[str], param: str) -> None:
    size = sum(len(t.encode("utf-8")) for t in texts)
    if size > state.max_prompt_bytes:
        raise APIError(400, f"This model's maximum context length is {state.context} tokens, and your prompt "
                       f"({size} bytes) is longer than that for certain.", param=param,
                       code="context_length_exceeded")


def _chat_prompt(tokenizer, req: ChatRequest) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:  # e.g. templates that insist on alternating roles
        raise APIError(400, f"The chat template rejected these messages: {err}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _completion_prompt(tokenizer, req: CompletionRequest) -> list[int]:
    ids = tokenizer(req.prompt)["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]  # an empty prompt means "start a document"
    return ids


def _submit(state: ServeState, jobs: list[Job]) -> asyncio.Queue:
    """Queue the jobs; their events arrive on the returned asyncio queue as (choice index, event)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    for index, job in enumerate(jobs):
        def emit(event, index=index, job=job) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job.cancel()

        job.emit = emit
    try:
        state.engine.submit(jobs)
    except QueueFull as err:
        raise APIError(503, str(err), type="server_error", code="server_overloaded",
                       headers={"Retry-After": "1"}) from None
    return events


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
    # The body has been read, so the next ASGI message is the client's disconnect: we learn
    # of it at once, even while tokens keep arriving.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait((None, _GONE))


async def _collect(events: asyncio.Queue, jobs: list[Job], request: Request) -> list[Choice]:
    choices = [Choice(logprobs=[] if job.settings.top_logprobs is not None else None) for job in jobs]
    watcher = asyncio.ensure_future(_watch_disconnect(request, events))
    try:
        while any(c.done is None for c in choices):
            index, event = await events.get()
            if event is _GONE:
                raise APIError(499, "client closed the request")
            if isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
            choice = choices[index]
            if isinstance(event, Delta):
                choice.text += event.text
                if choice.logprobs is not None:
                    choice.logprobs.extend(event.logprobs or [])
            elif isinstance(event, Finished):
                choice.done = event
        return choices
    finally:
        watcher.cancel()
        for job in jobs:
            job.cancel()  # no-op after Finished; frees the rows if we leave early


async def _stream(events, jobs: list[Job], head: dict, shape: Shape, include_usage: bool, prompt_tokens: int):
    """SSE body: per choice a first chunk (chat: the role; completions: the echo), content
    chunks, a finish chunk; then [a usage chunk] and [DONE]."""
    extra = {"usage": None} if include_usage else {}
    offsets = [len(shape.echo)] * len(jobs)  # completions' text_offset, per choice
    finished: list[Finished] = []
    try:
        for index in range(len(jobs)):
            if shape.chat or shape.echo:
                yield sse({**head, "choices": [shape.chunk(index, shape.echo, None, first=True)], **extra})
        while len(finished) < len(jobs):
            index, event = await events.get()
            if isinstance(event, Delta):
                logprobs = shape.logprobs(event.logprobs, offsets[index])
                offsets[index] += sum(len(t) for t in (logprobs or {}).get("tokens", []))
                yield sse({**head, "choices": [shape.chunk(index, event.text, None, logprobs)], **extra})
            elif isinstance(event, Finished):
                finished.append(event)
                yield sse({**head, "choices": [shape.chunk(index, "", event.reason)], **extra})
            elif isinstance(event, Failed):
                yield sse(APIError(500, event.message, type="server_error").body())
                break
        if include_usage and len(finished) == len(jobs):
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, finished)})
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()  # the client disconnected (we were cancelled) or we are done: free the rows


def _streaming_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _answer(request: Request, req: SamplingFields, shape: Shape, prompt_ids: list[int],
                  max_tokens: int | None, param: str, max_param: str):
    state: ServeState = request.app.state.serve
    jobs = _make_jobs(state, prompt_ids, req, max_tokens, param, max_param)
    events = _submit(state, jobs)
    head = shape.head(req.model or state.model_name)
    if req.stream:
        return _streaming_response(_stream(events, jobs, head, shape, req.include_usage(), len(prompt_ids)))
    choices = await _collect(events, jobs, request)
    return {**head, "object": "chat.completion" if shape.chat else "text_completion",
            "usage": usage(len(prompt_ids), [c.done for c in choices]),
            "choices": [shape.whole(i, c) for i, c in enumerate(choices)]}


async def chat_completions(request: Request):
    state: ServeState = request.app.state.serve
    req = parse_body(await _read_body(request), ChatRequest)
    _check_prompt_bytes(state, [m.text() for m in req.messages], "messages")
    # Templates and tokenizers take seconds on megabytes: never on the event loop.
    prompt_ids = await asyncio.to_thread(_chat_prompt, state.engine.tokenizer, req)
    max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return await _answer(request, req, Shape(True, state.engine.tokenizer), prompt_ids, max_tokens,
                         "messages", max_param)


async def completions(request: Request):
    state: ServeState = request.app.state.serve
    req = parse_body(await _read_body(request), CompletionRequest)
    _check_prompt_bytes(state, [req.prompt], "prompt")
    prompt_ids = await asyncio.to_thread(_completion_prompt, state.engine.tokenizer, req)
    shape = Shape(False, state.engine.tokenizer, req.prompt if req.echo else "")
    return await _answer(request, req, shape, prompt_ids, req.max_tokens, "prompt", "max_tokens")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        return _error_response(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))


class HostCheck:
    """ASGI middleware: answer 400 unless the Host header names one of `allowed` (DNS rebinding)."""

    def __init__(self, app, allowed: set[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            try:
                name = urlsplit("//" + host).hostname
            except ValueError:  # e.g. an unclosed "[" in an IPv6 literal
                name = None
            if name not in self.allowed:
                err = APIError(400, f"The Host header '{host}' is not one this server answers to; start it with "
                               f"--allow-host {name or 'NAME'} to accept it.", code="invalid_host")
                return await _error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)


def allowed_hosts(bind: str, extra: tuple[str, ...] = ()) -> set[str] | None:
    """Host names the server answers to: loopback names, the bind address and `extra`.
    None (any host) for a wildcard bind without `extra`: its real names are not known here."""
    if bind in ("0.0.0.0", "::", "") and not extra:
        return None
    return {*LOOPBACK_NAMES, bind, *extra}


def build_app(engine: Engine, model_name: str, api_key: str | None = None,
              hosts: set[str] | frozenset[str] | None = frozenset(LOOPBACK_NAMES), cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The ASGI app. The engine's worker starts with the app and stops with it.
    `hosts`: the Host header names accepted (None: any); `cors_origins`: web origins allowed
    to call the API from a browser (none by default)."""
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="frugal-rlhf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    context = context_length(engine.model, engine.tokenizer)
    app.state.serve = ServeState(engine, model_name, api_key or None, context, int(time.time()),
                                 context * max_token_bytes(engine.tokenizer))
    _install_error_handlers(app)
    if hosts is not None:
        app.add_middleware(HostCheck, allowed=hosts)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    auth = [Depends(_check_key)]
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=auth)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": app.state.serve.created, "owned_by": "frugal-rlhf"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [card(name) for name in (model_name, *engine.adapters)]}

    @app.get("/v1/models/{name:path}", dependencies=auth)
    async def model(name: str):
        _adapter(app.state.serve, name)  # 404 unless served
        return card(name)

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": model_name, "adapters": list(engine.adapters), **engine.stats()}
        if engine.failure:  # the worker is gone: every request would fail
            return JSONResponse({**body, "status": "error", "error": engine.failure}, status_code=503)
        return body

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app
