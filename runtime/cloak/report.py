"""The reports of a cloak, a comparison and a classification, as the CLI's ``--json`` and the HTTP service
share them.

A cloak's per-file report (:class:`FileOutcome`) is the ``files`` entry of ``uncnn-rt cloak --json`` and
the ``X-Uncnn-Report`` header of ``POST /v1/cloak``; its keys are a contract with the people who parse
them, so they are written here once for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime.cloak.caps import ENCODER_SHARE, exceeds
from uncnn_rt.runtime.cloak.photo import CloakResult
from uncnn_rt.runtime.cloak.verify import Similarity, VerifyReport
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.imageio import LoadedImage
from uncnn_rt.runtime.visibility import photo_figures

CEILING_REACHED: Final = 0.75
"""A face short of its margin whose FLIP or CIEDE2000 is at least this share of its ceiling was stopped
by the ceiling (``stopped_by_ceiling``); below it, by its steps or the per-pixel bound. The loop holds
the ceiling by shrinking the change after a step that passed it, so a face the ceiling stops ends
between about 0.8 and 1 of it."""


CLASSIFIER: Final = "efficientnet_lite0"
"""The shipped ImageNet classifier of ``uncnn-rt classify`` and ``POST /v1/classify``."""


def split_models(models: str | None, option: str = "--models") -> list[str] | None:
    """The recognizer names of a ``--models`` (or ``models`` field; ``option`` names it in the error)
    value: comma-separated, or None for the default ensemble.

    Raises:
        InputError: the value names no model (only commas and spaces).
    """
    if models is None:
        return None
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise InputError(f"{option} needs comma-separated recognizer names, got {models!r}")
    return names


@dataclass
class FileOutcome:
    """One input's fate, for the table and the JSON report."""

    input: str
    output: Path | None = None
    error: str | None = None
    exit_code: int | None = None
    """The CLI's exit status for this input, which the CLI sets; None where none applies (HTTP)."""
    report: VerifyReport | None = None
    details: dict[str, Any] = field(default_factory=dict)
    hint: str | None = None
    """For a NOT PROTECTED verdict: which faces and models failed, and what would protect them."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "input": self.input,
            "output": None if self.output is None else str(self.output),
        }
        if self.error is not None:
            data |= {"status": "error", "error": self.error}
            return data
        assert self.report is not None
        data["status"] = "protected" if self.report.protected else "not_protected"
        data |= self.details
        data |= self.report.to_dict()
        if self.hint is not None:
            data["hint"] = self.hint
        return data


def cloak_details(result: CloakResult, loaded: LoadedImage, *, extra_seconds: float) -> dict[str, Any]:
    """What a cloak report says besides the verification: the recipe, the models, the time taken
    (the cloak plus ``extra_seconds`` of encoding), the steps each face took, decoding notes."""
    settings = result.settings
    return {
        "mode": settings.mode,
        "eps": settings.eps,
        "steps": settings.steps,
        "ssim_min": settings.ssim_min,
        "cap": settings.cap_label,
        "coarse": settings.coarse,
        "scatter": settings.scatter,
        "aim": settings.aim,
        "scales": list(settings.scales),
        "schedule": settings.schedule,
        "schedule_floor": settings.schedule_floor,
        "models": list(result.models),
        "helpers": list(result.helpers),
        "seed": result.seed,
        "output_quality": result.output_quality,
        "cloak_seconds": round(result.seconds + extra_seconds, 3),
        "steps_run": {f"face {f.number}": f.steps for f in result.faces},
        "notes": list(loaded.notes) + _quality_note(result),
    }


def _quality_note(result: CloakResult) -> list[str]:
    if result.output_quality is None:
        return []
    return [
        f"written at quality {result.output_quality}: at the photo's own, the encoder alone would take more "
        f"than {ENCODER_SHARE:.0%} of a face's visibility cap, leaving the cloak no room"
    ]


def visibility_details(
    result: CloakResult, loaded: LoadedImage, saved: NDArray[np.uint8], report: VerifyReport
) -> dict[str, Any]:
    """The visibility block of a cloak report: per face region, FLIP, CIEDE2000, SSIM and PSNR of the
    saved file, the face's cap and the figures of the photo's own JPEG re-encode it comes from; and the
    whole photo's figures."""
    faces = {}
    checks = {face.number: face for face in report.faces}
    for f in result.faces:
        entry: dict[str, Any] = {} if f.visibility is None else f.visibility.to_dict()
        check = checks.get(f.number)
        margins = [
            (m.after - m.aim) if report.targeted else (m.aim - m.after)
            for m in (check.models if check is not None else ())
            if m.aim is not None
        ]
        # How far past its aim the closest recognizer is on the saved file (negative: short).
        entry["margin"] = round(min(margins), 4) if margins else None
        entry["short_of_margin"] = f.short
        # Short because the ceiling was spent, rather than the steps or the per-pixel bound.
        entry["stopped_by_ceiling"] = bool(
            f.short
            and f.limits is not None
            and f.visibility is not None
            and max(f.visibility.flip / f.limits.flip, f.visibility.ciede2000_mean / f.limits.ciede2000)
            >= CEILING_REACHED
        )
        if f.visible_region is not None:
            r = f.visible_region
            entry["region"] = [r.left, r.top, r.right, r.bottom]
        if f.limits is not None:
            entry["cap"] = {
                "of": result.settings.cap_label,
                "flip": round(f.limits.flip, 5),
                "ciede2000_mean": round(f.limits.ciede2000, 4),
                "reference": {
                    k: v for k, v in f.limits.reference.to_dict().items() if k in ("flip", "ciede2000_mean")
                },
                "reference_quality": result.settings.cap_jpeg,
            }
            if f.visibility is not None:
                # What the face spent, as a multiple of the re-encode's own figures.
                ref = f.limits.reference
                entry["times_reference"] = {
                    "flip": round(f.visibility.flip / max(ref.flip, 1e-9), 3),
                    "ciede2000_mean": round(f.visibility.ciede2000_mean / max(ref.ciede2000_mean, 1e-9), 3),
                }
            entry["within_cap"] = f.visibility is not None and not exceeds(f.visibility, f.limits)
        faces[f"face {f.number}"] = entry
    photo = photo_figures(loaded.rgb, saved, ssim=report.ssim, psnr=report.psnr)
    return {"faces": faces, "photo": photo.to_dict()}


def similarity_row(s: Similarity) -> dict[str, Any]:
    """One model's entry in a comparison report (``compare --json``, ``POST /v1/compare``)."""
    return {"name": s.name, "similarity": round(s.similarity, 6), "threshold": s.threshold, "match": s.match}


def class_rows(ranked: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """The ``top`` list of a classification report (``classify --json``, ``POST /v1/classify``)."""
    return [{"label": label, "probability": round(p, 6)} for label, p in ranked]
