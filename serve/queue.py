"""The bounded work queue: at most ``max_concurrency`` jobs computing on threads and ``queue`` waiting.

A request's body is read in an upload slot (:meth:`WorkQueue.uploading`), of which there are a fixed
number apart from the computing and queue slots, so that slow or stalled uploads hold no computing slot
and the bodies in memory stay bounded. The request is then admitted (:meth:`WorkQueue.admit`); beyond
the slots the answer is 503 with ``Retry-After``. A job's slot is released only when its thread is done,
so the count is the real load. The job's thread checks its deadline, and whether it was cancelled, at
each attack step (:meth:`Job.check`); the request checks, at least every :data:`POLL` seconds, whether
its client is still there, and cancels the job when it is not.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeAlias, TypeVar

from fastapi import Request

from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.serve.errors import ApiError, JobStopped

HARD_GRACE: Final = 10.0
"""Seconds past a deadline after which a request is answered even if its thread has not stopped yet."""

POLL: Final = 0.5
"""Seconds between two checks, by a waiting request, that its client is still connected."""

T = TypeVar("T")

__all__ = ["Event", "Failed", "Finished", "Job", "JobStopped", "Stage", "WorkQueue"]


@dataclass(frozen=True)
class Stage:
    """A progress event that is not an attack step (``verifying``)."""

    stage: str


@dataclass(frozen=True)
class Finished(Generic[T]):
    value: T


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event: TypeAlias = cloaking.CloakProgress | Stage | Finished[Any] | Failed


@dataclass(eq=False)
class Job:
    """One admitted request: its deadline, a stop flag its thread checks, and the events it reports."""

    deadline: float
    timeout: float
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = ""
    submitted: bool = False
    started: float | None = None
    """``time.monotonic()`` when a worker thread began computing it; None while it waits."""
    _checked: float = 0.0
    """``time.monotonic()`` of the last check that the client is still connected."""
    _loop: asyncio.AbstractEventLoop | None = None
    _events: asyncio.Queue[Event] | None = None

    def check(self) -> None:
        """Raise :class:`JobStopped` when the job should stop (called between steps, in its thread)."""
        if self.stop.is_set():
            raise JobStopped(self.stop_reason or "the request was cancelled")
        if time.monotonic() > self.deadline:
            raise JobStopped(f"the request took longer than this server's limit of {self.timeout:g} s")

    def cancel(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    def emit(self, event: Event) -> None:
        """Hand an event to the waiting request (thread-safe; dropped once the event loop has closed)."""
        if self._loop is None or self._events is None:
            return
        with suppress(RuntimeError):  # the loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def on_progress(self, progress: cloaking.CloakProgress) -> None:
        """The cloak's progress callback: stop here when asked, else report the step."""
        self.check()
        self.emit(progress)


class WorkQueue:
    """At most ``max_concurrency`` jobs computing and ``queue`` waiting; more is refused with 503."""

    def __init__(self, max_concurrency: int, queue: int, timeout: float, uploads: int | None = None) -> None:
        self.max_concurrency = max_concurrency
        self.queue = queue
        self.timeout = timeout
        self.uploads = 2 * (max_concurrency + queue) if uploads is None else uploads
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="uncnn-work")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._running = 0
        self._reading = 0
        self._served = 0
        self._failed = 0
        self._mean_seconds = 5.0  # a first guess of one job's time, for Retry-After; then a running mean
        self._timed = 0  # jobs whose time went into the mean
        self._closed = False

    def stats(self) -> dict[str, int]:
        """Jobs running and waiting, uploads being read, and the jobs that ended: ``served`` with a
        result (an image, a comparison, classes), ``failed`` with an error (no face, a corrupt image,
        over the time limit, the client gone). Requests refused before they became a job (a bad form,
        503 busy) are in neither."""
        with self._lock:
            return {
                "running": self._running,
                "waiting": len(self._jobs) - self._running,
                "uploading": self._reading,
                "max_concurrency": self.max_concurrency,
                "queue": self.queue,
                "uploads": self.uploads,
                "served": self._served,
                "failed": self._failed,
            }

    def retry_after(self) -> int:
        """Seconds until a slot is likely free, at the mean job time.

        A refused request needs one slot, and one frees as soon as any running job ends, not once the
        whole queue has drained: so the estimate is the least time a running job has left (the mean job
        time, less how long it has run), or one mean job time while none has started yet.
        """
        now = time.monotonic()
        with self._lock:
            started = [j.started for j in self._jobs if j.started is not None]
            mean = self._mean_seconds
        estimate = min((max(mean - (now - t), 0.0) for t in started), default=mean)
        return int(min(max(math.ceil(estimate), 1), 120))

    def admit(self) -> Job:
        """A slot for one request, or :class:`ApiError` 503 when every slot is taken."""
        with self._lock:
            full = self._closed or len(self._jobs) >= self.max_concurrency + self.queue
            if not full:
                job = Job(deadline=time.monotonic() + self.timeout, timeout=self.timeout)
                self._jobs.add(job)
                return job
        raise self._busy()

    def _busy(self) -> ApiError:
        with self._lock:
            running, waiting = self._running, len(self._jobs) - self._running
        if self._closed:
            return ApiError(503, "the server is shutting down", {"Retry-After": "5"})
        seconds = self.retry_after()
        return ApiError(
            503,
            f"server busy: {running} request(s) running and {waiting} waiting, the most it takes; "
            f"retry in about {seconds} s",
            {"Retry-After": str(seconds)},
        )

    @contextmanager
    def uploading(self) -> Iterator[None]:
        """An upload slot while a request's body is read: 503 at once when the work slots are all taken
        (no body is read only to be refused) or every upload slot is; the slot is held only while
        reading, never while computing."""
        with self._lock:
            jobs_full = self._closed or len(self._jobs) >= self.max_concurrency + self.queue
            reading_full = self._reading >= self.uploads
            if not (jobs_full or reading_full):
                self._reading += 1
        if jobs_full:
            raise self._busy()
        if reading_full:
            seconds = max(self.retry_after(), 1)
            raise ApiError(
                503,
                f"server busy: {self.uploads} upload(s) arriving, the most it reads at once; "
                f"retry in about {seconds} s",
                {"Retry-After": str(seconds)},
            )
        try:
            yield
        finally:
            with self._lock:
                self._reading -= 1

    def release(self, job: Job) -> None:
        """Free the slot of a job that was never handed to a thread (a bad upload, an early error)."""
        if not job.submitted:
            with self._lock:
                self._jobs.discard(job)

    def submit(self, job: Job, work: Callable[[Job], T]) -> None:
        """Run ``work(job)`` on a worker thread; its events (progress, then the outcome) go to the job."""
        job._loop = asyncio.get_running_loop()
        job._events = asyncio.Queue()
        job.submitted = True
        self._executor.submit(self._run, job, work)

    def _run(self, job: Job, work: Callable[[Job], T]) -> None:
        start = time.monotonic()
        with self._lock:
            self._running += 1
            job.started = start
        event: Event
        try:
            job.check()
            event = Finished(work(job))
        except BaseException as exc:  # every outcome, errors included, goes back to the request
            event = Failed(exc)
        release_memory()
        # The books are kept before the answer leaves, so /healthz never lags behind a client's answer.
        with self._lock:
            self._running -= 1
            self._jobs.discard(job)
            if isinstance(event, Finished):
                self._served += 1
            else:
                self._failed += 1
            seconds = time.monotonic() - start
            # The first job replaces the guess; then a running mean that follows the load.
            self._mean_seconds = seconds if self._timed == 0 else 0.8 * self._mean_seconds + 0.2 * seconds
            self._timed += 1
        job.emit(event)

    async def next_event(self, job: Job, request: Request) -> Event:
        """The job's next event; stops the job when its client disconnects or it overruns its deadline.

        The client is checked at least every :data:`POLL` seconds, however fast the events come (a
        cloak's steps can take less than that, and a check only while none came never happened)."""
        assert job._events is not None
        pending = asyncio.ensure_future(job._events.get())
        try:
            while True:
                now = time.monotonic()
                if now - job._checked >= POLL:
                    job._checked = now
                    if await request.is_disconnected():
                        job.cancel("the client disconnected")
                        raise JobStopped("the client disconnected")
                    if now > job.deadline + HARD_GRACE:
                        job.cancel("the request overran its deadline")
                        raise JobStopped(
                            f"the request took longer than this server's limit of {job.timeout:g} s"
                        )
                wait = max(job._checked + POLL - time.monotonic(), 0.0)
                await asyncio.wait({pending}, timeout=wait)
                if pending.done():
                    event: Event = pending.result()
                    return event
        finally:
            if not pending.done():
                pending.cancel()

    async def outcome(self, job: Job, request: Request) -> Any:
        """Wait for the job's result (progress events are skipped); its error is raised here."""
        while True:
            event = await self.next_event(job, request)
            if isinstance(event, Finished):
                return event.value
            if isinstance(event, Failed):
                raise event.error

    def shutdown(self) -> None:
        """Refuse new work, stop queued and running jobs at their next step, and wait for the threads."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel("the server is shutting down")
        self._executor.shutdown(wait=True)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Hand the heap pages a finished job freed back to the system.

    A cloak's arrays are freed when it ends, but glibc keeps the pages for the next allocation, so a
    14-face photo left a server at 1.4 GB resident long after its answer; trimming brings it back to
    within about 130 MB of the idle size (``README.md``, the service's memory figures)."""
    if _TRIM is not None:
        _TRIM(0)
