"""Decoding and encoding photos for the cloak: safe limits, upright pixels, metadata kept minus location.

**Decode** (:func:`load_image`): refuses missing, empty, oversized and non-image files, checks the
header's pixel count before any pixel is decoded (decompression bombs), refuses truncated data
(``LOAD_TRUNCATED_IMAGES`` stays off), applies the EXIF orientation, and returns 8-bit RGB pixels
plus everything needed to write the result back "the same way".

Modes:

- ``RGB``: as is. ``L``/``1``: grey replicated to 3 channels, ``is_grayscale`` set, saved as ``L``
  again (so the attack should keep ``R = G = B``; only the luma of a colour perturbation survives).
- ``RGBA``/``LA``/``PA``/``P`` with transparency: the alpha channel is kept aside, the perturbation is
  on RGB only, and alpha is re-attached on PNG/WebP/TIFF output (dropped for JPEG/BMP: the image is
  composited over white).
- ``P`` (palette): expanded to RGB and saved as full colour (re-quantising would erase the cloak).
- ``CMYK``: converted to sRGB, through its ICC profile when it has one (the output embeds sRGB).
- **16-bit: handled, reduced to 8 bits.** Grayscale ``I;16`` samples map onto 0..255 by
  ``round(v / 257)`` (Pillow's own ``convert("L")`` would clip at 255); 16-bit RGB(A) PNGs are already
  reduced by Pillow's decoder. ``bit_depth`` records 16 and ``notes`` says so: the cloaked file is
  8-bit, since the attack and the recognizers work on 8-bit pixels. Floating-point (``F``) and
  32-bit integer images are refused.
- Animated or multi-page files are refused; an MPO (the JPEG of many phones, with a preview or depth
  frame) is read as its first frame and written as a plain JPEG.

**Encode** (:func:`save_image`): the input's format unless told (by ``format`` or by the output
path's suffix); GIF and other formats that cannot hold a cloak fall back to PNG. EXIF (orientation
reset to 1, no thumbnail, GPS IFD removed when ``strip_location``), the ICC profile and the DPI are
kept; XMP, IPTC, comments and PNG text chunks are not carried over (they may hold location or the
original's preview). Writes are atomic and never replace the input.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from uncnn_rt.runtime.arrays import Uint8Array
from uncnn_rt.runtime.errors import (
    DecodeError,
    EmptyFileError,
    ImageTooLargeError,
    InputError,
    NotAnImageError,
    OutputPathError,
    UnreadableFileError,
    UnsupportedImageError,
)
from uncnn_rt.runtime.fileio import atomic_write_bytes, check_writable_folder

IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
"""File suffixes taken as images when a folder is scanned (cloak, eval, augment, robustness, calibration);
a file named otherwise is skipped there, though :func:`load_image` reads any format Pillow knows."""

DEFAULT_MAX_PIXELS: Final = 100_000_000
"""Largest pixel count decoded (100 MP): a 12 MP phone photo is well inside, a 30000 x 30000 header is not.
Pillow's own hard limit (``2 * Image.MAX_IMAGE_PIXELS``, about 179 MP) still applies above it."""
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_JPEG_QUALITY: Final = 95
"""JPEG quality of a cloak whose source quality is unknown (a PNG saved as JPEG, say)."""
JPEG_QUALITY_RANGE: Final = (75, 95)
"""The source's estimated JPEG quality is kept within this range (:func:`jpeg_output_quality`)."""
DEFAULT_WEBP_QUALITY: Final = 95

EXIF_ORIENTATION: Final = 0x0112
EXIF_GPS_IFD: Final = 0x8825

WRITABLE_FORMATS: Final = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
_FORMAT_SUFFIX: Final = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
_SUFFIX_FORMAT: Final = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
_FORMAT_ALIASES: Final = {"JPG": "JPEG", "TIF": "TIFF", "MPO": "JPEG"}
_EXIF_FORMATS: Final = ("JPEG", "PNG", "WEBP")
_ALPHA_FORMATS: Final = ("PNG", "WEBP", "TIFF")
_GRAY_FORMATS: Final = ("JPEG", "PNG", "TIFF", "BMP")
_SIXTEEN_BIT_GRAY: Final = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PIXEL_DECODE_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded photo, upright, and what is needed to encode a result the same way."""

    rgb: Uint8Array
    """``[H, W, 3]`` uint8, EXIF orientation applied."""
    alpha: Uint8Array | None
    """``[H, W]`` uint8 transparency kept aside, or None."""
    name: str
    """The input as the user named it, for messages."""
    path: Path | None
    """The resolved input path (None when decoded from bytes); outputs may never resolve to it."""
    format: str
    """Pillow's name of the source format: ``JPEG`` (MPO included), ``PNG``, ``WEBP``, ``GIF``, ..."""
    mode: str
    """Pillow's mode of the source (``RGB``, ``L``, ``P``, ``RGBA``, ``CMYK``, ``I;16``, ...)."""
    orientation: int
    """The EXIF orientation found (1..8; 1 when absent); the pixels are already upright."""
    exif: bytes | None
    """The EXIF block with orientation reset to 1 and without the thumbnail, or None."""
    icc_profile: bytes | None
    """The ICC profile matching :attr:`rgb` (sRGB after a CMYK conversion), or None."""
    bit_depth: int
    """Bits per sample in the source, 8 or 16 (the pixels here are always 8-bit)."""
    is_grayscale: bool
    """Single-channel grey source (``L``, ``LA``, ``1``, ``I;16``): ``R = G = B``, and it is saved grey."""
    lossless: bool
    """The source was stored losslessly (PNG, lossless WebP, TIFF, BMP, GIF)."""
    progressive: bool
    """A progressive JPEG."""
    dpi: tuple[float, float] | None
    notes: tuple[str, ...]
    """Conversions made on the way in, in words, for the user."""
    jpeg_quality: int | None = None
    """The libjpeg quality (1..100) a JPEG source's quantisation tables match best, or None."""

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` after orientation, as Pillow orders it."""
        return self.width, self.height

    @property
    def was_rotated(self) -> bool:
        """Whether an EXIF orientation other than 1 was applied on load."""
        return self.orientation != 1


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str | None = None,
) -> LoadedImage:
    """Decode a photo from a path or from bytes.

    Raises (all :class:`~uncnn_rt.runtime.errors.InputError`, message ``"<name>: <what>"``):
        UnreadableFileError: no such file, not a regular file, or no permission.
        EmptyFileError: 0 bytes.
        ImageTooLargeError: over ``max_bytes``, or the header declares over ``max_pixels`` pixels.
        NotAnImageError: no format Pillow knows.
        DecodeError: truncated or corrupt data.
        UnsupportedImageError: animated/multi-page, floating-point or 32-bit samples.
    """
    data, label, path = _read(source, max_bytes=max_bytes, name=name)
    with warnings.catch_warnings():
        # The explicit max_pixels check below replaces Pillow's warning; its hard error still applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image, source_format = _open_header(data, label, max_pixels)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise _bomb_error(label, exc, max_pixels) from exc
        except _PIXEL_DECODE_ERRORS as exc:
            raise DecodeError(f"{label}: truncated or corrupt image data ({exc})") from exc

    notes: list[str] = []
    if image.format == "MPO":
        notes.append("multi-picture JPEG: only the main picture is kept")
    orientation = _orientation(image)
    upright = ImageOps.exif_transpose(image) if orientation != 1 else image
    exif = _exif_upright(image, orientation, notes)
    dpi = _dpi(image.info.get("dpi"))
    if orientation in (5, 6, 7, 8) and dpi is not None:
        dpi = (dpi[1], dpi[0])
    if orientation != 1:
        notes.append(f"EXIF orientation {orientation} applied; saved upright with orientation 1")

    rgb, alpha, is_gray, icc = _pixels(upright, image.info.get("icc_profile") or None, label, notes)
    bit_depth = 16 if image.mode in _SIXTEEN_BIT_GRAY or _png_bit_depth(data) == 16 else 8
    if bit_depth == 16 and image.mode not in _SIXTEEN_BIT_GRAY:
        notes.append("16-bit samples reduced to 8 bits; the cloaked file is 8-bit")
    return LoadedImage(
        rgb=rgb,
        alpha=alpha,
        name=label,
        path=path,
        format=source_format,
        mode=image.mode,
        orientation=orientation,
        exif=exif,
        icc_profile=icc,
        bit_depth=bit_depth,
        is_grayscale=is_gray,
        lossless=_is_lossless(source_format, data),
        progressive=bool(image.info.get("progressive") or image.info.get("progression")),
        dpi=dpi,
        notes=tuple(notes),
        jpeg_quality=estimate_jpeg_quality(image) if source_format == "JPEG" else None,
    )


def probe_image(
    source: str | os.PathLike[str] | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str | None = None,
) -> tuple[str, tuple[int, int]]:
    """``(format, (width, height))`` from the header alone, with every check :func:`load_image` makes
    before decoding (file, bytes, known format, pixel limit, single frame); no pixel is decoded.

    A command calls it on every input before loading any model, so that a bad input fails at once.
    Truncated pixel data is found only by :func:`load_image`.
    """
    data, label, _ = _read(source, max_bytes=max_bytes, name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image, source_format = _open_header(data, label, max_pixels)
    return source_format, image.size


def _open_header(data: bytes, label: str, max_pixels: int) -> tuple[Image.Image, str]:
    """The opened image (header parsed, no pixel decoded) and its source format, checked for size."""
    image = _open(data, label, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label}: {width}x{height} is {width * height / 1e6:.1f} megapixels, "
            + _over_the_pixel_limit(max_pixels)
        )
    if width < 1 or height < 1:
        raise DecodeError(f"{label}: image header declares an empty {width}x{height} image")
    return image, _source_format(image, label)


def _over_the_pixel_limit(max_pixels: int) -> str:
    return (
        f"over the limit of {max_pixels / 1e6:.1f} megapixels "
        "(checked before decoding, against decompression bombs)"
    )


_BOMB_PIXELS: Final = re.compile(r"\((\d+) pixels\)")


def _bomb_error(label: str, exc: Image.DecompressionBombError, max_pixels: int) -> ImageTooLargeError:
    """Pillow's own hard limit (about 179 MP) fires in ``Image.open``, before our check could: say it in
    our words, with the pixel count its message gives (Pillow does not tell the width and height)."""
    found = _BOMB_PIXELS.search(str(exc))
    declared = "far more megapixels" if found is None else f"{int(found.group(1)) / 1e6:.1f} megapixels"
    return ImageTooLargeError(
        f"{label}: the header declares {declared}, " + _over_the_pixel_limit(max_pixels)
    )


def _read(
    source: str | os.PathLike[str] | bytes, *, max_bytes: int, name: str | None
) -> tuple[bytes, str, Path | None]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label, path = bytes(source), name or "<bytes>", None
    else:
        given = Path(source)
        label = name or str(source)
        try:
            info = given.stat()
            if stat.S_ISDIR(info.st_mode):
                raise UnreadableFileError(f"{label}: is a directory, expected an image file")
            if not stat.S_ISREG(info.st_mode):
                raise UnreadableFileError(f"{label}: not a regular file, expected an image file")
            if info.st_size > max_bytes:
                raise ImageTooLargeError(
                    f"{label}: file is {info.st_size} bytes, over the limit of {max_bytes} bytes"
                )
            with given.open("rb") as fh:
                data = fh.read(max_bytes + 1)
            path = given.resolve()
        except FileNotFoundError as exc:
            raise UnreadableFileError(f"{label}: no such file") from exc
        except PermissionError as exc:
            raise UnreadableFileError(f"{label}: permission denied") from exc
        except OSError as exc:
            raise UnreadableFileError(f"{label}: cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise EmptyFileError(f"{label}: empty file (0 bytes), expected an image")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{label}: over the limit of {max_bytes} bytes")
    return data, label, path


def _open(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Parse the header only; no pixel is decoded yet."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _bomb_error(label, exc, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(f"{label}: not an image (no known image format recognised)") from exc
    except _PIXEL_DECODE_ERRORS as exc:
        raise DecodeError(f"{label}: corrupt image header ({exc})") from exc


def _source_format(image: Image.Image, label: str) -> str:
    fmt = image.format or "UNKNOWN"
    if fmt == "MPO":
        return "JPEG"
    try:
        frames = int(getattr(image, "n_frames", 1))
    except _PIXEL_DECODE_ERRORS as exc:
        raise DecodeError(f"{label}: truncated or corrupt image data ({exc})") from exc
    if frames > 1:
        raise UnsupportedImageError(
            f"{label}: animated or multi-page {fmt} ({frames} frames); only single images are supported"
        )
    return fmt


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent, invalid or unreadable."""
    try:
        raw = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # an unreadable EXIF block is dropped by _exif_upright, never fatal
        return 1
    return int(raw) if isinstance(raw, int) and 1 <= raw <= 8 else 1


def _exif_upright(image: Image.Image, orientation: int, notes: list[str]) -> bytes | None:
    """The EXIF block (JPEG, PNG, WebP) re-serialised with orientation 1 and no thumbnail (IFD1), or None.

    Call after the pixels were transposed: this rewrites the image's orientation tag.
    """
    if "exif" not in image.info:  # e.g. a TIFF, whose "EXIF" would be its own structural tags
        return None
    try:
        exif = image.getexif()
        if orientation != 1 or EXIF_ORIENTATION in exif:
            exif[EXIF_ORIENTATION] = 1
        return bytes(exif.tobytes()) if len(exif) else None
    except Exception as exc:  # Pillow raises many kinds on malformed EXIF; metadata is not essential
        notes.append(f"unreadable EXIF metadata dropped ({type(exc).__name__})")
        return None


def _dpi(value: Any) -> tuple[float, float] | None:
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (x, y) if x > 0 and y > 0 else None


def _pixels(
    image: Image.Image, icc: bytes | None, label: str, notes: list[str]
) -> tuple[Uint8Array, Uint8Array | None, bool, bytes | None]:
    """``(rgb [H,W,3], alpha [H,W] | None, is_grayscale, icc_profile)`` from any supported mode."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_GRAY:
        samples = np.asarray(image)
        if samples.size and (samples.min() < 0 or samples.max() > 65535):
            raise UnsupportedImageError(f"{label}: 32-bit integer samples ({mode}) are not supported")
        gray = np.rint(samples.astype(np.float32) / np.float32(257.0)).astype(np.uint8)
        notes.append("16-bit grayscale reduced to 8 bits; the cloaked file is 8-bit")
        return _gray3(gray), None, True, icc
    if mode == "F":
        raise UnsupportedImageError(f"{label}: floating-point samples (mode F) are not supported")
    if mode in ("L", "1"):
        if mode == "1":
            notes.append("bilevel image read as 8-bit grayscale")
        return _gray3(np.asarray(image.convert("L"))), None, True, icc
    if mode in ("LA", "La"):
        la = np.asarray(image.convert("LA"))
        return _gray3(la[:, :, 0]), np.ascontiguousarray(la[:, :, 1]), True, icc
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        notes.append("palette image expanded to full colour (saved as RGB, not re-quantised)")
        return (*_split_alpha(image.convert("RGBA" if has_alpha else "RGB")), False, icc)
    if mode == "CMYK":
        return _cmyk(image, icc, notes)
    if mode in ("RGBA", "RGBa"):
        return (*_split_alpha(image.convert("RGBA")), False, icc)
    if mode != "RGB":
        notes.append(f"{mode} image converted to RGB")
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy(), None, False, icc


def _gray3(gray: NDArray[np.uint8]) -> Uint8Array:
    return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)


def _split_alpha(image: Image.Image) -> tuple[Uint8Array, Uint8Array | None]:
    array = np.asarray(image, dtype=np.uint8)
    if array.shape[2] == 4:
        return np.ascontiguousarray(array[:, :, :3]), np.ascontiguousarray(array[:, :, 3])
    return array.copy(), None


def _cmyk(
    image: Image.Image, icc: bytes | None, notes: list[str]
) -> tuple[Uint8Array, Uint8Array | None, bool, bytes | None]:
    if icc is not None and _icc_colour_space(icc) == "CMYK":
        managed = _cmyk_through_profile(image, icc)
        if managed is not None:
            notes.append("CMYK converted to sRGB through its ICC profile")
            return managed
    notes.append("CMYK converted to RGB without a colour profile (approximate colours)")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy(), None, False, None


def _cmyk_through_profile(
    image: Image.Image, icc: bytes
) -> tuple[Uint8Array, Uint8Array | None, bool, bytes | None] | None:
    """sRGB pixels and the sRGB profile, or None when Pillow lacks LittleCMS or the profile is bad."""
    try:
        from PIL import ImageCms
    except ImportError:
        return None
    srgb = ImageCms.createProfile("sRGB")
    try:
        converted = ImageCms.profileToProfile(
            image, ImageCms.ImageCmsProfile(io.BytesIO(icc)), srgb, outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None
    if converted is None:
        return None
    profile = bytes(ImageCms.ImageCmsProfile(srgb).tobytes())
    return np.asarray(converted, dtype=np.uint8).copy(), None, False, profile


def _icc_colour_space(icc: bytes) -> str:
    """The ICC header's data colour space signature (bytes 16..19): ``RGB``, ``GRAY``, ``CMYK``, ..."""
    return icc[16:20].decode("latin-1").strip() if len(icc) >= 20 else ""


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


# The example tables of the JPEG standard (Annex K), in natural order; libjpeg scales them by quality.
_LUMA_TABLE: Final = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
_CHROMA_TABLE: Final = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    *([99] * 32),
)  # fmt: skip


def _libjpeg_tables(quality: int) -> NDArray[np.int64]:
    """libjpeg's ``jpeg_set_quality``: the standard tables scaled, as ``[2, 64]``."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = np.array([_LUMA_TABLE, _CHROMA_TABLE], dtype=np.int64)
    return np.clip((base * scale + 50) // 100, 1, 255)


_LIBJPEG_TABLES: Final = np.stack([_libjpeg_tables(q) for q in range(1, 101)])  # [100, 2, 64]


def estimate_jpeg_quality(image: Image.Image) -> int | None:
    """The libjpeg quality whose scaled standard tables are nearest a JPEG's own quantisation tables.

    Exact for files written by libjpeg, Pillow, OpenCV and most phones' encoders at a quality setting;
    for other tables (some cameras and editors), the quality of the nearest standard table, or None when
    the file carries no tables.
    """
    tables = getattr(image, "quantization", None) or {}
    if 0 not in tables or len(tables[0]) != 64:
        return None
    ours = [np.asarray(tables[0], dtype=np.int64)]
    if 1 in tables and len(tables[1]) == 64:
        ours.append(np.asarray(tables[1], dtype=np.int64))
    found = np.stack(ours)
    errors = np.abs(_LIBJPEG_TABLES[:, : len(ours)] - found[None]).sum(axis=(1, 2))
    return int(np.argmin(errors)) + 1


def _webp_is_lossless(data: bytes) -> bool:
    """Whether the first image chunk of a RIFF/WebP file is ``VP8L`` (lossless) rather than ``VP8 ``."""
    pos = 12
    while pos + 8 <= len(data):
        fourcc = data[pos : pos + 4]
        if fourcc == b"VP8L":
            return True
        if fourcc == b"VP8 ":
            return False
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
    return False


def _is_lossless(fmt: str, data: bytes) -> bool:
    if fmt == "WEBP":
        return _webp_is_lossless(data)
    return fmt not in ("JPEG", "JPEG2000")


def normalise_format(fmt: str) -> str:
    """Upper-case Pillow format name (``jpg`` -> ``JPEG``); :class:`OutputPathError` if not writable."""
    name = _FORMAT_ALIASES.get(fmt.upper(), fmt.upper())
    if name not in WRITABLE_FORMATS:
        raise OutputPathError(f"cannot write format {fmt!r}; expected one of {', '.join(WRITABLE_FORMATS)}")
    return name


def output_format(
    like: LoadedImage, path: str | os.PathLike[str] | None = None, fmt: str | None = None
) -> str:
    """The format an output gets: ``fmt`` if given, else the output suffix's (:func:`path_format`), else
    (no ``path``) the input's.

    Input formats that cannot hold a cloak (GIF's 256 colours, ...) or that are not writable fall
    back to PNG. A suffix that names another format than ``fmt``, or none that can be written when
    ``fmt`` is None, is an error.
    """
    chosen = path_format(path, fmt) if path is not None else (None if fmt is None else normalise_format(fmt))
    if chosen is not None:
        return chosen
    source = _FORMAT_ALIASES.get(like.format, like.format)
    return source if source in WRITABLE_FORMATS else "PNG"


def path_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format an output path gets, from ``fmt`` or else from its suffix (no input needed).

    Raises :class:`OutputPathError` for a suffix that names another format than ``fmt``, and for a
    suffix that names no writable format (``.xyz``, ``.gif``, none at all) when ``fmt`` is None: such a
    file would hold an image its name does not announce.
    """
    suffix = Path(path).suffix
    by_suffix = _SUFFIX_FORMAT.get(suffix.lower())
    if fmt is not None:
        chosen = normalise_format(fmt)
        if by_suffix is not None and by_suffix != chosen:
            raise OutputPathError(f"{path}: the suffix says {by_suffix} but format {chosen} was asked")
        return chosen
    if by_suffix is None:
        what = f"the suffix {suffix!r} names no image format it can write" if suffix else "it has no suffix"
        raise OutputPathError(
            f"{path}: {what}; end the name in {', '.join(_FORMAT_SUFFIX.values())} or give the format"
        )
    return by_suffix


def check_output_path(
    path: str | os.PathLike[str],
    *,
    input_path: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
) -> str:
    """Everything :func:`save_image` would refuse about ``path``, checked before any work is done.

    Returns the format ``path`` will be written in (:func:`path_format`). Raises
    :class:`OutputPathError` when the path is a directory, is (or links to) ``input_path``, names no
    writable format, or lies in a folder that is missing or cannot be written.
    """
    out = Path(path)
    if out.is_dir():
        raise OutputPathError(f"{out}: is a directory, expected an output file path")
    chosen = path_format(out, fmt)
    if input_path is not None and _same_file(out, Path(input_path)):
        raise OutputPathError(
            f"{out}: refusing to overwrite the input {input_path}; choose another output path"
        )
    check_writable_folder(out.parent)
    return chosen


def _same_file(out: Path, source: Path) -> bool:
    if out.resolve() == source.resolve():
        return True
    try:
        return out.exists() and os.path.samefile(out, source)
    except OSError:
        return False


def default_output_path(input_path: str | os.PathLike[str], fmt: str | None = None) -> Path:
    """``photo.jpg`` -> ``photo.cloaked.jpg``; the suffix changes only when the format does.

    An input suffix that is not a writable format (``.gif``) becomes ``.png``, as :func:`output_format`
    would choose.
    """
    source = Path(input_path)
    current = _SUFFIX_FORMAT.get(source.suffix.lower())
    wanted = normalise_format(fmt) if fmt is not None else (current or "PNG")
    suffix = source.suffix if current == wanted else _FORMAT_SUFFIX[wanted]
    return source.with_name(f"{source.stem}.cloaked{suffix}")


def encode_image(
    array: NDArray[np.generic],
    like: LoadedImage,
    *,
    fmt: str,
    quality: int | None = None,
    strip_location: bool = True,
) -> bytes:
    """Encode ``array [H, W, 3]`` (uint8, or float 0..255, rounded) like ``like``, as ``fmt``.

    - JPEG: by default the JPEG source's own quality, kept within 75..95 (:func:`jpeg_output_quality`;
      95 for other sources), with 4:4:4 chroma. The cloak is a low-amplitude, high-frequency
      pattern; 4:2:0 subsampling averages chroma over 2x2 blocks and low qualities quantise
      exactly the DCT coefficients it lives in, so both would erase much of it.
    - PNG, TIFF, BMP: lossless.
    - WebP: lossless when the source was lossless (PNG, lossless WebP) and no ``quality`` is given;
      otherwise lossy at ``quality`` (default 95), which libwebp always stores as 4:2:0.
    - Grayscale sources are saved as ``L`` (luma of the array; exact when ``R = G = B``) except in
      WebP, which has no grey mode. Alpha is re-attached for PNG, WebP and TIFF; for JPEG and BMP the
      image is composited over white.
    """
    name = normalise_format(fmt)
    pixels = _as_uint8(array, like)
    image = Image.fromarray(pixels, mode="RGB")
    grey = like.is_grayscale and name in _GRAY_FORMATS
    if grey:
        image = image.convert("L")
    if like.alpha is not None:
        alpha = Image.fromarray(like.alpha, mode="L")
        if name in _ALPHA_FORMATS:
            image.putalpha(alpha)
        else:
            background = Image.new(image.mode, image.size, "white")
            background.paste(image, mask=alpha)
            image = background

    params: dict[str, Any] = {}
    icc = _compatible_icc(like.icc_profile, image.mode)
    if icc is not None and name != "BMP":
        params["icc_profile"] = icc
    if like.exif is not None and name in _EXIF_FORMATS:
        params["exif"] = _output_exif(like.exif, strip_location=strip_location)
    if like.dpi is not None and name in ("JPEG", "PNG", "TIFF", "BMP"):
        params["dpi"] = like.dpi
    if name == "JPEG":
        params |= {
            "quality": _quality(quality, jpeg_output_quality(like), 1, 100),
            "subsampling": 0,
            "progressive": like.progressive,
            "optimize": True,
        }
    elif name == "WEBP":
        if quality is None and like.lossless:
            params |= {"lossless": True, "exact": True}  # exact: keep RGB under transparent pixels too
        else:
            params["quality"] = _quality(quality, DEFAULT_WEBP_QUALITY, 0, 100)
    buffer = io.BytesIO()
    image.save(buffer, format=name, **params)
    return buffer.getvalue()


def jpeg_output_quality(like: LoadedImage) -> int:
    """The JPEG quality a cloak of ``like`` is saved at: the source's own (as estimated from its tables)
    within :data:`JPEG_QUALITY_RANGE`, else :data:`DEFAULT_JPEG_QUALITY`.

    Saving a q80 photo at q95 makes the cloak half as large again as its input without keeping anything the
    input had. Below 75 the encoder would quantise away much of the cloak (its attack is made robust to
    JPEG 70..95), above 95 the file grows fast for nothing visible.
    """
    if like.jpeg_quality is None:
        return DEFAULT_JPEG_QUALITY
    low, high = JPEG_QUALITY_RANGE
    return min(max(like.jpeg_quality, low), high)


@dataclass(frozen=True)
class LossyOutput:
    """What :func:`encode_image` loses when it writes ``format`` at ``quality``, as a function of pixels
    ``[h, w, 3]``: any piece of the photo whose top-left corner lies on the 16-pixel JPEG grid gets the
    saved file's blocks. Metadata, alpha and grey conversion are left out: they do not change the RGB a
    viewer sees of an opaque colour photo."""

    format: str
    quality: int

    def __call__(self, pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
        # The quality and chroma of encode_image; progressive and optimised coding change no pixel.
        params: dict[str, Any] = {"quality": self.quality}
        if self.format == "JPEG":
            params["subsampling"] = 0
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels), mode="RGB").save(buffer, format=self.format, **params)
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            return np.asarray(decoded.convert("RGB"), dtype=np.uint8)

    def at(self, quality: int) -> LossyOutput:
        """The same output at another quality."""
        return replace(self, quality=_quality(quality, self.quality, 1 if self.format == "JPEG" else 0, 100))


def lossy_round_trip(like: LoadedImage, *, fmt: str, quality: int | None = None) -> LossyOutput | None:
    """The loss of writing ``like``'s cloak as ``fmt`` (at ``quality``, else :func:`encode_image`'s
    default for ``like``), or None for a lossless output."""
    name = normalise_format(fmt)
    if name == "JPEG":
        return LossyOutput(name, _quality(quality, jpeg_output_quality(like), 1, 100))
    if name == "WEBP" and not (quality is None and like.lossless):
        return LossyOutput(name, _quality(quality, DEFAULT_WEBP_QUALITY, 0, 100))
    return None


def save_image(
    array: NDArray[np.generic],
    like: LoadedImage,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    quality: int | None = None,
    strip_location: bool = True,
) -> Path:
    """Encode with :func:`encode_image` and write atomically to ``path``; returns the path written.

    The format is :func:`output_format`'s choice. Raises :class:`OutputPathError` when ``path`` is
    (or links to) the input file, is a directory, or cannot be written; nothing is written then.
    """
    out = Path(path)
    name = output_format(like, out, format)
    _refuse_input(out, like)
    data = encode_image(array, like, fmt=name, quality=quality, strip_location=strip_location)
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot write ({exc.strerror or exc})") from exc
    return out


def _refuse_input(out: Path, like: LoadedImage) -> None:
    if out.is_dir():
        raise OutputPathError(f"{out}: is a directory, expected an output file path")
    if like.path is None:
        return
    same = out.resolve() == like.path
    if not same and out.exists():
        try:
            same = os.path.samefile(out, like.path)
        except OSError:
            same = False
    if same:
        raise OutputPathError(
            f"{out}: refusing to overwrite the input {like.name}; choose another output path"
        )


def _as_uint8(array: NDArray[np.generic], like: LoadedImage) -> Uint8Array:
    a = np.asarray(array)
    if a.shape != like.rgb.shape:
        raise InputError(
            f"expected pixels of shape {list(like.rgb.shape)} (the input's), got {list(a.shape)}"
        )
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.number):
        raise InputError(f"expected numeric pixels, got dtype {a.dtype}")
    # float32 rounding keeps the temporaries at 4 bytes a sample (a 12 MP photo: 144 MB, not 288).
    rounded = np.rint(a.astype(np.float32, copy=False))
    if not np.isfinite(rounded).all():
        raise InputError("pixels contain NaN or infinity")
    np.clip(rounded, 0, 255, out=rounded)
    return rounded.astype(np.uint8)


def _quality(value: int | None, default: int, low: int, high: int) -> int:
    q = default if value is None else int(value)
    if not low <= q <= high:
        raise InputError(f"quality must be in {low}..{high}, got {value}")
    return q


def _compatible_icc(icc: bytes | None, mode: str) -> bytes | None:
    """Keep the profile only when its colour space is the output's (RGB for RGB(A), GRAY for L(A))."""
    if icc is None:
        return None
    space = _icc_colour_space(icc)
    wanted = "GRAY" if mode in ("L", "LA") else "RGB"
    return icc if space == wanted else None


def _output_exif(exif_bytes: bytes, *, strip_location: bool) -> bytes:
    """EXIF for the output: as loaded, minus the GPS IFD (tag 0x8825) when ``strip_location``."""
    exif = Image.Exif()
    exif.load(exif_bytes)
    if not strip_location:
        return exif_bytes
    if EXIF_GPS_IFD in exif:
        del exif[EXIF_GPS_IFD]
    out = bytes(exif.tobytes())
    check = Image.Exif()
    check.load(out)
    if EXIF_GPS_IFD in check:
        raise OutputPathError("internal error: GPS data survived location stripping; nothing was written")
    return out
