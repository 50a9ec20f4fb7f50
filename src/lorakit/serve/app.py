"""The OpenAI-compatible HTTP API (FastAPI) over the engine and the adapter registry.

Routes: POST /v1/chat/completions and /v1/completions (``stream: true`` sends server-sent events
ending in ``data: [DONE]``), GET /v1/models, GET /health, GET /metrics (Prometheus), and for the
admin POST /v1/load_lora_adapter and /v1/unload_lora_adapter; the schema is at /openapi.json.
Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and never carry a
server path.

The engine decodes on its own thread; each request hands it a ``deliver`` callback that moves
events onto this event loop. A request leaves the batch when its client goes away (streaming or
not), when it times out, and when its handler fails for any reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import LorakitError
from lorakit.generation.json_constraint import JsonObjectAnswer, prepare_json_constraint
from lorakit.generation.prompts import chat_prompt_ids
from lorakit.serve.engine import Engine, Event, QueueFull, Request, RowError
from lorakit.serve.metrics import CONTENT_TYPE, Metrics, RequestRecord
from lorakit.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    describe_validation_error,
    error_body,
)
from lorakit.serve.registry import AdapterRegistry, AdapterUnavailable
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.tenants import Tenant, Tenants


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the most a request may ask for (and the default for chat)
    request_timeout_s: float = 300.0  # from a request's arrival to its last token


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.kind, self.code, self.param), status_code=self.status)


@dataclass
class Service:
    """What the routes share: the engine, the registry, who may do what, and the limits."""

    engine: Engine
    registry: AdapterRegistry
    base_name: str  # the base model's served name, never a path
    metrics: Metrics
    tenants: Tenants | None = None  # None: an open server, every adapter visible to every caller
    admin_digest: str | None = None  # an open server's admin key (SHA-256); with tenants, the file's
    adapter_root: Path | None = None
    limits: Limits = Limits()
    tenant_limit: int | None = None  # an open server's cap on one caller's requests (None: the queue's)

    def __post_init__(self) -> None:
        self.created = int(time.time())

    # --- who ----------------------------------------------------------------------------------

    def caller(self, key: str | None) -> Tenant | None:
        """The caller's tenant (None on an open server)."""
        if self.tenants is None:
            return None
        tenant = self.tenants.tenant(key)
        if tenant is None:
            raise ApiError(401, "invalid API key; send 'Authorization: Bearer <key>'", "authentication_error",
                           "invalid_api_key")
        return tenant

    def require_admin(self, key: str | None) -> None:
        if self.tenants is None and self.admin_digest is None:
            raise ApiError(403, "administration is off: start the server with --admin-key (or LORAKIT_ADMIN_KEY), "
                           "or a tenants file with an admin_key", "permission_error", "admin_disabled")
        allowed = (self.tenants.is_admin(key) if self.tenants is not None else
                   bool(key) and hashlib.sha256(key.encode()).hexdigest() == self.admin_digest)
        if not allowed:
            raise ApiError(401, "this endpoint needs the admin key", "authentication_error", "invalid_api_key")

    def visible(self, tenant: Tenant | None) -> list[str]:
        names = self.registry.names()
        return names if tenant is None else [n for n in names if n in tenant.adapters]

    def resolve(self, model: str, tenant: Tenant | None) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); the same 404 for an
        unknown name and for another tenant's."""
        if model == self.base_name:
            return None
        if model not in self.visible(tenant):
            raise ApiError(404, "the model does not exist (or is not yours); GET /v1/models lists yours",
                           code="model_not_found", param="model")
        return model

    # --- admin --------------------------------------------------------------------------------

    def load(self, body: LoadAdapterRequest) -> dict:
        if self.adapter_root is None:
            raise ApiError(400, "run-time loading is off; start the server with --adapter-dir DIR")
        directory = contained(self.adapter_root, body.lora_path)
        try:
            info = self.registry.register(body.lora_name, directory)
        except LorakitError as err:
            raise ApiError(400, _without_paths(str(err), self.adapter_root, directory, body.lora_path)) from None
        return {"loaded": body.lora_name, "rank": info.rank, "load_ms": round(info.load_ms, 2)}

    def unload(self, body: UnloadAdapterRequest) -> dict:
        if body.lora_name not in self.registry:
            raise ApiError(404, "no adapter of that name is loaded", code="model_not_found", param="lora_name")
        try:
            self.registry.unregister(body.lora_name)
        except LorakitError as err:
            raise ApiError(409, str(err)) from None
        return {"unloaded": body.lora_name}


def contained(root: Path, relative: str) -> Path:
    """``root / relative``, refused unless it is a plain relative path whose every file stays under
    root once symlinks are resolved."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts or "\\" in relative or "\0" in relative:
        raise ApiError(400, "lora_path must be a relative path inside the adapter directory, without '..'",
                       param="lora_path")
    base = root.resolve()
    directory = base / relative
    try:  # a name the filesystem refuses (too long, say) raises OSError from any of these
        for path in [directory, *directory.glob("*")] if directory.is_dir() else [directory]:
            if path.is_symlink() or not path.resolve().is_relative_to(base):
                raise ApiError(400, "lora_path leads out of the adapter directory (symlinks are not followed)",
                               param="lora_path")
        found = directory.is_dir()
    except OSError:
        raise ApiError(400, "lora_path is not a path this server's filesystem can open (too long?)",
                       param="lora_path") from None
    if not found:
        raise ApiError(404, "no such adapter directory under the server's adapter directory", param="lora_path")
    return directory


def _without_paths(message: str, root: Path, directory: Path, relative: str) -> str:
    for path in (str(directory), str(root.resolve()), str(root)):
        message = message.replace(path, relative if path == str(directory) else "<adapter-dir>")
    return message


# --- the application --------------------------------------------------------------------------


TENANT_ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions"}
ADMIN_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


class _Authenticate:
    """Who is calling, decided before a route reads its body (so a stranger learns nothing from
    validation errors): the caller's tenant goes into the request's state, an unknown key or a
    non-admin on an admin route is answered here."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path, key = scope["path"], _bearer(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
            try:
                if path in TENANT_ROUTES:
                    scope.setdefault("state", {})["tenant"] = self.service.caller(key)
                elif path in ADMIN_ROUTES or (path == "/metrics" and self.service.tenants is not None):
                    self.service.require_admin(key)
            except ApiError as err:
                return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(service: Service):
    """The ASGI application: FastAPI's routes behind the authentication."""
    app = FastAPI(title="lorakit", summary="One base model, many LoRA adapters, OpenAI's API", docs_url=None,
                  redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, err: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(list(err.errors()))
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HttpRequest, err: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if err.status_code == 404 else str(err.detail)
        return ApiError(err.status_code, message, code="not_found" if err.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _internal(request: HttpRequest, err: Exception) -> JSONResponse:
        return ApiError(500, f"internal error ({type(err).__name__})", "server_error").response()

    @app.get("/health", summary="Whether the server is up")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics (the admin key, when tenants are configured)")
    async def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", summary="The models this caller may use: the base model and its adapters")
    async def models(request: HttpRequest) -> dict:
        tenant = request.state.tenant
        ids = [service.base_name] + service.visible(tenant)
        return {"object": "list", "data": [
            {"id": i, "object": "model", "created": service.created, "owned_by": "lorakit",
             **({"parent": service.base_name} if i != service.base_name else {})} for i in ids]}

    @app.post("/v1/chat/completions", summary="A chat reply from the base model or an adapter")
    async def chat(body: ChatCompletionRequest, request: HttpRequest) -> Response:
        return await _complete(service, body, True, request)

    @app.post("/v1/completions", summary="A text completion from the base model or an adapter")
    async def completions(body: CompletionRequest, request: HttpRequest) -> Response:
        return await _complete(service, body, False, request)

    @app.post("/v1/load_lora_adapter", summary="Admin: load an adapter from the server's --adapter-dir")
    async def load(body: LoadAdapterRequest) -> dict:
        return await run_in_threadpool(service.load, body)  # reads files and waits for the engine's lock

    @app.post("/v1/unload_lora_adapter", summary="Admin: unload an adapter")
    async def unload(body: UnloadAdapterRequest) -> dict:
        return await run_in_threadpool(service.unload, body)

    return _Authenticate(app, service)


def _bearer(header: str) -> str | None:
    """The API key of an ``Authorization: Bearer <key>`` header."""
    if header[:7].lower() != "bearer ":
        return None
    return header[7:].strip() or None


# --- completions ------------------------------------------------------------------------------


async def _complete(service: Service, body: ChatCompletionRequest | CompletionRequest, chat: bool,
                    http: HttpRequest) -> Response:
    record = RequestRecord(service.metrics, "chat" if chat else "completions")
    status, job = 500, None
    try:
        tenant = http.state.tenant
        record.tenant = tenant.name if tenant is not None else "-"
        adapter = service.resolve(body.model, tenant)
        record.adapter = adapter or service.base_name
        params = _sampling(body, service.limits, chat)
        ids = await run_in_threadpool(_prompt_ids, service.engine.tokenizer, body, chat)
        if len(ids) > service.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                           f"{service.limits.max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        # Made here, not on the engine's thread: should the grammar's view of the vocabulary still be
        # in the making (start_service), waiting for it would stall every tenant's batch.
        json_answer = await run_in_threadpool(JsonObjectAnswer, service.engine.tokenizer) if params.json_object else None
        job = _Job(service, Request(adapter, ids, params, tenant=tenant.name if tenant else None,
                                    json_answer=json_answer), record, http)
        job.submit(tenant.max_requests if tenant is not None else service.tenant_limit)
        reply = _Reply(chat, body.model)
        first = await job.next_event()  # an error before the first token still gets its own status
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            status, handed_over = 200, job
            job = None  # the stream owns it now, and finishes its record
            return StreamingResponse(_stream(handed_over, reply, first, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, final = first.text, first
        while final.finish_reason is None:
            final = await job.next_event()
            text += final.text
        status = 200
        return JSONResponse(reply.whole(text, final))
    except ApiError as err:
        status = err.status
        raise
    finally:
        if job is not None:  # not handed to a stream: this handler is done with it, whatever happened
            job.end()
            record.finish(status)


_CLIENT_GONE, _TIMED_OUT = object(), object()  # put in a job's queue beside the engine's events


class _Mailbox:
    """Hands events from the engine's thread to the event loop, waking the loop once for all the
    events of a decoding step (one per running request) rather than once per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            first = len(self._pending) == 1
        if first:  # a flush is not yet scheduled: schedule one; later events ride along with it
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox() -> _Mailbox:
    loop = asyncio.get_running_loop()
    if loop not in _MAILBOXES:
        _MAILBOXES[loop] = _Mailbox(loop)
    return _MAILBOXES[loop]


class _Job:
    """One request in the engine, seen from the event loop: its events arrive on a queue, where a
    watcher also puts word that the client left and a timer that the deadline passed. One task
    and one timer per request, nothing per token."""

    def __init__(self, service: Service, request: Request, record: RequestRecord, http: HttpRequest) -> None:
        self.service, self.request, self.record = service, request, record
        self.events: asyncio.Queue = asyncio.Queue()
        loop, mailbox = asyncio.get_running_loop(), _mailbox()
        request.deliver = lambda event: mailbox.post(self.events, event)
        self.record.prompt_tokens = len(request.prompt_ids)
        self._timer = loop.call_later(service.limits.request_timeout_s, self._stop, _TIMED_OUT)
        self._watcher = asyncio.ensure_future(self._watch(http))

    async def _watch(self, http: HttpRequest) -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        self._stop(_CLIENT_GONE)

    def _stop(self, why: object) -> None:
        # The engine lets go at once, even if nobody reads the queue any more (a stream that never
        # started); the reader, if any, learns why from the queue.
        self.service.engine.cancel(self.request)
        self.events.put_nowait(why)

    def submit(self, tenant_limit: int | None) -> None:
        try:
            self.service.engine.submit(self.request, tenant_limit)
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", "server_busy") from None

    async def next_event(self) -> Event:
        """The request's next event; an ApiError if it failed, timed out or its client left."""
        event = await self.events.get()
        if event is _CLIENT_GONE:
            raise _ClientGone()
        if event is _TIMED_OUT:
            raise ApiError(504, "the request took too long", "server_error", "timeout")
        if event.text:
            self.record.saw_text()
        if event.finish_reason == "error":
            raise _failure_error(self.request.failure)
        if event.finish_reason is not None:
            self.record.completion_tokens = event.completion_tokens
        return event

    def end(self) -> None:
        """Whatever happened, the request leaves the engine (a no-op once it has finished)."""
        self.service.engine.cancel(self.request)
        self._timer.cancel()
        self._watcher.cancel()


class _ClientGone(ApiError):
    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection", "client_closed")


def _failure_error(failure: Exception | None) -> ApiError:
    if isinstance(failure, AdapterUnavailable):
        return ApiError(503, str(failure), "server_error", "adapter_unavailable")
    if isinstance(failure, RowError):
        return ApiError(500, str(failure), "server_error", "generation_failed")
    name = type(failure).__name__ if failure is not None else "unknown"
    return ApiError(500, f"generation failed on the server ({name})", "server_error", "generation_failed")


async def _stream(job: _Job, reply: _Reply, first: Event, include_usage: bool) -> AsyncIterator[bytes]:
    status = 200
    try:
        if reply.chat:
            yield _sse(reply.chunk(None, None, role=True))
        event = first
        while True:
            if event.text:
                yield _sse(reply.chunk(event.text, None))
            if event.finish_reason is not None:
                break
            event = await job.next_event()
        yield _sse(reply.chunk(None, event.finish_reason))
        if include_usage:
            yield _sse(reply.usage_chunk(event))
        yield b"data: [DONE]\n\n"
    except ApiError as err:  # the status line is sent: the error goes into the stream, then it ends
        status = err.status
        if not isinstance(err, _ClientGone):
            yield _sse(error_body(str(err), err.kind, err.code))
    except BaseException:  # cancelled (the client left) or failed: the request leaves the batch
        status = 499
        raise
    finally:
        job.end()
        job.record.finish(status)


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


# --- request bodies ---------------------------------------------------------------------------


def _sampling(body: ChatCompletionRequest | CompletionRequest, limits: Limits, chat: bool) -> SamplingParams:
    wanted = body.requested_max_tokens()
    max_tokens = wanted if wanted is not None else (limits.max_tokens if chat else min(16, limits.max_tokens))
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens must be an integer from 1 to {limits.max_tokens}", param="max_tokens")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stops(), seed=body.seed % 2**64 if body.seed is not None else None,
                              json_object=body.json_object())
    except LorakitError as err:
        raise ApiError(400, str(err)) from None


def _prompt_ids(tokenizer, body: ChatCompletionRequest | CompletionRequest, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        return chat_prompt_ids(tokenizer, messages)
    return tokenizer(body.text())["input_ids"]


class _Reply:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, suffix: str = "") -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + suffix, "created": self.created, "model": self.model}

    def whole(self, text: str, final: Event) -> dict:
        choice = {"index": 0, "finish_reason": final.finish_reason, "logprobs": None}
        choice |= {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return self._head() | {"choices": [choice], "usage": _usage(final)}

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._head(".chunk") | {"choices": [choice]}
        return self._head() | {"choices": [{"index": 0, "text": text or "", "finish_reason": finish_reason,
                                            "logprobs": None}]}

    def usage_chunk(self, final: Event) -> dict:
        return self._head(".chunk" if self.chat else "") | {"choices": [], "usage": _usage(final)}


def _usage(final: Event) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}


def start_service(model, tokenizer, adapters: dict[str, Path], tenants: Tenants | None = None,
                  adapter_root: Path | None = None, limits: Limits = Limits(), max_batch: int = 32,
                  max_waiting: int = 256, adapter_budget_bytes: int = 1 << 30, max_rank: int = 256,
                  served_name: str | None = None, admin_key: str | None = None,
                  packed_weights: bool = True) -> Service:
    """A Service over ``model`` with ``adapters`` (name -> directory) registered and its engine running
    (``packed_weights``: see Engine)."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_waiting=max_waiting, packed_weights=packed_weights)
    registry = AdapterRegistry(model, adapter_budget_bytes, max_rank, lock=engine.lock)
    metrics = Metrics(lambda: engine.running, lambda: engine.waiting, lambda: registry.loaded_count,
                      lambda: registry.loaded_bytes)
    registry.on_load = metrics.adapter_loaded
    engine.prepare, engine.release = registry.acquire, registry.release
    for name, directory in adapters.items():
        registry.register(name, directory)
    engine.start()
    # The JSON grammar's view of the vocabulary (~1.5 s), built while the server starts taking requests.
    threading.Thread(target=prepare_json_constraint, args=(tokenizer,), daemon=True).start()
    admin_digest = hashlib.sha256(admin_key.encode()).hexdigest() if admin_key else None
    return Service(engine, registry, served_name or served_model_name(model), metrics, tenants, admin_digest,
                   adapter_root, limits)


def served_model_name(model) -> str:
    """The base model's name for clients: a hub id as it is, a path by its last part (never the
    whole path: it would tell clients about the server's disks)."""
    name = str(getattr(model, "name_or_path", "") or "base")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return Path(name).name or "base"
