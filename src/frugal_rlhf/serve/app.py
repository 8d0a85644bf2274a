"""The OpenAI-compatible HTTP API over an Engine (FastAPI).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with SSE streaming),
GET /v1/models, GET /health, and the chat page at /. Bodies are parsed by hand
(schemas.parse_body) so every bad input gets an OpenAI-style 400, never FastAPI's 422.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from frugal_rlhf.serve.engine import Delta, Engine, Failed, Finished, Job, QueueFull
from frugal_rlhf.serve.sampler import RowSettings
from frugal_rlhf.serve.schemas import APIError, ChatRequest, CompletionRequest, SamplingFields, parse_body
from frugal_rlhf.serve.tokens import context_length

MAX_BODY_BYTES = 4 << 20  # tokenizing runs on the event loop: refuse bodies that would stall it
DEFAULT_MAX_TOKENS = 256  # when a request names none (OpenAI's "until the context is full" is costly on CPU)
PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class ServeState:
    engine: Engine
    model_name: str
    api_key: str | None
    context: int
    created: int


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _check_key(request: Request) -> None:
    key = request.app.state.serve.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    return body


def _make_job(state: ServeState, prompt_ids: list[int], req: SamplingFields, max_tokens: int | None,
              param: str) -> Job:
    """Check the request against the model's context and turn it into a Job."""
    ctx, n = state.context, len(prompt_ids)
    if n == 0:
        raise APIError(400, "The prompt is empty.", param=param)
    if n >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, but your prompt has "
                       f"{n} tokens.", param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > ctx:
        raise APIError(400, f"max_tokens is too large: {max_tokens}. This model's maximum context length "
                       f"is {ctx} tokens.", param="max_tokens")
    # A request may ask for more than fits after its prompt: it gets what fits (finish_reason "length").
    limit = min(max_tokens or DEFAULT_MAX_TOKENS, ctx - n)
    settings = RowSettings(temperature=1.0 if req.temperature is None else float(req.temperature),
                           top_p=1.0 if req.top_p is None else float(req.top_p), seed=req.seed)
    return Job(prompt_ids=prompt_ids, max_tokens=limit, settings=settings, stop=req.stop_strings())


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


def _submit(state: ServeState, job: Job) -> asyncio.Queue:
    """Queue the job; its events arrive on the returned asyncio queue."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            job.cancel()

    job.emit = emit
    try:
        state.engine.submit(job)
    except QueueFull as err:
        raise APIError(503, str(err), type="server_error", code="server_overloaded") from None
    return events


async def _wait_event(events: asyncio.Queue, job: Job, request: Request):
    """Next engine event; cancels the job if the (non-streaming) client went away meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise APIError(499, "client closed the request") from None


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _collect(events, job, request) -> tuple[str, Finished]:
    parts = []
    try:
        while True:
            event = await _wait_event(events, job, request)
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return "".join(parts), event
            elif isinstance(event, Failed):
                raise APIError(500, event.message, type="server_error")
    finally:
        job.cancel()  # no-op after Finished; frees the row if we leave early


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(events, job, head: dict, choice, include_usage: bool, role_chunk: bool):
    """SSE body: [role chunk], content chunks, a finish chunk, [usage chunk], [DONE]."""
    extra = {"usage": None} if include_usage else {}
    try:
        if role_chunk:
            yield _sse({**head, "choices": [choice("", None, first=True)], **extra})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _sse({**head, "choices": [choice(event.text, None)], **extra})
            elif isinstance(event, Finished):
                yield _sse({**head, "choices": [choice("", event.reason)], **extra})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(event)})
                break
            elif isinstance(event, Failed):
                yield _sse(APIError(500, event.message, type="server_error").body())
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client disconnected (we were cancelled) or we are done: free the slot


def _chat_choice(text: str, finish: str | None, first: bool = False) -> dict:
    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _completion_choice(text: str, finish: str | None, first: bool = False) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _streaming_response(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_completions(request: Request):
    state: ServeState = request.app.state.serve
    req = parse_body(await _read_body(request), ChatRequest)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    job = _make_job(state, _chat_prompt(state.engine.tokenizer, req), req, max_tokens, "messages")
    events = _submit(state, job)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": state.model_name}
    if req.stream:
        return _streaming_response(_stream(events, job, head, _chat_choice, req.include_usage(), True))
    text, done = await _collect(events, job, request)
    return {**head, "object": "chat.completion", "usage": _usage(done),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": done.reason}]}


async def completions(request: Request):
    state: ServeState = request.app.state.serve
    req = parse_body(await _read_body(request), CompletionRequest)
    job = _make_job(state, _completion_prompt(state.engine.tokenizer, req), req, req.max_tokens, "prompt")
    events = _submit(state, job)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": state.model_name}
    if req.stream:
        return _streaming_response(_stream(events, job, head, _completion_choice, req.include_usage(), False))
    text, done = await _collect(events, job, request)
    return {**head, "usage": _usage(done),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done.reason}]}


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


def build_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The ASGI app. The engine's worker starts with the app and stops with it."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="frugal-rlhf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = ServeState(engine, model_name, api_key or None,
                                 context_length(engine.model, engine.tokenizer), int(time.time()))
    _install_error_handlers(app)
    auth = [Depends(_check_key)]
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=auth)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        s = app.state.serve
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                            "owned_by": "frugal-rlhf"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": app.state.serve.model_name, **engine.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app
