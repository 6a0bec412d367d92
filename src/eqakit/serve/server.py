"""The API's process side: a listening socket, and uvicorn with a graceful drain on SIGTERM.

The first SIGTERM (or Ctrl-C) does not stop the server at once: new requests get 503 (load balancers
move on), the requests in flight, streams included, run to their end (up to a deadline), then
uvicorn shuts down and `ApiServer.run` returns normally, so the process exits 0. A second signal
stops at once.

    sock = bind("127.0.0.1", 8000)
    ApiServer(app, drain).run(sockets=[sock])
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from eqakit.errors import EqakitError
from eqakit.serve.protocol import ApiError


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


class ApiServer(uvicorn.Server):
    """uvicorn whose first exit signal drains (see the module docstring)."""

    def __init__(self, app: Any, drain: Drain, *, log_level: str = "info") -> None:
        super().__init__(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
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
