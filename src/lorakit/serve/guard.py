"""The checks every request passes before any route sees it (an ASGI middleware).

- Host: a server listening on loopback answers only requests addressed to a loopback name, so a
  web page cannot reach it through DNS rebinding (a name of the attacker's that resolves to
  127.0.0.1).
- POST bodies must say ``Content-Type: application/json`` (415 otherwise): a browser sends a
  cross-site form or ``text/plain`` POST without asking, but never ``application/json``.
- Body size: a body without a length is counted as it arrives and refused as soon as it passes
  the limit; a declared length over the limit is refused without keeping the body (read away
  first, up to DRAIN_LIMIT, so that a client still sending gets the 413 rather than a broken
  pipe). Either way the connection is closed after the 413, so unread bytes are never taken for
  a next request.
"""

from __future__ import annotations

import ipaddress
import json

from lorakit.serve.protocol import error_body

DRAIN_LIMIT = 64 << 20  # an oversized body up to this is read and dropped before the 413; beyond, the socket closes


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    def __init__(self, app, max_body_bytes: int, loopback_only: bool) -> None:
        self.app, self.max_body_bytes, self.loopback_only = app, max_body_bytes, loopback_only

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if self.loopback_only and not is_loopback(_hostname(headers.get(b"host", ""))):
            return await _refuse(send, 421, "this server answers requests addressed to localhost only (Host header)",
                                 "misdirected_request")
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        media_type = headers.get(b"content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return await _refuse(send, 415, "send the body as JSON with 'Content-Type: application/json'",
                                 "unsupported_media_type")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            if declared.isdigit() and int(declared) <= DRAIN_LIMIT:
                await _drain(receive)
            return await _refuse(send, 413, f"the body is over {self.max_body_bytes} bytes", "body_too_large")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None  # the client left before sending its whole body
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _refuse(send, 413, f"the body is over {self.max_body_bytes} bytes", "body_too_large")
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            # The body once, then the connection's own messages (a disconnect, for routes that watch).
            return whole.pop() if whole else await receive()

        return await self.app(scope, replay, send)


async def _drain(receive) -> None:
    """Read a body to its end (or the client's leaving), keeping nothing."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _refuse(send, status: int, message: str, code: str) -> None:
    payload = json.dumps(error_body(message, "invalid_request_error", code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
