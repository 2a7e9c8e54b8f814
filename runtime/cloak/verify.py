"""Measure what a cloak did, the way a recognizer would see the saved file; compare faces; classify.

:func:`verify` re-opens the written file, finds the faces again (the detector runs on the cloaked pixels,
so its landmarks and hence the alignment are its own), embeds them with every recognizer and reports,
per face and per model:

- ``before``: the similarity of the *clean* photo's face, aligned as in the cloaked one, to the reference;
- ``after``: the same for the cloaked file's face;
- PROTECTED when ``after`` is below the cloak's aim (untargeted: :func:`~.photo.aim_for`, the model's
  threshold with ``aim="self"``, the similarity below which the person's other photos stop matching
  with ``"others"``), or, for a targeted cloak, at or above the threshold (matched to the target).

The reference is the face's clean embedding (untargeted) or the target's (targeted), as in the attack.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.cloak import CloakResult, Detector, NoFaceError, aim_for
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.geometry.faces import (
    FaceSite,
    box_iou,
    crop_size_for,
    embed,
    find_faces,
    rematch,
    select_faces,
    sites_from_detections,
)
from uncnn_rt.runtime.imageio import LoadedImage, load_image
from uncnn_rt.runtime.sessions import AttackSession
from uncnn_rt.runtime.visibility import image_quality

__all__ = [
    "FaceCheck",
    "ModelCheck",
    "Similarity",
    "VerifyReport",
    "box_iou",
    "classifier_input",
    "classify_image",
    "compare_faces",
    "verify",
]


@dataclass(frozen=True)
class ModelCheck:
    """One recognizer's verdict on one face of the saved file."""

    name: str
    threshold: float | None
    before: float
    after: float
    protected: bool
    aim: float | None = None
    """The similarity ``after`` is judged at (:func:`~.photo.aim_for`); the threshold where None."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "aim": None if self.aim is None else round(self.aim, 6),
            "before": round(self.before, 6),
            "after": round(self.after, 6),
            "protected": self.protected,
        }


@dataclass(frozen=True)
class FaceCheck:
    """One cloaked face as found again in the saved file."""

    number: int
    box: tuple[float, float, float, float] | None
    redetected: bool
    """Whether the detector found the face again (else the original alignment is used)."""
    iou: float | None
    models: tuple[ModelCheck, ...]
    embeddings: dict[str, Float32Array] = field(default_factory=dict, repr=False, compare=False)
    """Per recognizer, the unit embedding of the face in the saved file (for :func:`set_linkability`)."""
    area: float = 0.0
    """The face's box area in the photo (the set report takes each photo's largest face)."""

    @property
    def protected(self) -> bool:
        return all(m.protected for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "face": self.number,
            "box": None if self.box is None else [round(v, 2) for v in self.box],
            "redetected": self.redetected,
            "iou": None if self.iou is None else round(self.iou, 4),
            "protected": self.protected,
            "models": [m.to_dict() for m in self.models],
        }


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on a written file: per face and model, plus whole-image quality and time taken."""

    path: Path | None
    targeted: bool
    faces: tuple[FaceCheck, ...]
    ssim: float
    psnr: float
    seconds: float

    @property
    def protected(self) -> bool:
        return all(f.protected for f in self.faces)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": None if self.path is None else str(self.path),
            "targeted": self.targeted,
            "protected": self.protected,
            "ssim": round(self.ssim, 6),
            "psnr": None if math.isinf(self.psnr) else round(self.psnr, 3),
            "verify_seconds": round(self.seconds, 3),
            "faces": [f.to_dict() for f in self.faces],
        }


def verify(
    original: LoadedImage,
    written: str | Path | bytes,
    result: CloakResult,
    *,
    recognizers: Sequence[AttackSession],
    detector: Detector | None = None,
) -> VerifyReport:
    """Re-open ``written``, re-detect and re-embed its faces, and judge each cloaked face per model.

    Args:
        original: the photo as decoded before cloaking.
        written: the saved cloaked file, or its encoded bytes (a server verifies what it will send
            without writing it anywhere).
        result: what :func:`~.cloak.cloak_image` returned for ``original``.
        recognizers: the models to judge with (those of the cloak, or others).
        detector: needed unless the cloak used ``no_align``.
    """
    start = time.perf_counter()
    cloaked = load_image(written, name=None if isinstance(written, (str, Path)) else "cloaked image")
    if cloaked.rgb.shape != original.rgb.shape:
        raise InputError(
            f"{cloaked.name}: the saved image is {cloaked.width}x{cloaked.height}, the original "
            f"{original.width}x{original.height}"
        )
    size = crop_size_for(recognizers)
    found: list[FaceSite] = []
    if not result.no_align:
        if detector is None:
            raise InputError("verifying an aligned cloak needs the face detector")
        found = sites_from_detections(detector.detect(cloaked.rgb), size)
    faces = []
    # The manifest is read once per model, not once per face.
    aims = {r.name: aim_for(r, result.settings.aim, result.targeted) for r in recognizers}
    for face in result.faces:
        again = rematch(face.site, found)
        clean = embed(original.rgb, again.site, recognizers)
        after = embed(cloaked.rgb, again.site, recognizers)
        checks = []
        for r in recognizers:
            reference = face.references.get(r.name)
            if reference is None:  # a model the cloak did not use: judge against its own clean view
                reference = embed(original.rgb, face.site, [r])[r.name]
            threshold, aim = r.info.threshold, aims[r.name]
            before_sim, after_sim = _cosine(clean[r.name], reference), _cosine(after[r.name], reference)
            if aim is None:
                protected = False
            elif result.targeted:
                protected = after_sim >= aim
            else:
                protected = after_sim < aim
            checks.append(ModelCheck(r.name, threshold, before_sim, after_sim, protected, aim))
        faces.append(
            FaceCheck(
                face.number,
                face.site.box,
                again.matched,
                again.iou,
                tuple(checks),
                embeddings=after,
                area=face.site.area if math.isfinite(face.site.area) else 0.0,
            )
        )
    ssim, psnr = image_quality(original.rgb, cloaked.rgb)
    return VerifyReport(
        path=Path(written) if isinstance(written, (str, Path)) else None,
        targeted=result.targeted,
        faces=tuple(faces),
        ssim=ssim,
        psnr=psnr,
        seconds=time.perf_counter() - start,
    )


def _cosine(a: Float32Array, b: Float32Array) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else 0.0


# ---------------------------------------------------------------------------------------------------
# compare and classify


@dataclass(frozen=True)
class Similarity:
    """One recognizer's similarity between two faces and whether it calls them the same person."""

    name: str
    similarity: float
    threshold: float | None
    match: bool


def compare_faces(
    first: LoadedImage,
    second: LoadedImage,
    *,
    recognizers: Sequence[AttackSession],
    detector: Detector | None = None,
    no_align: bool = False,
) -> list[Similarity]:
    """Per recognizer, the cosine similarity of the largest face of each photo, against its threshold.

    Raises:
        NoFaceError: a photo has no face (and not ``no_align``).
    """
    size = crop_size_for(recognizers)
    embeddings = []
    for photo in (first, second):
        try:
            sites = find_faces(photo.rgb, detector, size=size, no_align=no_align, name=photo.name)
        except NoFaceError as exc:  # find_faces words its advice for the cloak
            raise NoFaceError(
                f"no face found in {photo.name}; use --no-align to compare the images' centred squares"
            ) from exc
        embeddings.append(embed(photo.rgb, sites[select_faces(sites, largest=True)[0]], recognizers))
    out = []
    for r in recognizers:
        sim = _cosine(embeddings[0][r.name], embeddings[1][r.name])
        threshold = r.info.threshold
        out.append(Similarity(r.name, sim, threshold, threshold is not None and sim >= threshold))
    return out


def same_person(similarities: Sequence[Similarity]) -> bool:
    """The models' verdict on a comparison: the same person when more than half of them match."""
    return sum(s.match for s in similarities) * 2 > len(similarities)


def classifier_input(rgb: NDArray[np.uint8], size: int) -> Float32Array:
    """The centred square of ``rgb`` resized to ``size`` (Pillow bilinear, antialiased): ``[1, S, S, 3]``."""
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = Image.fromarray(np.ascontiguousarray(rgb)).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )
    return np.asarray(image, dtype=np.float32)[None]


def classify_image(
    rgb: NDArray[np.uint8], session: AttackSession, *, top: int = 5
) -> list[tuple[str, float]]:
    """The ``top`` classes of a classifier attack graph with their probabilities, best first."""
    if session.info.kind != "classifier":
        raise InputError(f"{session.name} is a {session.info.kind} model, not a classifier")
    if top < 1:
        raise InputError(f"top must be >= 1, got {top}")
    log_probs = session.features(classifier_input(rgb, session.info.canonical_size))[0].astype(np.float64)
    probs = np.exp(log_probs - log_probs.max())
    probs /= probs.sum()
    labels = session.info.labels or tuple(f"class {i}" for i in range(probs.shape[0]))
    order = np.argsort(-probs, kind="stable")[:top]
    return [(labels[i], float(probs[i])) for i in order]


@dataclass(frozen=True)
class SetLinkability:
    """How many of a set's cloaked photos still match one another: a tracker holding only the cloaked
    photos of one person groups the pairs that match (P3 of ``uncnn-rt eval``, on one set)."""

    photos: int
    pairs: int
    linked_pairs: dict[str, int]
    """Per recognizer with a threshold, the pairs of photos whose faces match at its threshold."""
    linked_photos: int
    """Photos whose face matches another photo's under at least one recognizer."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "photos": self.photos,
            "pairs": self.pairs,
            "linked_pairs": dict(self.linked_pairs),
            "linked_photos": self.linked_photos,
        }


def set_linkability(
    reports: Sequence[VerifyReport], recognizers: Sequence[AttackSession]
) -> SetLinkability | None:
    """Among the saved photos of ``reports`` (each photo's largest face), the pairs that still match
    under each recognizer; None for fewer than two photos with a face."""
    faces = [max(r.faces, key=lambda f: f.area) for r in reports if r.faces]
    if len(faces) < 2:
        return None
    linked: dict[str, int] = {}
    touched = np.zeros(len(faces), bool)
    for model in recognizers:
        threshold = model.info.threshold
        if threshold is None or any(model.name not in f.embeddings for f in faces):
            continue
        e = np.stack([f.embeddings[model.name] for f in faces]).astype(np.float64)
        sims = e @ e.T
        match = np.triu(sims >= threshold, k=1)
        linked[model.name] = int(match.sum())
        touched |= match.any(axis=0) | match.any(axis=1)
    n = len(faces)
    return SetLinkability(n, n * (n - 1) // 2, linked, int(touched.sum()))
