"""The API's process side: a listening socket, and uvicorn with a graceful drain on SIGTERM.

The first SIGTERM (or Ctrl-C) does not stop the server at once: new requests get 503 (load balancers
move on), the requests in flight, streams included, run to their end (up to a deadline), then
uvicorn shuts down and `ApiServer.run` returns normally, so the process exits 0. A second signal
stops at once.

    sock = bind("127.0.0.1", 8000)
    ApiServer(app, drain).run(sockets=[sock])

Connections are guarded below the app: a client has ``header_timeout_s`` to send each request's
headers (slowloris clients holding hundreds of half-open connections are cut off), and malformed
HTTP is answered with the same JSON error body as every other refusal, not uvicorn's plain text.
uvicorn's own limits stay on: keep-alive connections idle for 5 s are closed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import json
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from eqakit.errors import EqakitError
from eqakit.serve.protocol import ApiError

TRIM = "eqakit.trim"  # set in a request's scope by a route that held a lot of memory


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (find_library runs ldconfig in a subprocess)."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: RSS stays at its peak)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@dataclass
class Drain:
    """Shared by the gate and the server: whether we are draining, and how many requests are being answered."""

    timeout_s: float = 30.0
    draining: bool = False
    active: int = 0


class DrainGate:
    """ASGI middleware: counts the requests being answered; answers 503 once the server is draining."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            error = ApiError(503, "the server is shutting down", type="server_error", code="unavailable")
            await error.response()(scope, receive, send)
            return
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.active -= 1
            if scope.get(TRIM):
                await asyncio.to_thread(_malloc_trim)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers and JSON answers to malformed HTTP."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_deadline is None and self._awaiting_headers():
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._arm()  # the first bytes of a request (also of the next one on a kept-alive connection)
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()  # headers complete: the app's own body timeout takes over

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing() and self._awaiting_headers():
            self._send_error(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, f"malformed HTTP request: {msg}")

    def _send_error(self, status: int, message: str) -> None:
        """An OpenAI-shaped JSON error, written raw (h11's state may allow no response), then close."""
        body = json.dumps(ApiError(status, message, code="invalid_http").body()).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


class ApiServer(uvicorn.Server):
    """uvicorn whose first exit signal drains (see the module docstring)."""

    def __init__(
        self, app: Any, drain: Drain, *, log_level: str = "info", header_timeout_s: float = 10.0
    ) -> None:
        protocol = functools.partial(GuardedH11Protocol, header_timeout_s=header_timeout_s)
        super().__init__(
            uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, http=protocol)  # type: ignore[arg-type]
        )
        self.drain = drain
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None:
            # Not recorded as a captured signal: uvicorn would re-raise it after shutdown (exit by signal).
            self.drain.draining = True
            self.drain_deadline = time.monotonic() + self.drain.timeout_s
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (
            self.drain.active == 0 or time.monotonic() >= self.drain_deadline
        ):
            return True
        return await super().on_tick(counter)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound before the model loads, so a busy port fails at once)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise EqakitError(f"cannot listen on {host}:{port}: {exc} (set API_HOST / API_PORT)") from None
    return sock
