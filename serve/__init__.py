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

Modules: :mod:`~uncnn_rt.serve.app` (the application and its lifespan), :mod:`~uncnn_rt.serve.routes`
(the endpoints), :mod:`~uncnn_rt.serve.queue` (the bounded work queue), :mod:`~uncnn_rt.serve.forms`
(uploads and option fields), :mod:`~uncnn_rt.serve.work` (what a worker thread computes),
:mod:`~uncnn_rt.serve.config` (settings and shared sessions), :mod:`~uncnn_rt.serve.errors` (answers
other than 200). The report a cloak answers with is :mod:`uncnn_rt.runtime.cloak.report`'s, as for the CLI.
"""

from __future__ import annotations

from uncnn_rt.serve.app import API_DESCRIPTION, app_from_environment, create_app
from uncnn_rt.serve.config import CONFIG_ENV, Models, ServeConfig, load_models
from uncnn_rt.serve.errors import ApiError, JobStopped
from uncnn_rt.serve.forms import CloakOptions, Fields, Upload, safe_filename
from uncnn_rt.serve.queue import Job, WorkQueue
from uncnn_rt.serve.routes import NDJSON, REPORT_HEADER, VERDICT_HEADER, router
from uncnn_rt.serve.work import CloakedUpload

__all__ = [
    "API_DESCRIPTION",
    "CONFIG_ENV",
    "NDJSON",
    "REPORT_HEADER",
    "VERDICT_HEADER",
    "ApiError",
    "CloakOptions",
    "CloakedUpload",
    "Fields",
    "Job",
    "JobStopped",
    "Models",
    "ServeConfig",
    "Upload",
    "WorkQueue",
    "app_from_environment",
    "create_app",
    "load_models",
    "router",
    "safe_filename",
]
