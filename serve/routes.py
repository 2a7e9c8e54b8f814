"""The endpoints of the service, on one :class:`~fastapi.APIRouter`.

The endpoints parse their multipart forms themselves (within the upload limit, in memory) and hand the
work to the app's :class:`~uncnn_rt.serve.queue.WorkQueue`; the configuration, the models and the queue
live on ``app.state`` and reach the endpoints as dependencies.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from uncnn_rt import __version__
from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.cloak.report import split_models
from uncnn_rt.serve.config import Models, ServeConfig
from uncnn_rt.serve.errors import ApiError, JobStopped, api_error
from uncnn_rt.serve.forms import CLOAK_OPTIONS, CloakOptions, Fields, Upload, read_form, take_upload
from uncnn_rt.serve.queue import Event, Failed, Finished, Job, Stage, WorkQueue
from uncnn_rt.serve.work import CloakedUpload, classify_work, cloak_work, compare_work

NDJSON: Final = "application/x-ndjson"
REPORT_HEADER: Final = "X-Uncnn-Report"
VERDICT_HEADER: Final = "X-Uncnn-Verdict"

REPORT_HEADER_MAX: Final = 4096
"""Most bytes of the ``X-Uncnn-Report`` header. A report over it (a group photo's: about 800 bytes a
face) is replaced there by its summary, marked ``"truncated": true``; the JSON answer has it whole.
Proxies refuse headers of some KB (8 KB in nginx by default), and the header was 28 KB for 36 faces."""

MODE_SUMMARIES: Final = {
    "low": "Lightest: never more visible than saving the photo again as an ordinary JPEG; "
    "it protects the fewest faces.",
    "mid": "Balanced (the default): each face gets the least change that protects it, where it protects "
    "most, at most three times as visible as an ordinary JPEG re-save; the change can show on the eyes, "
    "nose and mouth when you look closely.",
    "high": "Strongest: the same ceiling as mid with twice its margin past every recognizer's threshold; "
    "the changes can be seen when you look closely, and it takes longer than mid.",
}
"""What each mode gives and costs, in words, for the page's mode menu (the technical recipe is the
mode's ``description``)."""

T = TypeVar("T")

router = APIRouter()


# ---------------------------------------------------------------------------------------------------
# what the endpoints share, from app.state


def app_config(request: Request) -> ServeConfig:
    config: ServeConfig = request.app.state.config
    return config


def loaded_models(request: Request) -> Models:
    current: Models | None = request.app.state.models
    assert current is not None, "models are loaded at startup"
    return current


def work_queue(request: Request) -> WorkQueue:
    work: WorkQueue = request.app.state.work
    return work


Config = Annotated[ServeConfig, Depends(app_config)]
LoadedModels = Annotated[Models, Depends(loaded_models)]
Work = Annotated[WorkQueue, Depends(work_queue)]


async def received(
    request: Request, work: WorkQueue, config: ServeConfig, files: tuple[str, ...], allowed: tuple[str, ...]
) -> tuple[list[Upload], Fields]:
    """The form, read in an upload slot (never a computing or queue slot: a stalled upload holds none),
    within the size limit and the read timeout."""
    with work.uploading():
        form = await read_form(request, files=len(files), config=config)
    fields = Fields(form, allowed, files)
    uploads = [await take_upload(form, name, config) for name in files]
    return uploads, fields


async def run(request: Request, work: WorkQueue, job: Job, work_fn: Callable[[Job], T]) -> T:
    """Run ``work_fn`` on a worker thread and wait for its result; its error becomes the answer."""
    work.submit(job, work_fn)
    try:
        result: T = await work.outcome(job, request)
    except BaseException as exc:
        raise api_error(exc, work.retry_after) from None
    return result


# ---------------------------------------------------------------------------------------------------
# OpenAPI of the multipart forms


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


# ---------------------------------------------------------------------------------------------------
# the page and the API


@cache
def static_text(name: str) -> str:
    """A file of ``serve/static`` (the page, the API docs), read once."""
    return (resources.files("uncnn_rt.serve") / "static" / name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(static_text("index.html"), headers={"Cache-Control": "no-cache"})


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
async def api_docs() -> HTMLResponse:
    return HTMLResponse(static_text("docs.html"))


@router.get(
    "/healthz",
    summary="Liveness and load: jobs running and waiting, uploads arriving; jobs served (with a result) "
    "and failed (with an error)",
)
async def healthz(work: Work) -> dict[str, Any]:
    return {"status": "ok", "version": __version__, **work.stats()}


@router.get("/v1/models", summary="The shipped models, the cloak modes and this server's limits")
async def list_models(current: LoadedModels, config: Config) -> dict[str, Any]:
    in_use = {r.name for r in current.recognizers}
    return {
        "recognizers": current.offered,
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
            for e in catalog.load_manifest()
        ],
        "modes": {
            name: {
                "summary": MODE_SUMMARIES.get(name, m.describe()),
                "description": m.describe(),
                "cap": m.cap_label,
                "aim": m.aim,
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
            "read_timeout_s": config.read_timeout,
            "max_faces": config.max_faces,
        },
    }


@router.post(
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
async def cloak_endpoint(request: Request, work: Work, config: Config, current: LoadedModels) -> Response:
    (upload,), fields = await received(request, work, config, ("image",), tuple(CLOAK_OPTIONS))
    options = CloakOptions.parse(fields)
    current.check_names(options.models)
    job = work.admit()

    def work_fn(j: Job) -> CloakedUpload:
        return cloak_work(j, upload, options, current, config)

    accept = request.headers.get("accept", "")
    if NDJSON in accept:
        return await stream_cloak(request, work, job, work_fn)
    cloaked = await run(request, work, job, work_fn)
    if "application/json" in accept and "image/" not in accept:
        return JSONResponse(_cloak_json(cloaked), headers={"Cache-Control": "no-store"})
    return Response(
        cloaked.data,
        media_type=cloaked.media_type,
        headers={
            "Content-Disposition": content_disposition(cloaked.filename, cloaked.name),
            REPORT_HEADER: report_header(cloaked.report),
            VERDICT_HEADER: "PROTECTED" if cloaked.report["status"] == "protected" else "NOT PROTECTED",
            "Cache-Control": "no-store",
        },
    )


def content_disposition(ascii_name: str, name: str) -> str:
    """An attachment named ``ascii_name``, and ``name`` (any script) as RFC 5987's ``filename*``."""
    header = f'attachment; filename="{ascii_name}"'
    if name and name != ascii_name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header


def report_header(report: dict[str, Any]) -> str:
    """The report as compact JSON, or its summary when that would pass :data:`REPORT_HEADER_MAX`."""
    text = json.dumps(report, separators=(",", ":"))
    if len(text) <= REPORT_HEADER_MAX:
        return text
    faces = report.get("faces") or []
    summary = {
        "status": report.get("status"),
        "protected": report.get("protected"),
        "faces": len(faces),
        "faces_protected": sum(bool(f.get("protected")) for f in faces),
        "models": report.get("models"),
        "seed": report.get("seed"),
        "truncated": True,
        "full_report": "ask with Accept: application/json",
    }
    return json.dumps(summary, separators=(",", ":"))


async def stream_cloak(
    request: Request, work: WorkQueue, job: Job, work_fn: Callable[[Job], CloakedUpload]
) -> Response:
    """Progress lines then the result; the stream starts with the first attack step, so that errors
    found before it (not an image, no face) still get their own status."""
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


@router.post(
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
async def compare_endpoint(
    request: Request, work: Work, config: Config, current: LoadedModels
) -> dict[str, Any]:
    (a, b), fields = await received(request, work, config, ("a", "b"), ("no_align", "models"))
    names = current.check_names(split_models(fields.text("models")))
    no_align = fields.flag("no_align")
    job = work.admit()
    return await run(request, work, job, lambda j: compare_work(j, a, b, no_align, names, current, config))


@router.post(
    "/v1/classify",
    summary="Top ImageNet classes (the shipped EfficientNet-Lite0)",
    openapi_extra=_form_body(
        {"image": "the photo"}, {"top": ("integer", "how many classes (default 5, at most 50)")}
    ),
    responses=_error_docs(400, 408, 413, 415, 422, 503),
)
async def classify_endpoint(
    request: Request, work: Work, config: Config, current: LoadedModels
) -> dict[str, Any]:
    (upload,), fields = await received(request, work, config, ("image",), ("top",))
    top = fields.integer("top")
    top = 5 if top is None else top
    if not 1 <= top <= 50:
        raise ApiError(422, f"field 'top' must be in 1..50, got {top}")
    job = work.admit()
    return await run(request, work, job, lambda j: classify_work(j, upload, top, current, config))


def _cloak_json(cloaked: CloakedUpload) -> dict[str, Any]:
    return {
        "report": cloaked.report,
        "image": base64.b64encode(cloaked.data).decode("ascii"),
        "media_type": cloaked.media_type,
        "filename": cloaked.name,
    }


def _event_json(event: Event, retry_after: Callable[[], int]) -> dict[str, Any]:
    if isinstance(event, cloaking.CloakProgress):
        return {"event": "progress", **asdict(event)}
    if isinstance(event, Stage):
        return {"event": "stage", "stage": event.stage}
    if isinstance(event, Finished):
        return {"event": "result", **_cloak_json(event.value)}
    error = api_error(event.error, retry_after)
    return {"event": "error", "status": error.status, "detail": error.detail}
