"""The transformers backend's scheduler: which waiting requests join the running batch, and when.

Every way of generating drives this one loop: `HFEngine.generate_iter` (predict: requests read
lazily from an iterator), `HFEngine.stream` (chat: one request) and `EngineWorker` (the API and the
web UI: requests from a thread-safe queue, with a batching window). Each gives `advance` a ``take``
function that hands over its next waiting job; the scheduler admits jobs in order while they fit
the batch (``max_batch_size`` sequences and ``max_batch_tokens`` of KV cache, as
`Runner.footprint` counts it: the budget and its accounting in one place), holds the first that
does not fit until room frees up (a request larger than the whole budget runs alone), and decodes
one step. A step that raises (out of memory) fails the requests in the batch, not the caller.
"""

from __future__ import annotations

from collections.abc import Callable

from eqakit.engine.hf.runner import Job, Runner

# A source of waiting jobs: called with whether this round admitted a job already (a blocking
# source waits only for the first); returns None when it has nothing to give now.
Take = Callable[[bool], Job | None]


class Scheduler:
    """A batch (`Runner`) and the admission rule that fills it."""

    def __init__(self, runner: Runner, max_batch_size: int, max_batch_tokens: int | None) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.held: Job | None = None  # taken from its source, waiting for room in the KV budget
        self.peak = 0  # most sequences decoded together so far (shows that batching happens)

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return self.runner.active

    @property
    def idle(self) -> bool:
        """Nothing decoding and nothing held: the next round starts from the source alone."""
        return self.runner.active == 0 and self.held is None

    def advance(self, take: Take) -> None:
        """Admit what fits from ``take`` (the held job first), then decode one step."""
        jobs = self._fill(take)  # outside the try: a bad request raises in the caller, as it should
        try:
            self.runner.admit(jobs)
            self.peak = max(self.peak, self.runner.active)
            self.runner.step()
        except Exception as error:  # a failed forward pass fails the batch's requests, nothing else
            self.runner.fail(error)

    def _fill(self, take: Take) -> list[Job]:
        jobs: list[Job] = []
        while self.runner.active + len(jobs) < self.max_batch_size:
            job, self.held = (self.held or take(bool(jobs))), None
            if job is None:
                break
            if job.is_cancelled():
                continue
            if not self.fits(jobs, job):
                self.held = job
                break
            jobs.append(job)
        return jobs

    def fits(self, jobs: list[Job], job: Job) -> bool:
        """Whether ``job`` may join the batch beside ``jobs`` within the KV-token budget (always, into
        an empty batch: a request longer than the whole budget runs alone)."""
        if self.max_batch_tokens is None or (self.runner.active == 0 and not jobs):
            return True
        joining = [j.prepared for j in jobs] + [job.prepared]
        return self.runner.footprint(joining) <= self.max_batch_tokens
