"""Multipart uploads held in memory, and the option fields of a form parsed with messages that name the
field (never the user's file name).

The request body is read into memory within the upload limit, and the multipart parser is told to keep
file parts in memory, so no upload touches a disk.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Final

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.cloak.report import split_models
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.serve.config import ServeConfig
from uncnn_rt.serve.errors import ApiError
from uncnn_rt.serve.queue import Job

FORM_SLACK: Final = 64 * 1024
"""Bytes allowed in a request body beyond its images: multipart headers and the option fields."""


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


def _seed(given: int | None) -> int:
    """The request's seed, or a fresh one (reported back), so that cloaks cannot be predicted."""
    return secrets.randbelow(2**31) if given is None else given
