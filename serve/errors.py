"""Answers other than 200: every error body is ``{"detail": "<one line>"}`` with its status."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi.responses import JSONResponse

from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.errors import (
    ImageTooLargeError,
    InputError,
    ModelError,
    NotAnImageError,
    UnsupportedImageError,
)

# uvicorn's own logger, so that startup lines and errors appear with uvicorn's (never an upload's content).
log = logging.getLogger("uvicorn.error")


class ApiError(Exception):
    """An answer other than 200: a status, a one-line message and optional headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class JobStopped(Exception):
    """A job gave up between two steps: its deadline passed, its client left or the server is stopping."""


def api_error(exc: BaseException, retry_after: Callable[[], int]) -> ApiError:
    """The HTTP answer for an error raised while serving a request (its message is one line)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, JobStopped):
        return ApiError(503, str(exc), {"Retry-After": str(retry_after())})
    if isinstance(exc, cloaking.NoFaceError):
        return ApiError(422, str(exc).replace("--no-align", "no_align=true"))
    if isinstance(exc, cloaking.TooManyFacesError):
        return ApiError(
            422,
            f"{exc.found} faces found in {exc.name}; this server cloaks at most {exc.limit} in one request: "
            "send face=N to cloak face N (1 = leftmost) or largest=true, or crop the photo",
        )
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
