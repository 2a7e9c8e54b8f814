"""Multipart uploads held in memory, and the option fields of a form parsed with messages that name the
field (never the user's file name).

The request body is read into memory within the upload limit, and the multipart parser is told to keep
file parts in memory, so no upload touches a disk.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import unicodedata
from collections.abc import AsyncGenerator, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Final

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.cloak.report import split_models
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.serve.config import ServeConfig
from uncnn_rt.serve.errors import ApiError

FORM_SLACK: Final = 64 * 1024
"""Bytes allowed in a request body beyond its images: multipart headers and the option fields."""


@dataclass(frozen=True)
class Upload:
    form_field: str
    """The form field, used in messages instead of the user's file name."""
    filename: str
    """The client's file name, made safe for a download name in plain ASCII; never logged."""
    data: bytes = field(repr=False)
    name: str = ""
    """The client's file name as the user wrote it (any script), without a path or control characters:
    the report's and the JSON answer's name, and the ``filename*`` of the download; never logged."""


async def read_form(request: Request, *, files: int, config: ServeConfig) -> FormData:
    """The multipart form of ``request``, read into memory within the size limit and in time.

    The body is read before the request takes a computing or queue slot, so a slow or stalled upload
    holds none: it is answered 408 once nothing has arrived for ``config.read_timeout`` seconds, or once
    the whole body took longer than ``config.timeout``.
    """
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
        body = await asyncio.wait_for(_read_body(request, limit, config), config.timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"the upload did not arrive within this server's limit of {config.timeout:g} s"
        ) from None

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
    """The body, chunk by chunk: 413 past ``limit`` (with or without a Content-Length), 408 when the
    client sends nothing for ``config.read_timeout`` seconds."""
    body = bytearray()
    stream = request.stream()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), config.read_timeout)
            except StopAsyncIteration:
                return bytes(body)
            except asyncio.TimeoutError:
                raise ApiError(
                    408, f"the upload stalled: nothing arrived for {config.read_timeout:g} s"
                ) from None
            except ClientDisconnect:
                raise ApiError(400, "the client disconnected during the upload") from None
            body += chunk
            if len(body) > limit:
                raise _too_large(config)
    finally:
        with suppress(BaseException):
            await stream.aclose()


def _too_large(config: ServeConfig) -> ApiError:
    return ApiError(413, f"upload too large: the limit is {config.max_upload_mb:g} MB per image")


async def take_upload(form: FormData, name: str, config: ServeConfig) -> Upload:
    item = form.get(name)
    if not isinstance(item, UploadFile):
        raise ApiError(422, f"missing the file field {name!r} (multipart/form-data, with a file name)")
    data = await item.read()
    if len(data) > config.max_upload_bytes:
        raise _too_large(config)
    given = item.filename or ""
    return Upload(name, safe_filename(given), data, display_filename(given))


def _ascii(text: str) -> str:
    """``text`` folded to ASCII (accents dropped: ``Zoë`` -> ``Zoe``), other characters as ``_``."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", folded).strip("._-")


def _letters(text: str) -> str:
    """``text`` with letters and digits of any script, spaces, ``.``, ``_`` and ``-``; anything else
    (controls, quotes, bidi marks) as ``_``."""
    kept = "".join(c if c.isalnum() or c in " ._-" else "_" for c in unicodedata.normalize("NFC", text))
    return kept.strip(" ._-")


def _clean_name(name: str, clean: Callable[[str], str]) -> str:
    """The last component of a client's path, stem and extension each cleaned; ``photo`` for a stem
    that cleans to nothing."""
    stem, dot, suffix = re.split(r"[\\/]", name)[-1].rpartition(".")
    if not dot:
        stem, suffix = suffix, ""
    stem = clean(stem)[-80:] or "photo"
    suffix = clean(suffix)[:16]
    return f"{stem}.{suffix}" if suffix else stem


def safe_filename(name: str) -> str:
    """A client's file name reduced to a plain ``[A-Za-z0-9._-]`` name for ``Content-Disposition``:
    no path, accents folded (``Zoë.png`` -> ``Zoe.png``), ``photo`` for a name with no Latin letter."""
    return _clean_name(name, _ascii)


def display_filename(name: str) -> str:
    """A client's file name in its own script (``Zoë Ünal.png``, ``東京.png``), without a path, control
    characters, quotes or bidi marks: for ``filename*`` (RFC 5987) and the report."""
    return _clean_name(name, _letters)


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
    "aim": (
        "string",
        "self (the modes'): past each threshold, so that even the original photo stops matching; "
        "others: past the similarity below which the person's other photos stop matching (less visible, "
        "weaker)",
    ),
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
                aim=fields.text("aim"),
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
    """The request's seed, checked with the other fields (422), or a fresh one (reported back), so that
    cloaks cannot be predicted."""
    return secrets.randbelow(2**31) if given is None else cloaking.check_seed(given)
