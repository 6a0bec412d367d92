"""What every inference backend offers, and the types they share: the seam between the backends
(`eqakit.engine.hf`, transformers; `eqakit.engine.vllm`, vLLM) and their callers (predict, the API,
the web UI, chat).

An `InferenceEngine` checks and renders requests (`prepare`, `plan`: the template and image budget
training used, `eqakit.data.encode.PromptFormat`), generates a dataset's answers as they finish
(`generate_iter`) or one request's text as it is produced (`stream`). A `Worker`, built from an
engine by `eqakit.engine.load.make_worker`, takes requests from any thread or event loop and
batches them (`submit` returns a `Submission`: text deltas, then a `Completion`). Callers name these
Protocols only, never a backend's class, so a backend can be added without touching them;
``tests/test_engine_interface.py`` checks that both backends implement them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any, Protocol, runtime_checkable

from eqakit.data.encode import Plan, PromptFormat
from eqakit.data.template import Message
from eqakit.data.video import VideoInfo
from eqakit.engine.params import Completion, Request, SamplingParams


class PreparedRequest(Protocol):
    """A request a backend has checked and rendered (`InferenceEngine.prepare`): ready to submit."""

    request: Request


class TextStream:
    """Text deltas of one request as they are generated; ``completion`` is set once iteration ends."""

    def __init__(self, source: Generator[str, None, Completion]) -> None:
        self._source = source
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        self.completion = yield from self._source


class EngineUnavailable(RuntimeError):
    """The worker is shutting down or has too many requests waiting (an API answers 503)."""


class RequestFailed(RuntimeError):
    """One request of `InferenceEngine.generate_iter` could not be answered (its cause is chained):
    ``index`` says which, so a caller can name the row instead of silently losing it."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"request {index} failed: {error}")
        self.index = index


_END = object()


class Submission:
    """A request in flight: its text deltas as they arrive, then its completion."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.future: Future[Completion] = Future()
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._loop = loop
        self._wake = asyncio.Event() if loop is not None else None
        self._cancelled = threading.Event()
        self.on_cancel: Callable[[], object] | None = None  # a backend's hook to stop the generation

    # called on the worker thread
    def _push(self, item: object) -> None:
        self._events.put(item)
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self._loop.call_soon_threadsafe(self._wake.set)

    def _delta(self, text: str) -> None:
        self._push(text)

    def _done(self, completion: Completion) -> None:
        if not self.future.done():
            self.future.set_result(completion)
        self._push(_END)

    def _error(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        self._push(_END)

    # called by the client
    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the result becomes CancelledError."""
        self._cancelled.set()
        self.future.cancel()
        self._push(_END)
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout)

    async def aresult(self) -> Completion:
        return await asyncio.wrap_future(self.future)

    def __iter__(self) -> Iterator[str]:
        """Text deltas, blocking; raises the request's error (or CancelledError) at the end."""
        while (item := self._events.get()) is not _END:
            yield item  # type: ignore[misc]
        self._raise_if_failed()

    async def astream(self) -> AsyncIterator[str]:
        """Text deltas without blocking the event loop (submit must have been called on that loop)."""
        if self._wake is None:
            raise RuntimeError("astream() needs a Submission made by submit() inside a running event loop")
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                await self._wake.wait()
                self._wake.clear()
                continue
            if item is _END:
                break
            yield item  # type: ignore[misc]
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.future.cancelled():
            raise CancelledError()
        error = self.future.exception(timeout=0) if self.future.done() else None
        if error is not None:
            raise error


@runtime_checkable
class InferenceEngine(Protocol):
    """A loaded model that answers requests (`eqakit.engine.load.load_engine` picks the backend)."""

    tokenizer: Any
    format: PromptFormat  # how prompts are rendered and bounded (from the config)
    defaults: SamplingParams  # the config's decoding settings

    def params(self, **overrides: Any) -> SamplingParams:
        """The config's decoding defaults with some fields replaced (None means "keep the default")."""
        ...

    def plan(
        self,
        messages: list[Message],
        image_sizes: list[tuple[int, int]],
        system: str | None = None,
        videos: Sequence[VideoInfo] = (),
    ) -> Plan:
        """Check that a prompt fits cutoff_len from its image sizes and probed videos alone (raises
        PromptTooLong / RequestError)."""
        ...

    def prepare(self, request: Request) -> PreparedRequest:
        """Check and render a request (raises RequestError / PromptTooLong); no model work."""
        ...

    def generate_iter(
        self, requests: Iterable[Request | PreparedRequest]
    ) -> Iterator[tuple[int, Completion]]:
        """(index, completion) pairs as requests finish, reading ``requests`` lazily (predict); a
        request that cannot be answered raises `RequestFailed` (never a missing pair)."""
        ...

    def stream(self, request: Request) -> TextStream:
        """Text deltas of one request (chat); the request is checked now."""
        ...

    def shutdown(self) -> None:
        """Release the model's resources (vLLM's processes; the transformers engine's caches) and
        refuse later requests (EngineUnavailable); idempotent."""
        ...

    def placement(self) -> dict[str, str]:
        """Where the model runs, for run records: ``backend``, ``device`` and ``dtype``."""
        ...


@runtime_checkable
class Worker(Protocol):
    """Batches requests submitted from any thread or event loop (the API's and the web UI's backend)."""

    in_flight: int  # requests submitted and not finished yet (health checks, shutdown)
    peak_batch: int  # most sequences decoded together so far (shows that batching happens)

    def start(self) -> Worker: ...

    def submit(self, request: Request | PreparedRequest) -> Submission:
        """Queue a request; raises RequestError for a bad one and EngineUnavailable while shutting down."""
        ...

    def close(self, timeout: float | None = 30.0) -> bool:
        """Refuse new requests, let those in flight finish (up to ``timeout``); True if all finished.
        The engine is not shut down: whoever loaded it calls `InferenceEngine.shutdown`."""
        ...
