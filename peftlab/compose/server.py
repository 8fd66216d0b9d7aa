"""An OpenAI-compatible HTTP API over a ``ServingEngine`` (FastAPI; ``peftlab serve`` runs it with uvicorn).

Endpoints (OpenAI's shapes)::

    GET    /v1/models                the base model and every adapter
    POST   /v1/chat/completions      messages through the model's chat template; stream=true gives SSE chunks
    POST   /v1/completions           prompt text (or token ids), as is
    POST   /v1/adapters              peftlab extension: {"name", "path"} loads a LoRA adapter while serving
    DELETE /v1/adapters/{name}       peftlab extension: unloads it

The request's ``model`` names an adapter, or the base. Every error answers with a 4xx (5xx only for a failure of
the server itself) and OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; nothing a request sends
stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..data.conversations import ROLES
from ..data.lm import render
from ..errors import InputError
from .batch_decode import DecodeRow
from .serving import Job, ServingEngine, UnknownModel

DEFAULT_TOKENS_LIMIT = 512


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status)


# --- request bodies ---------------------------------------------------------------------------------------------
class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class Message(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


class AdapterRequest(BaseModel):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


# --- helpers ----------------------------------------------------------------------------------------------------
def message_text(message: Message, index: int) -> dict[str, str]:
    if message.role not in ROLES:
        raise ApiError(
            400,
            f"messages[{index}].role: expected one of {', '.join(ROLES)}, got {message.role!r}",
            f"messages.{index}.role",
            "invalid_value",
        )
    content = message.content or ""
    if isinstance(content, list):  # content parts: only text is understood
        if any(part.get("type") != "text" for part in content):
            raise ApiError(
                400,
                f"messages[{index}].content: only text parts are supported",
                f"messages.{index}.content",
                "invalid_value",
            )
        content = "".join(str(part.get("text", "")) for part in content)
    return {"role": message.role, "content": content}


def rendered(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids through the chat template; a template that refuses the messages is the request's
    fault (a 400), e.g. roles out of the order it requires."""
    try:
        return render(tokenizer, messages, generation_prompt=True)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - jinja's errors, raised by templates for messages they refuse
        raise ApiError(
            400, f"messages: the model's chat template refused them ({error})", "messages", "invalid_value"
        ) from None


class Pending:
    """Hands a request's text and its end from the decoding thread to the event loop (one queue per request)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []

    def put(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled.set()


class Api:
    """The endpoints' logic over one engine."""

    def __init__(self, engine: ServingEngine, tokens_limit: int):
        self.engine = engine
        self.tokens_limit = tokens_limit

    def budget(self, request: Sampling, prompt_length: int) -> int:
        """The request's max_tokens, checked against the server's limit and the model's context."""
        asked = request.max_tokens or request.max_completion_tokens
        context = self.engine.context
        if asked is not None and asked > self.tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {asked}, above this server's limit of {self.tokens_limit} "
                "(peftlab serve --max-new-tokens-limit)",
                "max_tokens",
                "max_tokens_above_limit",
            )
        room = self.tokens_limit if context is None else min(self.tokens_limit, context - prompt_length)
        if asked is None and room >= 1:
            return room
        if context is not None and prompt_length + (asked or 1) > context:
            raise ApiError(
                400,
                f"this model's context is {context} tokens; the prompt has {prompt_length} and "
                f"max_tokens asks for {asked or 1} more",
                "max_tokens",
                "context_length_exceeded",
            )
        return asked

    def row(self, request: Sampling, prompt: list[int], pending: Pending, index: int) -> DecodeRow:
        if not prompt:
            raise ApiError(400, "the prompt is empty (no tokens)", "prompt", "invalid_value")
        vocab = len(self.engine.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}", "prompt", "invalid_value")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        return DecodeRow(
            prompt,
            self.budget(request, len(prompt)),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=[s for s in stop if s],
            on_text=lambda piece: pending.put(("text", index, piece)),
        )

    def submit(self, rows: list[DecodeRow], adapter: str | None, pending: Pending) -> None:
        for row in rows:
            job = Job(row, adapter, lambda done, error: pending.put(("done", done, error)))
            pending.jobs.append(job)
        for job in pending.jobs:
            self.engine.submit(job)

    async def finished(self, pending: Pending) -> list[DecodeRow]:
        """Wait for every row of the request (in order); a failed row raises."""
        left = len(pending.jobs)
        while left:
            event = await pending.events.get()
            if event[0] == "done":
                left -= 1
                if event[2] is not None:
                    raise as_api_error(event[2])
        return [job.row for job in pending.jobs]


def as_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, UnknownModel):
        return ApiError(404, str(error), "model", "model_not_found")
    if isinstance(error, InputError):
        return ApiError(400, str(error), None, "invalid_value")
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", None, None)


def usage(rows: list[DecodeRow]) -> dict[str, int]:
    prompt = sum(len(r.prompt) for r in rows)
    completion = sum(len(r.tokens) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(row: DecodeRow) -> str:
    return "length" if row.finish_reason == "length" else "stop"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --- the app ----------------------------------------------------------------------------------------------------
def create_app(engine: ServingEngine, api_key: str | None = None, tokens_limit: int = DEFAULT_TOKENS_LIMIT) -> FastAPI:
    """The FastAPI application serving ``engine`` (its worker starts and stops with the app)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="peftlab serve", lifespan=lifespan)
    api = Api(engine, tokens_limit)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(InputError)
    async def on_input_error(_: Request, error: InputError):
        return error_response(as_api_error(error))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, error: RequestValidationError):
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(ApiError(400, "the request body is not valid JSON", None, "invalid_json"))
        first = problems[0] if problems else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        code = "missing_field" if first.get("type") == "missing" else "invalid_value"
        return error_response(ApiError(400, message, where, code))

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, error: HTTPException):
        return error_response(ApiError(error.status_code, str(error.detail), None, None))

    @app.exception_handler(Exception)
    async def on_crash(_: Request, error: Exception):
        return error_response(as_api_error(error))

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error_response(
                    ApiError(
                        401,
                        "invalid or missing API key (Authorization: Bearer KEY)",
                        None,
                        "invalid_api_key",
                        "authentication_error",
                    )
                )
        return await call_next(request)

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": engine.created, "owned_by": "peftlab"}
        if name != engine.base_name:
            card.update(created=engine.loaded_at.get(name, engine.created), parent=engine.base_name)
        return card

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in [engine.base_name, *engine.adapter_names]]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        engine.resolve(name)
        return model_card(name)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterRequest):
        await run_in_threadpool(engine.load_adapter, body.name, body.path)
        return model_card(body.name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        await run_in_threadpool(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        adapter = engine.resolve(body.model)
        messages = [message_text(m, i) for i, m in enumerate(body.messages)]
        prompt = rendered(engine.tokenizer, messages)
        pending = Pending(asyncio.get_running_loop())
        row = api.row(body, prompt, pending, 0)
        api.submit([row], adapter, pending)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return streaming(pending, chat_chunks(ident, created, body, pending))
        rows = await waited(api, pending)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": rows[0].text},
            "logprobs": None,
            "finish_reason": finish_reason(rows[0]),
        }
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [choice],
            "usage": usage(rows),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        adapter = engine.resolve(body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ApiError(400, "prompt: expected text, a list of texts or token ids", "prompt", "invalid_value")
        encoded = [engine.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        pending = Pending(asyncio.get_running_loop())
        rows = [api.row(body, ids, pending, i) for i, ids in enumerate(encoded)]
        api.submit(rows, adapter, pending)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return streaming(pending, completion_chunks(ident, created, body, pending))
        rows = await waited(api, pending)
        choices = [
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": finish_reason(r)}
            for i, r in enumerate(rows)
        ]
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": usage(rows),
        }

    return app


async def waited(api: Api, pending: Pending) -> list[DecodeRow]:
    try:
        return await api.finished(pending)
    finally:
        pending.cancel()  # the client left (or all rows are done): free the rows' places in the batch


def streaming(pending: Pending, chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            pending.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def stream_events(pending: Pending) -> AsyncIterator[tuple]:
    """("text", index, piece) events, then ("done", index, row) for each row, or ("error", ApiError)."""
    left = len(pending.jobs)
    while left:
        event = await pending.events.get()
        if event[0] == "text":
            yield event
            continue
        left -= 1
        _, row, error = event
        if error is not None:
            yield ("error", as_api_error(error))
            return
        yield ("done", next(i for i, job in enumerate(pending.jobs) if job.row is row), row)


def include_usage(body: Sampling) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


async def chat_chunks(ident: str, created: int, body: ChatRequest, pending: Pending) -> AsyncIterator[str]:
    def chunk(delta: dict, reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [choice],
        }

    yield sse(chunk({"role": "assistant", "content": ""}))
    async for event in stream_events(pending):
        if event[0] == "text":
            yield sse(chunk({"content": event[2]}))
        elif event[0] == "done":
            yield sse(chunk({}, finish_reason(event[2])))
        else:
            yield sse({"error": error_body(event[1])})
    if include_usage(body):
        yield sse(usage_chunk(ident, "chat.completion.chunk", created, body.model, pending))
    yield sse("[DONE]")


def usage_chunk(ident: str, kind: str, created: int, model: str, pending: Pending) -> dict:
    """The last chunk of a stream asked for ``stream_options.include_usage``: no choices, the token counts."""
    rows = [job.row for job in pending.jobs]
    return {"id": ident, "object": kind, "created": created, "model": model, "choices": [], "usage": usage(rows)}


async def completion_chunks(ident: str, created: int, body: CompletionRequest, pending: Pending) -> AsyncIterator[str]:
    def chunk(index: int, text: str, reason: str | None = None) -> dict:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}

    async for event in stream_events(pending):
        if event[0] == "text":
            yield sse(chunk(event[1], event[2]))
        elif event[0] == "done":
            yield sse(chunk(event[1], "", finish_reason(event[2])))
        else:
            yield sse({"error": error_body(event[1])})
    if include_usage(body):
        yield sse(usage_chunk(ident, "text_completion", created, body.model, pending))
    yield sse("[DONE]")


def error_body(error: ApiError) -> dict:
    return {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}


# --- running it -------------------------------------------------------------------------------------------------
class BackgroundServer:
    """uvicorn serving ``app`` from a thread on a free loopback port (tests, benchmarks)::

    with BackgroundServer(app) as server:
        OpenAI(base_url=server.url + "/v1", api_key="...")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1"):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
