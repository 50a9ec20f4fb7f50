"""The OpenAI-compatible HTTP server over the engine and the registry (standard library only).

Routes: POST /v1/chat/completions, POST /v1/completions (both with ``stream: true`` as server-sent
events ending in ``data: [DONE]``), GET /v1/models, GET /health, and for the admin key
POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter. ``model`` is an adapter's name or the
base model's. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.serve.engine import Engine, Event, QueueFull, Request
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.tenants import Tenant, Tenants


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the most a request may ask for (and the default for chat)
    request_timeout_s: float = 300.0


DRAIN_LIMIT = 64 << 20  # an oversized body up to this is read and dropped before the 413; beyond, the socket closes


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class App:
    """What the handlers share: engine, registry, who may do what, and the limits."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, base_name: str, tenants: Tenants | None = None,
                 adapter_root: Path | None = None, limits: Limits = Limits()) -> None:
        self.engine, self.registry, self.base_name = engine, registry, base_name
        self.tenants, self.adapter_root, self.limits = tenants, adapter_root, limits
        self.created = int(time.time())

    # --- who ----------------------------------------------------------------------------------

    def caller(self, key: str | None) -> Tenant | None:
        """The caller's tenant (None on an open server, where every adapter is visible)."""
        if self.tenants is None:
            return None
        tenant = self.tenants.tenant(key)
        if tenant is None:
            raise ApiError(401, "invalid API key; send 'Authorization: Bearer <key>'", "authentication_error",
                           "invalid_api_key")
        return tenant

    def require_admin(self, key: str | None) -> None:
        if self.tenants is not None and not self.tenants.is_admin(key):
            raise ApiError(401, "this endpoint needs the admin key", "authentication_error", "invalid_api_key")

    def visible(self, tenant: Tenant | None) -> list[str]:
        names = self.registry.names()
        return names if tenant is None else [n for n in names if n in tenant.adapters]

    def resolve(self, model: object, tenant: Tenant | None) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for unknown and
        for another tenant's, with the same words."""
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: an adapter's name or the base model's", param="model")
        if model == self.base_name:
            return None
        if model not in self.visible(tenant):
            raise ApiError(404, f"the model {model!r} does not exist", code="model_not_found", param="model")
        return model

    # --- admin --------------------------------------------------------------------------------

    def load(self, body: dict) -> dict:
        name, relative = body.get("lora_name"), body.get("lora_path")
        if self.adapter_root is None:
            raise ApiError(400, "run-time loading is off; start the server with --adapter-dir DIR")
        if not isinstance(name, str) or not isinstance(relative, str):
            raise ApiError(400, "give 'lora_name' and 'lora_path' (a directory under the server's adapter directory)")
        directory = contained(self.adapter_root, relative)
        try:
            info = self.registry.register(name, directory)
        except LorakitError as err:
            raise ApiError(400, str(err)) from None
        return {"loaded": name, "rank": info.rank, "load_ms": round(info.load_ms, 2)}

    def unload(self, body: dict) -> dict:
        name = body.get("lora_name")
        if name not in self.registry:
            raise ApiError(404, f"the model {name!r} does not exist", code="model_not_found")
        try:
            self.registry.unregister(name)
        except LorakitError as err:
            raise ApiError(409, str(err)) from None
        return {"unloaded": name}


def contained(root: Path, relative: str) -> Path:
    """``root / relative``, refused unless it is a plain relative path whose every file stays under
    root once symlinks are resolved."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts or "\\" in relative:
        raise ApiError(400, "lora_path must be a relative path inside the adapter directory, without '..'",
                       param="lora_path")
    base = root.resolve()
    directory = base / relative
    for path in [directory, *directory.glob("*")] if directory.is_dir() else [directory]:
        if path.is_symlink() or not path.resolve().is_relative_to(base):
            raise ApiError(400, "lora_path leads out of the adapter directory (symlinks are not followed)",
                           param="lora_path")
    if not directory.is_dir():
        raise ApiError(404, f"no adapter directory {relative!r}", param="lora_path")
    return directory


# --- request bodies ---------------------------------------------------------------------------


def sampling_params(body: dict, limits: Limits, default_max_tokens: int) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be an integer from 1 to {limits.max_tokens}", param="max_tokens")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1 (one choice per request)", param="n")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    fields = {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "seed": body.get("seed")}
    for name, value in fields.items():
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise ApiError(400, f"{name} must be a number", param=name)
    if fields["seed"] is not None and not isinstance(fields["seed"], int):
        raise ApiError(400, "seed must be an integer", param="seed")
    if not isinstance(stop, list | tuple):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=float(fields["temperature"] or 0.0),
                              top_p=float(fields["top_p"] if fields["top_p"] is not None else 1.0),
                              stop=tuple(stop), seed=fields["seed"])
    except LorakitError as err:
        raise ApiError(400, str(err)) from None


def chat_prompt_ids(tokenizer, messages: object) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ApiError(400, "each message needs a role (system, user or assistant) and string content",
                           param="messages")
        clean.append({"role": m["role"], "content": m["content"]})
    text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_prompt_ids(tokenizer, prompt: object) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
    return tokenizer(prompt)["input_ids"]


# --- the handler ------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog; socketserver's 5 resets bursts of concurrent clients


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return _Server((host, port), type("Handler", (Handler,), {"app": app}))


class Handler(BaseHTTPRequestHandler):
    app: App
    protocol_version = "HTTP/1.1"
    server_version = "lorakit"

    def log_message(self, format: str, *args) -> None:
        pass  # the server prints its own one-line summary; no per-request stderr noise

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _handle(self, route) -> None:
        try:
            route()
        except ApiError as err:
            self._json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            self._json(500, ApiError(500, f"internal error: {type(err).__name__}", "server_error").body())

    def _key(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[7:].strip() if header.startswith("Bearer ") else None

    def _get(self) -> None:
        app = self.app
        if self.path == "/health":
            return self._json(200, {"status": "ok", "running_and_waiting": app.engine.busy})
        if self.path == "/v1/models":
            tenant = app.caller(self._key())
            ids = [app.base_name] + app.visible(tenant)
            return self._json(200, {"object": "list", "data": [
                {"id": i, "object": "model", "created": app.created, "owned_by": "lorakit",
                 **({"parent": app.base_name} if i != app.base_name else {})} for i in ids]})
        raise ApiError(404, f"no route GET {self.path}", code="not_found")

    def _post(self) -> None:
        app = self.app
        routes = {"/v1/chat/completions": True, "/v1/completions": False}
        if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            app.require_admin(self._key())
            body = self._body()
            return self._json(200, app.load(body) if self.path.endswith("/load_lora_adapter") else app.unload(body))
        if self.path not in routes:
            raise ApiError(404, f"no route POST {self.path}", code="not_found")
        chat = routes[self.path]
        tenant = app.caller(self._key())
        body = self._body()
        adapter = app.resolve(body.get("model"), tenant)
        params = sampling_params(body, app.limits, app.limits.max_tokens if chat else 16)
        tokenizer = app.engine.tokenizer
        ids = chat_prompt_ids(tokenizer, body.get("messages")) if chat else \
            completion_prompt_ids(tokenizer, body.get("prompt"))
        if len(ids) > app.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                           f"{app.limits.max_prompt_tokens}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        try:
            request = app.engine.submit(Request(adapter, ids, params))
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", "server_busy") from None
        reply = _Reply(chat, body["model"])
        if body.get("stream"):
            self._stream(request, reply, bool((body.get("stream_options") or {}).get("include_usage")))
        else:
            text, final = "", None
            for event in self._events(request):
                text += event.text
                final = event
            self._json(200, reply.whole(text, final))

    def _events(self, request: Request):
        deadline = time.monotonic() + self.app.limits.request_timeout_s
        while True:
            try:
                event: Event = request.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.app.engine.cancel(request)
                raise ApiError(504, "the request took too long", "server_error", "timeout") from None
            if event.finish_reason == "error":  # the server failed it (an adapter that no longer loads, ...)
                raise ApiError(500, f"generation failed: {event.text}", "server_error")
            yield event
            if event.finish_reason is not None:
                return

    def _stream(self, request: Request, reply: _Reply, include_usage: bool) -> None:
        events = self._events(request)
        first = next(events)  # an error before the first token still gets its own status code
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            if reply.chat:
                self._sse(reply.chunk(None, None, role=True))
            final = None
            for event in chain([first], events):
                if event.text:
                    self._sse(reply.chunk(event.text, None))
                final = event
            self._sse(reply.chunk(None, final.finish_reason))
            if include_usage:
                self._sse(reply.usage_chunk(final))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.app.engine.cancel(request)  # the client went away: free its row

    def _sse(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "send a Content-Length header with the JSON body")
        if int(length) > self.app.limits.max_body_bytes:
            self.close_connection = True
            remaining = int(length) if int(length) <= DRAIN_LIMIT else 0
            while remaining > 0:  # read it away, so the client is not cut off while still sending
                chunk = self.rfile.read(min(1 << 16, remaining))
                if not chunk:  # the client stopped sending
                    break
                remaining -= len(chunk)
            raise ApiError(413, f"the body is over {self.app.limits.max_body_bytes} bytes")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


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


def start_app(model, tokenizer, adapters: dict[str, Path], tenants: Tenants | None = None,
              adapter_root: Path | None = None, limits: Limits = Limits(), max_batch: int = 32,
              max_waiting: int = 256, adapter_budget_bytes: int = 1 << 30, max_rank: int = 256) -> App:
    """An App over ``model`` with ``adapters`` (name -> directory) registered and its engine running."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_waiting=max_waiting)
    registry = AdapterRegistry(model, adapter_budget_bytes, max_rank, lock=engine.lock)
    engine.prepare, engine.release = registry.acquire, registry.release
    for name, directory in adapters.items():
        registry.register(name, directory)
    engine.start()
    return App(engine, registry, str(getattr(model, "name_or_path", "") or "base"), tenants, adapter_root, limits)
