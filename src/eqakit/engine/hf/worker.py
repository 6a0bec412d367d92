"""One thread that owns the engine and batches whatever requests are waiting: the API server's backend.

The event loop (or any thread) calls `EngineWorker.submit`, which checks and tokenizes the request
right away (a bad request raises RequestError in the caller, before it is queued) and returns a
`Submission`. The worker thread waits a short batching window after the first request so that
concurrent requests start together, then decodes continuously: new requests join the running
batch as soon as there is room, finished ones leave at once. Text reaches the caller as deltas,
through a blocking iterator or an async one (for asyncio servers: nothing blocks the loop).

    worker = EngineWorker(engine).start()
    submission = worker.submit(Request(messages, engine.params(max_new_tokens=64)))
    async for delta in submission.astream(): ...       # or: for delta in submission: ...
    completion = await submission.aresult()           # or: submission.result(timeout=60)
    worker.close()                                    # finishes in-flight requests, then stops
    engine.shutdown()                                 # the owner releases the engine
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future

from eqakit.engine.base import EngineUnavailable, Submission
from eqakit.engine.hf.engine import HFEngine
from eqakit.engine.hf.prepare import Prepared
from eqakit.engine.hf.runner import Job
from eqakit.engine.hf.scheduler import Take
from eqakit.engine.params import Completion, Request


class EngineWorker:
    """Runs an `HFEngine` on a background thread and batches the requests submitted to it."""

    def __init__(self, engine: HFEngine, *, batch_window_s: float = 0.01, max_waiting: int = 4096) -> None:
        self.engine = engine
        self.batch_window_s = batch_window_s
        self.max_waiting = max_waiting
        self._waiting: queue.Queue[tuple[Job, Submission]] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eqakit-engine", daemon=True)
        self.in_flight = 0  # requests submitted and not yet finished (for health checks and shutdown)
        self.peak_batch = 0  # most sequences decoded together so far (shows that batching happens)
        self._count_lock = threading.Lock()

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def submit(self, request: Request | Prepared) -> Submission:
        """Queue a request; raises RequestError for a bad one and EngineUnavailable while shutting down.

        An asyncio server passes a request it prepared (`HFEngine.prepare`) off the event loop.
        """
        if self._closing.is_set() or self.engine.closed:
            raise EngineUnavailable("the server is shutting down")
        if self._waiting.qsize() >= self.max_waiting:
            raise EngineUnavailable(f"too many requests waiting ({self.max_waiting}); try again later")
        prepared = request if isinstance(request, Prepared) else self.engine.prepare(request)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        submission = Submission(loop)
        job = Job(
            prepared,
            on_done=submission._done,
            on_delta=submission._delta,
            on_error=submission._error,
            cancelled=lambda: submission.cancelled,
        )
        with self._count_lock:
            self.in_flight += 1
        submission.future.add_done_callback(self._finished)
        self._waiting.put((job, submission))
        return submission

    def _finished(self, _: Future[Completion]) -> None:
        with self._count_lock:
            self.in_flight -= 1

    def close(self, timeout: float | None = 30.0) -> bool:
        """Refuse new requests, let the ones in flight finish (up to ``timeout``), stop the thread;
        True if all finished. The engine stays loaded: its owner calls ``engine.shutdown()``."""
        self._closing.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _taker(self, block: bool) -> Take:
        """The queue as the scheduler's source: when ``block`` (nothing is decoding), wait for a
        first job, then a batching window for more; otherwise take only what is already waiting."""
        deadline: float | None = None

        def take(admitted: bool) -> Job | None:
            nonlocal deadline
            while True:
                try:
                    if block and not admitted and deadline is None:
                        job, _ = self._waiting.get(timeout=0.1)
                        deadline = time.monotonic() + self.batch_window_s
                    elif deadline is not None and (left := deadline - time.monotonic()) > 0:
                        job, _ = self._waiting.get(timeout=left)
                    else:
                        job, _ = self._waiting.get_nowait()
                    return job
                except queue.Empty:
                    if not (block and not admitted and deadline is None) or self._closing.is_set():
                        return None

        return take

    def _run(self) -> None:
        try:
            scheduler = self.engine.scheduler()
        except EngineUnavailable:  # the engine is shut down: `submit` refuses every request
            return
        while True:
            if scheduler.idle and self._closing.is_set() and self._waiting.empty():
                return
            scheduler.advance(self._taker(block=scheduler.idle))
            self.peak_batch = scheduler.peak
