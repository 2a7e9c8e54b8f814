"""The FastAPI application of ``uncnn-rt serve``: :func:`create_app`, its lifespan (models loaded and a
work queue started once per process) and :func:`app_from_environment` for ``serve --workers N``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from uncnn_rt import __version__
from uncnn_rt.runtime.errors import UncnnError
from uncnn_rt.serve.config import CONFIG_ENV, Models, ServeConfig, load_models
from uncnn_rt.serve.errors import ApiError, api_error, error_response, log
from uncnn_rt.serve.queue import WorkQueue
from uncnn_rt.serve.routes import router

API_DESCRIPTION = """\
Cloak face photos against face recognizers, compare faces and classify images, with the shipped models
of uncnn-rt on onnxruntime. The page at `/` does the same in a browser.

**Privacy.** Uploads are processed in memory and never written to disk or logged; nothing is sent
anywhere else.

**Limits.** Each image file is limited in bytes (413, with or without a Content-Length) and in pixels,
read from its header before it is decoded (413, against decompression bombs); a cloak attacks at most
the server's `max_faces` faces (more: 422, unless `face` or `largest` picks one). A file that is not an
image gets 415, a photo without a face 422, bad options 422 (a `models` name the server does not offer
too: `GET /v1/models` lists them under `recognizers`), a malformed multipart body 400, an upload that
stalls 408; every error body is `{"detail": "<one line>"}`. When every worker and every queue slot is
taken the answer is 503 with `Retry-After`; a request that overruns the server's time limit is stopped
and also answered 503, and one whose client disconnects is stopped at its next attack step.

**`POST /v1/cloak` answers** (by the `Accept` header):

* default (`image/*`, `*/*`): the cloaked image, in the input's format unless `format` says otherwise,
  as an attachment named `NAME.cloaked.EXT` (ASCII `filename`, the name as sent in `filename*`); the
  verification report as compact JSON in the `X-Uncnn-Report` header (at most 4 KB: over that, its
  summary with `"truncated": true`; the JSON answer has it whole) and `PROTECTED` / `NOT PROTECTED` in
  `X-Uncnn-Verdict`;
* `application/json`: `{"report": {...}, "image": "<base64>", "media_type": "...", "filename": "..."}`;
* `application/x-ndjson`: one JSON object a line, streamed: `{"event": "progress", "face", "faces",
  "step", "steps"}` per attack step, `{"event": "stage", "stage": "verifying"}`, then
  `{"event": "result", ...}` with the fields of the JSON answer, or `{"event": "error", "status",
  "detail"}` if the job fails after the first progress line (errors before it get their own status).

The report has the fields of `uncnn-rt cloak --json`: per face and per model the similarity before and
after, the model's threshold, the cloak's aim and PROTECTED when after is below the aim (``aim``
``others``: the threshold over how close a person's photos come to one another on the dev set, the
similarity below which their other photos stop matching; ``self``: the threshold); SSIM and PSNR of the
whole photo.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the models unless given, start the work queue; on shutdown, stop its jobs and threads."""
    config: ServeConfig = app.state.config
    if app.state.models is None:
        app.state.models = await asyncio.to_thread(load_models, config)
    work = WorkQueue(config.max_concurrency, config.queue_size, config.timeout, config.upload_slots)
    app.state.work = work
    log.info(
        "uncnn-rt %s serving: %d worker thread(s), queue %d, %d upload(s) read at once, %g MB / %g MP / "
        "%d faces per image, timeout %g s (read timeout %g s)",
        __version__,
        config.max_concurrency,
        config.queue_size,
        config.upload_slots,
        config.max_upload_mb,
        config.max_megapixels,
        config.max_faces,
        config.timeout,
        config.read_timeout,
    )
    try:
        yield
    finally:
        await asyncio.to_thread(work.shutdown)


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(api_error(exc, request.app.state.work.retry_after))


def create_app(config: ServeConfig | None = None, *, models: Models | None = None) -> FastAPI:
    """The service: sessions are ``models`` or loaded at startup; the work queue lives with the app."""
    app = FastAPI(
        title="uncnn-rt",
        version=__version__,
        description=API_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.config = config or ServeConfig()
    app.state.models = models
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(UncnnError, on_domain_error)
    app.include_router(router)
    return app


def app_from_environment() -> FastAPI:
    """The app of one ``serve --workers N`` worker process, configured through :data:`CONFIG_ENV`."""
    text = os.environ.get(CONFIG_ENV)
    return create_app(ServeConfig.from_json(text) if text else ServeConfig())
