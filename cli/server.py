"""The HTTP service of ``uncnn-rt serve``: cloak, compare and classify over HTTP, and the page at ``/``.

The endpoints run the same runtime calls as the CLI (:func:`~uncnn_rt.runtime.cloak.cloak_image`,
:func:`~uncnn_rt.runtime.cloak.verify.verify`, :func:`~uncnn_rt.runtime.cloak.verify.compare_faces`,
:func:`~uncnn_rt.runtime.cloak.verify.classify_image`) on sessions loaded once per process.

**Privacy by construction.** A request body is read into memory (never more than the upload limit), the
multipart parser is told to keep file parts in memory, images are decoded from bytes, the cloaked file is
encoded to bytes and :func:`verify` re-decodes those very bytes, so no upload or result touches a disk.
Uploads, their file names and results are never logged: error messages name the form field (``image``,
``a``, ``b``), not the file. No telemetry, no access log unless asked for, no external resource on the page.

**Under load.** CPU-bound work runs in a thread pool of ``max_concurrency`` threads. In front of it, a
bounded queue admits at most ``max_concurrency + queue`` requests at a time, counted from before the
body is read (so memory is bounded too); beyond that the answer is 503 with ``Retry-After``. Every
request has a deadline; the cloak loop checks it (and whether the client is still there) at each attack
step and gives up with 503 when it passes. A job's slot is released only when its thread is done, so the
admission count is the real load.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Final, Generic, TypeAlias, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from uncnn_rt import __version__
from uncnn_rt.cli.cloak_cmd import CLASSIFIER, Outcome, cloak_details, split_models, visibility_details
from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime import zoo
from uncnn_rt.runtime.cloak.verify import classify_image, compare_faces, verify
from uncnn_rt.runtime.errors import (
    ImageTooLargeError,
    InputError,
    ModelError,
    NotAnImageError,
    UncnnError,
    UnsupportedImageError,
)
from uncnn_rt.runtime.imageio import (
    default_output_path,
    encode_image,
    load_image,
    lossy_round_trip,
    output_format,
)
from uncnn_rt.runtime.sessions import AttackSession, open_session

# uvicorn's own logger, so that startup lines and errors appear with uvicorn's (never an upload's content).
log = logging.getLogger("uvicorn.error")

CONFIG_ENV: Final = "UNCNN_SERVE_CONFIG"
"""Environment variable through which ``serve --workers N`` hands its settings to each worker process."""
FORM_SLACK: Final = 64 * 1024
"""Bytes allowed in a request body beyond its images: multipart headers and the option fields."""
HARD_GRACE: Final = 10.0
"""Seconds past a deadline after which a request is answered even if its thread has not stopped yet."""
MEDIA_TYPES: Final = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
}
NDJSON: Final = "application/x-ndjson"
REPORT_HEADER: Final = "X-Uncnn-Report"
VERDICT_HEADER: Final = "X-Uncnn-Verdict"

T = TypeVar("T")


@dataclass(frozen=True)
class ServeConfig:
    """What one server process does and how much it accepts.

    Attributes:
        device: execution device of the models (``cpu``, ``cuda``, ``auto`` or a provider name).
        models: recognizers a cloak uses by default (None: the shipped default ensemble).
        max_concurrency: requests computed at once (threads).
        queue: requests admitted to wait for a thread; None: 4 x ``max_concurrency``.
        max_upload_mb: largest image file accepted, in MB (10^6 bytes).
        max_megapixels: largest image accepted, read from its header before any pixel is decoded.
        timeout: seconds a request may take from admission to answer, waiting included.
    """

    device: str = "auto"
    models: tuple[str, ...] | None = None
    max_concurrency: int = 1
    queue: int | None = None
    max_upload_mb: float = 20.0
    max_megapixels: float = 24.0
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise InputError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.queue is not None and self.queue < 0:
            raise InputError(f"queue must be >= 0, got {self.queue}")
        for name in ("max_upload_mb", "max_megapixels", "timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise InputError(f"{name} must be a positive number, got {value}")

    @property
    def queue_size(self) -> int:
        return 4 * self.max_concurrency if self.queue is None else self.queue

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        data = json.loads(text)
        if data.get("models") is not None:
            data["models"] = tuple(data["models"])
        return cls(**data)


# ---------------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class Models:
    """The sessions a server process shares between its requests (onnxruntime sessions are thread-safe)."""

    recognizers: list[AttackSession]
    detector: cloaking.Detector
    classifier: AttackSession | None
    device: str

    def recognizers_for(self, names: list[str] | None) -> list[AttackSession]:
        """The default recognizers, or the named shipped ones (opened once, then cached by the runtime)."""
        if names is None:
            return self.recognizers
        return cloaking.load_recognizers(names, device=self.device)


def load_models(config: ServeConfig) -> Models:
    """Open the recognizers, the detector and the classifier once, before the first request.

    Raises:
        ModelError: a model is missing or broken. InputError: an unknown model name or device.
    """
    names = None if config.models is None else list(config.models)
    recognizers = cloaking.load_recognizers(names, device=config.device)
    detector = cloaking.load_detector(device=config.device)
    entries = {e.name: e for e in zoo.load_manifest()}
    classifier = (
        open_session(entries[CLASSIFIER].path, device=config.device) if CLASSIFIER in entries else None
    )
    return Models(recognizers, detector, classifier, config.device)


# ---------------------------------------------------------------------------------------------------
# the bounded work queue


class ApiError(Exception):
    """An answer other than 200: a status, a one-line message and optional headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class JobStopped(Exception):
    """A job gave up between two steps: its deadline passed, its client left or the server is stopping."""


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

    def __init__(self, max_concurrency: int, queue: int, timeout: float) -> None:
        self.max_concurrency = max_concurrency
        self.queue = queue
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="uncnn-work")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._running = 0
        self._served = 0
        self._mean_seconds = 5.0  # a first guess of one job's time, for Retry-After; then a running mean
        self._timed = 0  # jobs whose time went into the mean
        self._closed = False

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": self._running,
                "waiting": len(self._jobs) - self._running,
                "max_concurrency": self.max_concurrency,
                "queue": self.queue,
                "served": self._served,
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
            running, waiting = self._running, len(self._jobs) - self._running
        if self._closed:
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"})
        seconds = self.retry_after()
        raise ApiError(
            503,
            f"server busy: {running} request(s) running and {waiting} waiting, the most it takes; "
            f"retry in about {seconds} s",
            {"Retry-After": str(seconds)},
        )

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
        # The books are kept before the answer leaves, so /healthz never lags behind a client's answer.
        with self._lock:
            self._running -= 1
            self._jobs.discard(job)
            self._served += 1
            seconds = time.monotonic() - start
            # The first job replaces the guess; then a running mean that follows the load.
            self._mean_seconds = seconds if self._timed == 0 else 0.8 * self._mean_seconds + 0.2 * seconds
            self._timed += 1
        job.emit(event)

    async def next_event(self, job: Job, request: Request) -> Event:
        """The job's next event; stops the job when its client disconnects or it overruns its deadline."""
        assert job._events is not None
        pending = asyncio.ensure_future(job._events.get())
        while True:
            ready, _ = await asyncio.wait({pending}, timeout=0.5)
            if ready:
                return pending.result()
            if await request.is_disconnected():
                job.cancel("the client disconnected")
                pending.cancel()
                raise JobStopped("the client disconnected")
            if time.monotonic() > job.deadline + HARD_GRACE:
                job.cancel("the request overran its deadline")
                pending.cancel()
                raise JobStopped(f"the request took longer than this server's limit of {job.timeout:g} s")

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


# ---------------------------------------------------------------------------------------------------
# uploads, held in memory


@dataclass(frozen=True)
class Upload:
    form_field: str
    """The form field, used in messages instead of the user's file name."""
    filename: str
    """The client's file name, made safe for a download name; never logged."""
    data: bytes = field(repr=False)


async def read_form(request: Request, *, files: int, config: ServeConfig, job: Job) -> FormData:
    """The multipart form of ``request``, read into memory within the size limit and the deadline."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(
            415, f"expected a multipart/form-data body with the image file(s), got {content_type or 'none'}"
        )
    limit = files * config.max_upload_bytes + FORM_SLACK
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(config)
    try:
        body = await asyncio.wait_for(_read_body(request, limit, config), job.deadline - time.monotonic())
    except asyncio.TimeoutError:
        raise ApiError(408, "the upload did not arrive within the request time limit") from None

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=files, max_fields=32, max_part_size=4096)
    # File parts go to a SpooledTemporaryFile, which moves to disk past this size; the body is already
    # within the limit, so they always stay in memory.
    parser.spool_max_size = limit + 1
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.message}") from None


async def _read_body(request: Request, limit: int, config: ServeConfig) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(config)
    return bytes(body)


def _too_large(config: ServeConfig) -> ApiError:
    return ApiError(413, f"upload too large: the limit is {config.max_upload_mb:g} MB per image")


async def take_upload(form: FormData, name: str, config: ServeConfig) -> Upload:
    item = form.get(name)
    if not isinstance(item, UploadFile):
        raise ApiError(422, f"missing the file field {name!r} (multipart/form-data, with a file name)")
    data = await item.read()
    if len(data) > config.max_upload_bytes:
        raise _too_large(config)
    return Upload(name, safe_filename(item.filename or ""), data)


def safe_filename(name: str) -> str:
    """A client's file name reduced to a plain ``[A-Za-z0-9._-]`` name for ``Content-Disposition``."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")[-80:]
    return cleaned or "photo"


class Fields:
    """The option fields of a form, each parsed with a message naming the field and what was expected."""

    def __init__(self, form: FormData, allowed: tuple[str, ...], files: tuple[str, ...]) -> None:
        unknown = sorted(set(form.keys()) - set(allowed) - set(files))
        if unknown:
            raise ApiError(
                422, f"unknown field(s) {', '.join(unknown)}; expected {', '.join((*files, *allowed))}"
            )
        self._values = {k: v for k, v in form.items() if isinstance(v, str) and v.strip() != ""}

    def text(self, name: str) -> str | None:
        value = self._values.get(name)
        return None if value is None else value.strip()

    def number(self, name: str) -> float | None:
        text = self.text(name)
        try:
            return None if text is None else float(text)
        except ValueError:
            raise ApiError(422, f"field {name!r} must be a number, got {text!r}") from None

    def integer(self, name: str) -> int | None:
        text = self.text(name)
        try:
            return None if text is None else int(text)
        except ValueError:
            raise ApiError(422, f"field {name!r} must be an integer, got {text!r}") from None

    def flag(self, name: str) -> bool:
        text = self.text(name)
        if text is None:
            return False
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ApiError(422, f"field {name!r} must be true or false, got {text!r}")


# ---------------------------------------------------------------------------------------------------
# the work each endpoint hands to a thread


CLOAK_OPTIONS: Final = {
    "mode": ("string", "low, mid (default) or high"),
    "eps": ("number", "L-inf budget in grey levels 0..255, overriding the mode"),
    "steps": ("integer", "most attack steps per face, overriding the mode"),
    "ssim_min": ("number", "SSIM floor per face region, overriding the mode (0: none)"),
    "coarse": ("number", "perturbation grid step in crop pixels, overriding the mode's (1: per pixel)"),
    "scatter": ("number", "weight of each face's own random direction (0: off): unlinkable cloaks"),
    "cap": ("string", "visibility cap per face, overriding the mode: jpegQ, KxjpegQ (e.g. 2xjpeg75) or none"),
    "face": ("integer", "cloak only face N (1 = leftmost)"),
    "largest": ("boolean", "cloak only the largest face"),
    "no_align": ("boolean", "no face detection: the image's centred square is the face"),
    "models": ("string", "comma-separated recognizers (default: the server's ensemble)"),
    "seed": (
        "integer",
        "seed of the random draws (equal seeds, equal outputs; default: a fresh one, in the report)",
    ),
    "format": ("string", "output format: jpg, png or webp (default: the input's)"),
    "keep_location": ("boolean", "keep GPS EXIF (stripped by default)"),
}
"""The option fields of ``POST /v1/cloak``: OpenAPI type and description."""


@dataclass(frozen=True)
class CloakOptions:
    settings: cloaking.CloakSettings
    face: int | None
    largest: bool
    no_align: bool
    models: list[str] | None
    seed: int
    format: str | None
    keep_location: bool

    @classmethod
    def parse(cls, fields: Fields) -> CloakOptions:
        face = fields.integer("face")
        if face is not None and face < 1:
            raise InputError(f"face counts from 1, got {face}")
        return cls(
            settings=cloaking.settings_for(
                fields.text("mode") or cloaking.DEFAULT_MODE,
                eps=fields.number("eps"),
                steps=fields.integer("steps"),
                ssim_min=fields.number("ssim_min"),
                coarse=fields.number("coarse"),
                cap=fields.text("cap"),
                scatter=fields.number("scatter"),
            ),
            face=None if face is None else face - 1,
            largest=fields.flag("largest"),
            no_align=fields.flag("no_align"),
            models=split_models(fields.text("models")),
            seed=_seed(fields.integer("seed")),
            format=fields.text("format"),
            keep_location=fields.flag("keep_location"),
        )


@dataclass(frozen=True)
class Cloaked:
    data: bytes = field(repr=False)
    media_type: str
    filename: str
    report: dict[str, Any]


def cloak_work(
    job: Job, upload: Upload, options: CloakOptions, models: Models, config: ServeConfig
) -> Cloaked:
    """Decode, cloak, encode and verify one upload, all in memory, checking the job between steps."""
    loaded = load_image(upload.data, name=upload.form_field, max_pixels=config.max_pixels)
    recognizers = models.recognizers_for(options.models)
    detector = None if options.no_align else models.detector
    fmt = output_format(loaded, None, options.format)
    job.check()
    result = cloaking.cloak_image(
        loaded,
        recognizers=recognizers,
        detector=detector,
        mode=options.settings,
        face=options.face,
        largest=options.largest,
        no_align=options.no_align,
        seed=options.seed,
        progress=job.on_progress,
        saved=lossy_round_trip(loaded, fmt=fmt),
    )
    job.check()
    job.emit(Stage("verifying"))
    start = time.perf_counter()
    data = encode_image(
        result.image, loaded, fmt=fmt, quality=result.output_quality, strip_location=not options.keep_location
    )
    encoding = time.perf_counter() - start
    report = verify(loaded, data, result, recognizers=recognizers, detector=detector)
    filename = default_output_path(upload.filename, fmt).name
    details = cloak_details(result, loaded, extra_seconds=encoding)
    details["visibility"] = visibility_details(result, loaded, load_image(data, name=loaded.name).rgb, report)
    summary = Outcome(upload.filename, report=report, details=details).to_dict()
    summary["output"] = filename  # verify saw an in-memory file; the client gets this name
    return Cloaked(data, MEDIA_TYPES[fmt], filename, summary)


def compare_work(
    job: Job, first: Upload, second: Upload, fields: Fields, models: Models, config: ServeConfig
) -> dict[str, Any]:
    no_align = fields.flag("no_align")
    recognizers = models.recognizers_for(split_models(fields.text("models")))
    a = load_image(first.data, name=first.form_field, max_pixels=config.max_pixels)
    b = load_image(second.data, name=second.form_field, max_pixels=config.max_pixels)
    job.check()
    detector = None if no_align else models.detector
    sims = compare_faces(a, b, recognizers=recognizers, detector=detector, no_align=no_align)
    matches = sum(s.match for s in sims)
    return {
        "same_person": matches * 2 > len(sims),
        "matches": matches,
        "models": [
            {"name": s.name, "similarity": round(s.similarity, 6), "threshold": s.threshold, "match": s.match}
            for s in sims
        ],
    }


def classify_work(job: Job, upload: Upload, top: int, models: Models, config: ServeConfig) -> dict[str, Any]:
    if models.classifier is None:
        raise ModelError(f"the ImageNet classifier {CLASSIFIER} is not shipped in this installation")
    loaded = load_image(upload.data, name=upload.form_field, max_pixels=config.max_pixels)
    job.check()
    ranked = classify_image(loaded.rgb, models.classifier, top=top)
    return {
        "model": CLASSIFIER,
        "top": [{"label": label, "probability": round(p, 6)} for label, p in ranked],
    }


# ---------------------------------------------------------------------------------------------------
# errors as answers


def api_error(exc: BaseException, retry_after: Callable[[], int]) -> ApiError:
    """The HTTP answer for an error raised while serving a request (its message is one line)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, JobStopped):
        return ApiError(503, str(exc), {"Retry-After": str(retry_after())})
    if isinstance(exc, cloaking.NoFaceError):
        return ApiError(422, str(exc).replace("--no-align", "no_align=true"))
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, str(exc))
    if isinstance(exc, (NotAnImageError, UnsupportedImageError)):
        return ApiError(415, str(exc))
    if isinstance(exc, InputError):
        return ApiError(422, str(exc))
    if isinstance(exc, ModelError):
        log.error("model error: %s", exc)
        return ApiError(500, f"server model error: {exc}")
    log.error("internal error (%s)", type(exc).__name__, exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}); the request was not completed")


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"detail": error.detail}, status_code=error.status, headers=error.headers)


# ---------------------------------------------------------------------------------------------------
# the app

API_DESCRIPTION = """\
Cloak face photos against face recognizers, compare faces and classify images, with the shipped models
of uncnn-rt on onnxruntime. The page at `/` does the same in a browser.

**Privacy.** Uploads are processed in memory and never written to disk or logged; nothing is sent
anywhere else.

**Limits.** Each image file is limited in bytes (413) and in pixels, read from its header before it is
decoded (413, against decompression bombs). A file that is not an image gets 415, a photo without a
face 422, bad options 422; every error body is `{"detail": "<one line>"}`. When every worker and every
queue slot is taken the answer is 503 with `Retry-After`; a request that overruns the server's time
limit is stopped and also answered 503.

**`POST /v1/cloak` answers** (by the `Accept` header):

* default (`image/*`, `*/*`): the cloaked image, in the input's format unless `format` says otherwise,
  as an attachment named `NAME.cloaked.EXT`; the verification report as compact JSON in the
  `X-Uncnn-Report` header and `PROTECTED` / `NOT PROTECTED` in `X-Uncnn-Verdict`;
* `application/json`: `{"report": {...}, "image": "<base64>", "media_type": "...", "filename": "..."}`;
* `application/x-ndjson`: one JSON object a line, streamed: `{"event": "progress", "face", "faces",
  "step", "steps"}` per attack step, `{"event": "stage", "stage": "verifying"}`, then
  `{"event": "result", ...}` with the fields of the JSON answer, or `{"event": "error", "status",
  "detail"}` if the job fails after the first progress line (errors before it get their own status).

The report has the fields of `uncnn-rt cloak --json`: per face and per model the similarity before and
after, the model's threshold and PROTECTED when after is below it; SSIM and PSNR of the whole photo.
"""


def _form_body(files: dict[str, str], fields: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` for a multipart form (the endpoints parse their forms themselves)."""
    properties: dict[str, Any] = {
        name: {"type": "string", "format": "binary", "description": text} for name, text in files.items()
    }
    properties |= {name: {"type": kind, "description": text} for name, (kind, text) in fields.items()}
    schema = {"type": "object", "required": list(files), "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "malformed multipart body",
        408: "the upload did not arrive in time",
        413: "an image over the byte or pixel limit (decompression bomb)",
        415: "not multipart/form-data, or a file that is not a supported image",
        422: "no face found, a corrupt image or a bad option",
        503: "busy (queue full) or over the time limit; see Retry-After",
    }
    return {c: {"description": text[c]} for c in codes}


CLOAK_FORM: Final = _form_body({"image": "the photo (JPEG, PNG, WebP, TIFF, BMP, GIF)"}, CLOAK_OPTIONS)


def _static_text(name: str) -> str:
    return (resources.files("uncnn_rt.cli") / "static" / name).read_text(encoding="utf-8")


def create_app(config: ServeConfig | None = None, *, models: Models | None = None) -> FastAPI:
    """The service: sessions are ``models`` or loaded at startup; the work queue lives with the app."""
    config = config or ServeConfig()
    page, docs = _static_text("index.html"), _static_text("docs.html")
    state: dict[str, Any] = {"models": models}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state["models"] is None:
            state["models"] = await asyncio.to_thread(load_models, config)
        work = WorkQueue(config.max_concurrency, config.queue_size, config.timeout)
        app.state.work = work
        log.info(
            "uncnn-rt %s serving: %d worker thread(s), queue %d, %g MB / %g MP per image, timeout %g s",
            __version__,
            config.max_concurrency,
            config.queue_size,
            config.max_upload_mb,
            config.max_megapixels,
            config.timeout,
        )
        try:
            yield
        finally:
            await asyncio.to_thread(work.shutdown)

    app = FastAPI(
        title="uncnn-rt",
        version=__version__,
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )

    def loaded_models() -> Models:
        current = state["models"]
        assert current is not None, "models are loaded at startup"
        return current  # type: ignore[no-any-return]

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(UncnnError)
    async def on_domain_error(request: Request, exc: UncnnError) -> JSONResponse:
        return error_response(api_error(exc, app.state.work.retry_after))

    async def admitted(
        request: Request, files: tuple[str, ...], allowed: tuple[str, ...]
    ) -> tuple[Job, list[Upload], Fields]:
        work: WorkQueue = request.app.state.work
        job = work.admit()
        try:
            form = await read_form(request, files=len(files), config=config, job=job)
            fields = Fields(form, allowed, files)
            uploads = [await take_upload(form, name, config) for name in files]
        except BaseException:
            work.release(job)
            raise
        return job, uploads, fields

    async def run(request: Request, job: Job, work_fn: Callable[[Job], T]) -> T:
        work: WorkQueue = request.app.state.work
        work.submit(job, work_fn)
        try:
            result: T = await work.outcome(job, request)
        except BaseException as exc:
            raise api_error(exc, work.retry_after) from None
        return result

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return HTMLResponse(docs)

    @app.get("/healthz", summary="Liveness and load: requests running and waiting")
    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "version": __version__, **request.app.state.work.stats()}

    @app.get("/v1/models", summary="The shipped models, the cloak modes and this server's limits")
    async def list_models() -> dict[str, Any]:
        current = loaded_models()
        in_use = {r.name for r in current.recognizers}
        return {
            "models": [
                {
                    "name": e.name,
                    "kind": e.kind,
                    "role": e.role,
                    "license": e.license,
                    "source": f"{e.source.get('package', '?')}@{e.source.get('version', '?')}",
                    "threshold": e.threshold,
                    "default_ensemble": e.in_default_ensemble,
                    "cloaks_by_default": e.name in in_use,
                    "dev": e.raw.get("dev") or {},
                }
                for e in zoo.load_manifest()
            ],
            "modes": {
                name: {
                    "description": m.describe(),
                    "cap": m.cap_label,
                    "eps": m.eps,
                    "steps": m.steps,
                    "ssim_min": m.ssim_min,
                    "coarse": m.coarse,
                    "scales": list(m.scales),
                    "schedule": m.schedule,
                    "schedule_floor": m.schedule_floor,
                }
                for name, m in cloaking.MODES.items()
            },
            "default_mode": cloaking.DEFAULT_MODE,
            "limits": {
                "max_upload_mb": config.max_upload_mb,
                "max_megapixels": config.max_megapixels,
                "timeout_s": config.timeout,
            },
        }

    @app.post(
        "/v1/cloak",
        summary="Cloak the faces of a photo and verify the result",
        openapi_extra=CLOAK_FORM,
        responses={
            200: {
                "description": "the cloaked image (or JSON / NDJSON, by Accept)",
                "content": {"image/*": {}, "application/json": {}, NDJSON: {}},
            },
            **_error_docs(400, 408, 413, 415, 422, 503),
        },
        response_class=Response,
    )
    async def cloak_endpoint(request: Request) -> Response:
        job, (upload,), fields = await admitted(request, ("image",), tuple(CLOAK_OPTIONS))
        try:
            options = CloakOptions.parse(fields)
        except BaseException:
            request.app.state.work.release(job)
            raise
        current = loaded_models()

        def work_fn(j: Job) -> Cloaked:
            return cloak_work(j, upload, options, current, config)

        accept = request.headers.get("accept", "")
        if NDJSON in accept:
            return await stream_cloak(request, job, work_fn)
        cloaked = await run(request, job, work_fn)
        if "application/json" in accept and "image/" not in accept:
            return JSONResponse(_cloak_json(cloaked), headers={"Cache-Control": "no-store"})
        return Response(
            cloaked.data,
            media_type=cloaked.media_type,
            headers={
                "Content-Disposition": f'attachment; filename="{cloaked.filename}"',
                REPORT_HEADER: json.dumps(cloaked.report, separators=(",", ":")),
                VERDICT_HEADER: "PROTECTED" if cloaked.report["status"] == "protected" else "NOT PROTECTED",
                "Cache-Control": "no-store",
            },
        )

    async def stream_cloak(request: Request, job: Job, work_fn: Callable[[Job], Cloaked]) -> Response:
        """Progress lines then the result; the stream starts with the first attack step, so that errors
        found before it (not an image, no face) still get their own status."""
        work: WorkQueue = request.app.state.work
        work.submit(job, work_fn)
        try:
            first = await work.next_event(job, request)
        except BaseException as exc:
            raise api_error(exc, work.retry_after) from None
        if isinstance(first, Failed):
            raise api_error(first.error, work.retry_after)

        async def lines() -> AsyncIterator[bytes]:
            event: Event = first
            try:
                while True:
                    yield (json.dumps(_event_json(event, work.retry_after)) + "\n").encode()
                    if isinstance(event, (Finished, Failed)):
                        return
                    event = await work.next_event(job, request)
            except JobStopped as exc:
                failed = _event_json(Failed(exc), work.retry_after)
                yield (json.dumps(failed) + "\n").encode()
            finally:
                job.cancel("the client disconnected")

        return StreamingResponse(lines(), media_type=NDJSON, headers={"Cache-Control": "no-store"})

    @app.post(
        "/v1/compare",
        summary="Same person? Per-model similarity of the largest face in a and in b",
        openapi_extra=_form_body(
            {"a": "first photo", "b": "second photo"},
            {
                "no_align": ("boolean", "compare the images' centred squares, without face detection"),
                "models": ("string", "comma-separated recognizers (default: the server's ensemble)"),
            },
        ),
        responses=_error_docs(400, 408, 413, 415, 422, 503),
    )
    async def compare_endpoint(request: Request) -> dict[str, Any]:
        job, (a, b), fields = await admitted(request, ("a", "b"), ("no_align", "models"))
        current = loaded_models()
        return await run(request, job, lambda j: compare_work(j, a, b, fields, current, config))

    @app.post(
        "/v1/classify",
        summary="Top ImageNet classes (the shipped EfficientNet-Lite0)",
        openapi_extra=_form_body(
            {"image": "the photo"}, {"top": ("integer", "how many classes (default 5, at most 50)")}
        ),
        responses=_error_docs(400, 408, 413, 415, 422, 503),
    )
    async def classify_endpoint(request: Request) -> dict[str, Any]:
        job, (upload,), fields = await admitted(request, ("image",), ("top",))
        top = fields.integer("top")
        top = 5 if top is None else top
        if not 1 <= top <= 50:
            request.app.state.work.release(job)
            raise ApiError(422, f"field 'top' must be in 1..50, got {top}")
        current = loaded_models()
        return await run(request, job, lambda j: classify_work(j, upload, top, current, config))

    return app


def _cloak_json(cloaked: Cloaked) -> dict[str, Any]:
    return {
        "report": cloaked.report,
        "image": base64.b64encode(cloaked.data).decode("ascii"),
        "media_type": cloaked.media_type,
        "filename": cloaked.filename,
    }


def _seed(given: int | None) -> int:
    """The request's seed, or a fresh one (reported back), so that cloaks cannot be predicted."""
    return secrets.randbelow(2**31) if given is None else given


def _event_json(event: Event, retry_after: Callable[[], int]) -> dict[str, Any]:
    if isinstance(event, cloaking.CloakProgress):
        return {"event": "progress", **asdict(event)}
    if isinstance(event, Stage):
        return {"event": "stage", "stage": event.stage}
    if isinstance(event, Finished):
        return {"event": "result", **_cloak_json(event.value)}
    error = api_error(event.error, retry_after)
    return {"event": "error", "status": error.status, "detail": error.detail}


def app_from_environment() -> FastAPI:
    """The app of one ``serve --workers N`` worker process, configured through :data:`CONFIG_ENV`."""
    text = os.environ.get(CONFIG_ENV)
    return create_app(ServeConfig.from_json(text) if text else ServeConfig())
