"""uvicorn, configured against slow and greedy clients.

uvicorn's HTTP/1.1 protocol (h11) frames requests correctly (a body is never read as a next
request) and has a keep-alive timeout and a cap on connections, but no deadline for receiving a
request: a client that sends half a request line, or a body one byte a minute, would hold its
connection (and with the cap, a place) forever. ``_TimedH11Protocol`` adds that deadline: from a
request's first byte (or the connection's opening) to its last, at most ``receive_timeout``
seconds, then 408 and the connection is closed. It also makes the cap count connections in use:
when a new connection would pass it, idle kept-alive ones (between two requests) are closed first,
as a client must expect of any kept-alive connection, so that clients which leave connections open
do not lock out new ones for the keep-alive timeout.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lorakit.serve.guard import Guard, is_loopback
from lorakit.serve.protocol import error_body

_TIMED_OUT_BODY = json.dumps(error_body("the request was not received in time", code="request_timeout")).encode()
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: " + str(len(_TIMED_OUT_BODY)).encode() + b"\r\n\r\n" + _TIMED_OUT_BODY)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256  # open at once; requests beyond are answered 503
    receive_timeout_s: float = 30.0  # to receive a whole request, headers and body
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this


class _TimedH11Protocol(H11Protocol):
    # Set per server by a subclass.
    receive_timeout_s = ConnectionLimits.receive_timeout_s
    max_connections = ConnectionLimits.max_connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._receive_deadline = None
        self._arm()
        for other in list(self.connections):
            if len(self.connections) <= self.max_connections:
                break
            if other is not self and other.idle:
                self.connections.discard(other)
                other.transport.close()

    @property
    def idle(self) -> bool:
        """Between two requests of a kept-alive connection: nothing received or owed."""
        return (self._receive_deadline is None and self.conn.their_state is h11.IDLE
                and (self.cycle is None or self.cycle.response_complete))

    def data_received(self, data: bytes) -> None:
        if self._receive_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the whole request is in

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._receive_deadline = self.loop.call_later(self.receive_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._receive_deadline is not None:
            self._receive_deadline.cancel()
            self._receive_deadline = None

    def _too_slow(self) -> None:
        self._receive_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_TIMED_OUT)  # no answer under way on this connection
        self.transport.close()  # a handler still reading the body sees a disconnect


def make_server(app, host: str, port: int, max_body_bytes: int, limits: ConnectionLimits = ConnectionLimits(),
                log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``app`` behind the Guard (a loopback server checks Host headers)."""
    protocol = type("TimedH11Protocol", (_TimedH11Protocol,), {"receive_timeout_s": limits.receive_timeout_s,
                                                                "max_connections": limits.max_connections})
    guarded = Guard(app, max_body_bytes, loopback_only=is_loopback(host))
    config = uvicorn.Config(
        guarded, host=host, port=port, http=protocol, ws="none", lifespan="off", interface="asgi3",
        log_level=log_level, access_log=False, server_header=False, date_header=False,
        # uvicorn counts the connection asking too: N + 1 lets N connections in.
        limit_concurrency=limits.max_connections + 1, timeout_keep_alive=limits.keep_alive_s, backlog=256)
    return uvicorn.Server(config)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port): bound here, so that a taken port is an OSError to report,
    not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@contextmanager
def serving_in_background(server: uvicorn.Server) -> Iterator[int]:
    """Run ``server`` on its own thread, on an ephemeral port of 127.0.0.1, for the block (tests and
    benchmarks); yields the port."""
    sock = listening_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="lorakit-http")
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            thread.join(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
