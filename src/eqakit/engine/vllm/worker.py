"""`eqakit.engine.base.Worker` over a `VllmEngine`: submit from any thread or loop, stream, cancel,
drain on close. vLLM schedules continuously, so there is no batching window to wait for."""

from __future__ import annotations

import threading
import time

from eqakit.engine.base import EngineUnavailable, Submission
from eqakit.engine.params import Request
from eqakit.engine.vllm.engine import VllmEngine, VllmPrepared


class VllmWorker:
    """The API's and the web UI's backend over a `VllmEngine` (see the module docstring)."""

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine
        self.in_flight = 0  # requests submitted whose generation has not ended inside vLLM yet
        self._closing = threading.Event()
        self._lock = threading.Lock()

    @property
    def peak_batch(self) -> int:
        """Most requests inside vLLM at once."""
        return self.engine.peak_running

    def start(self) -> VllmWorker:
        return self

    def submit(self, request: Request | VllmPrepared) -> Submission:
        """Queue a request; raises RequestError for a bad one and EngineUnavailable while shutting down."""
        if self._closing.is_set():
            raise EngineUnavailable("the server is shutting down")
        prepared = request if isinstance(request, VllmPrepared) else self.engine.prepare(request)
        with self._lock:
            self.in_flight += 1
        return self.engine.start(prepared, on_end=self._ended)

    def _ended(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def close(self, timeout: float | None = 30.0) -> bool:
        """Refuse new requests, let the ones in flight finish (up to ``timeout``); True if all finished.
        The engine stays up: its owner calls ``engine.shutdown()`` (as with the transformers backend)."""
        self._closing.set()
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.in_flight == 0
