"""The local engine of the batch jobs: a process pool, one onnxruntime session per worker, results in
input order with a bounded number of tasks in flight (``jobs.ray_engine`` is the same on Ray).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession, open_session

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class WorkerSpec:
    """How each worker opens its session."""

    model: str
    device: str
    threads: int


_SESSION: list[AttackSession] = []


def init_worker(spec: WorkerSpec) -> None:
    """Open this process's session (once per worker)."""
    _SESSION[:] = [open_session(spec.model, device=spec.device, intra_op_threads=spec.threads)]


def worker_session() -> AttackSession:
    if not _SESSION:
        raise RuntimeError("init_worker was not called in this process")
    return _SESSION[0]


def ordered_map(
    work: Callable[[T], R],
    chunks: Iterable[T],
    *,
    spec: WorkerSpec,
    workers: int,
) -> Iterator[R]:
    """``work`` over ``chunks`` in ``workers`` processes (each with its own session), results in input
    order, with at most ``2 * workers`` chunks in flight. ``workers == 1`` runs in this process."""
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        init_worker(spec)
        for chunk in chunks:
            yield work(chunk)
        return
    # spawn: a fork would copy onnxruntime's thread pools and the parent's session mid-flight.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(spec,)) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(work, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
