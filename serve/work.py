"""The work each endpoint hands to a worker thread: decode, compute and encode in memory, checking the
job between steps so that a request over its deadline, or whose client left, stops early."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.cloak.report import (
    CLASSIFIER,
    FileOutcome,
    class_rows,
    cloak_details,
    similarity_row,
    visibility_details,
)
from uncnn_rt.runtime.cloak.verify import classify_image, compare_faces, same_person, verify
from uncnn_rt.runtime.errors import ModelError
from uncnn_rt.runtime.imageio import (
    default_output_path,
    encode_image,
    load_image,
    lossy_round_trip,
    output_format,
)
from uncnn_rt.serve.config import Models, ServeConfig
from uncnn_rt.serve.forms import CloakOptions, Upload
from uncnn_rt.serve.queue import Job, Stage

MEDIA_TYPES: Final = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
}


@dataclass(frozen=True)
class CloakedUpload:
    """The answer of a cloak: the encoded file, its media type and download name, and its report."""

    data: bytes = field(repr=False)
    media_type: str
    filename: str
    """The download's name in plain ASCII (``Content-Disposition``'s ``filename``)."""
    report: dict[str, Any]
    name: str = ""
    """The download's name in the script the client used (``filename*``, the JSON answer's)."""


def cloak_work(
    job: Job, upload: Upload, options: CloakOptions, models: Models, config: ServeConfig
) -> CloakedUpload:
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
        faces_per_batch=config.faces_per_batch,
        max_faces=config.max_faces,
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
    name = default_output_path(upload.name or upload.filename, fmt).name
    details = cloak_details(result, loaded, extra_seconds=encoding)
    details["visibility"] = visibility_details(result, loaded, load_image(data, name=loaded.name).rgb, report)
    summary = FileOutcome(upload.name or upload.filename, report=report, details=details).to_dict()
    summary["output"] = name  # verify saw an in-memory file; the client gets this name
    return CloakedUpload(data, MEDIA_TYPES[fmt], filename, summary, name)


def compare_work(
    job: Job,
    first: Upload,
    second: Upload,
    no_align: bool,
    names: list[str] | None,
    models: Models,
    config: ServeConfig,
) -> dict[str, Any]:
    recognizers = models.recognizers_for(names)
    a = load_image(first.data, name=first.form_field, max_pixels=config.max_pixels)
    b = load_image(second.data, name=second.form_field, max_pixels=config.max_pixels)
    job.check()
    detector = None if no_align else models.detector
    sims = compare_faces(a, b, recognizers=recognizers, detector=detector, no_align=no_align)
    return {
        "same_person": same_person(sims),
        "matches": sum(s.match for s in sims),
        "models": [similarity_row(s) for s in sims],
    }


def classify_work(job: Job, upload: Upload, top: int, models: Models, config: ServeConfig) -> dict[str, Any]:
    if models.classifier is None:
        raise ModelError(f"the ImageNet classifier {CLASSIFIER} is not shipped in this installation")
    loaded = load_image(upload.data, name=upload.form_field, max_pixels=config.max_pixels)
    job.check()
    ranked = classify_image(loaded.rgb, models.classifier, top=top)
    return {
        "model": CLASSIFIER,
        "top": class_rows(ranked),
    }
