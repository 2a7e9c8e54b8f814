"""Faces in a photo: where they are (:class:`FaceSite`), which to take, and what a recognizer sees of them.

A face site is a detection (box, six BlazeFace landmarks, score) with the similarity transform that
frames it in a recognizer's canonical crop (:mod:`uncnn_rt.runtime.geometry.align`). Every command that
looks at faces (cloak, verify, compare, eval) finds, selects, embeds and re-matches them here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime.arrays import Float32Array, Float64Array, Uint8Array
from uncnn_rt.runtime.attacks.linear import Resize
from uncnn_rt.runtime.contract import CANONICAL_SIZE
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.geometry.align import (
    transform_for_blazeface,
    transform_for_box,
    transform_for_whole_image,
)
from uncnn_rt.runtime.geometry.warp import Warp
from uncnn_rt.runtime.sessions import AttackSession

MATCH_IOU: Final = 0.3
"""A re-detected face is the same face when the boxes overlap at least this much."""


BOX_SCALE: Final = 1.5
"""Crop side over box side when a detection has no landmarks (BlazeFace boxes run brow to chin)."""


class NoFaceError(InputError):
    """No face was found in a photo that was to be cloaked or compared."""


class TooManyFacesError(InputError):
    """A photo holds more faces to cloak than the caller allows in one cloak (a cloak's memory and time
    grow with its faces); raised after detection, before any attack step."""

    def __init__(self, found: int, limit: int, name: str) -> None:
        super().__init__(
            f"{found} faces found in {name}; at most {limit} are cloaked at once: "
            "choose one face, or the largest, or crop the photo"
        )
        self.found, self.limit, self.name = found, limit, name


class DetectedFace(Protocol):
    """What a detector reports per face (``uncnn_rt.runtime.geometry.detect.Face``)."""

    @property
    def box(self) -> tuple[float, float, float, float]: ...

    @property
    def landmarks(self) -> NDArray[np.float32]: ...

    @property
    def score(self) -> float: ...


class Detector(Protocol):
    """Anything with ``detect(rgb [H, W, 3] uint8) -> faces``
    (:class:`uncnn_rt.runtime.geometry.detect.FaceDetector`)."""

    def detect(self, rgb: Uint8Array) -> Sequence[DetectedFace]: ...


@dataclass(frozen=True)
class FaceSite:
    """One face to cloak (or compare): where it is and the crop that frames it.

    ``crop_to_photo`` maps canonical-crop coordinates (side ``size``) to photo coordinates.
    ``box``, ``landmarks`` and ``score`` are None for the whole image (``no_align``).
    """

    crop_to_photo: Float64Array
    size: int
    box: tuple[float, float, float, float] | None = None
    landmarks: Float32Array | None = field(default=None, repr=False)
    score: float | None = None

    @property
    def area(self) -> float:
        if self.box is None:
            return math.inf
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)


def load_detector(*, device: str = "auto") -> Detector:
    """The shipped BlazeFace detector (:class:`uncnn_rt.runtime.geometry.detect.FaceDetector`)."""
    try:
        from uncnn_rt.runtime.geometry.detect import FaceDetector
    except ImportError as exc:  # the detector module ships with the face pipeline
        raise ModelError(f"the face detector is not available in this installation ({exc})") from exc
    detector: Detector = FaceDetector(device=device)
    return detector


def crop_size_for(recognizers: Sequence[AttackSession]) -> int:
    """Side of the crop the photo is warped to: the largest canonical size among the recognizers."""
    if not recognizers:
        raise InputError("at least one recognizer is needed")
    return max(r.info.canonical_size for r in recognizers)


def find_faces(
    rgb: Uint8Array,
    detector: Detector | None,
    *,
    size: int = CANONICAL_SIZE,
    no_align: bool = False,
    name: str = "image",
) -> list[FaceSite]:
    """The faces of a photo, left to right, each with its crop transform; ``no_align``: the whole image.

    Raises:
        NoFaceError: the detector found nothing.
    """
    height, width = rgb.shape[:2]
    if no_align:
        return [FaceSite(transform_for_whole_image(height, width, size), size)]
    if detector is None:
        raise InputError("face detection needs a detector (or use no_align)")
    sites = sites_from_detections(detector.detect(rgb), size)
    if not sites:
        raise NoFaceError(f"no face found in {name}; use --no-align to cloak the whole image")
    return sites


def sites_from_detections(found: Sequence[DetectedFace], size: int) -> list[FaceSite]:
    """Detected faces as :class:`FaceSite` s (landmarks -> similarity transform), left to right.

    Six BlazeFace landmarks give the transform; a face without them is framed from its box.
    """
    sites = []
    for face in found:
        x0, y0, x1, y1 = (float(v) for v in face.box)
        landmarks = None if face.landmarks is None else np.asarray(face.landmarks, dtype=np.float32)
        if landmarks is not None and landmarks.shape == (6, 2):
            matrix = transform_for_blazeface(landmarks, size)
        else:
            matrix = transform_for_box((x0, y0, x1, y1), size, box_scale=BOX_SCALE)
        sites.append(FaceSite(matrix, size, (x0, y0, x1, y1), landmarks, float(face.score)))
    sites.sort(key=_centre)
    return sites


def _centre(site: FaceSite) -> tuple[float, float]:
    assert site.box is not None
    return (site.box[0] + site.box[2]) / 2, (site.box[1] + site.box[3]) / 2


def select_faces(sites: Sequence[FaceSite], *, face: int | None = None, largest: bool = False) -> list[int]:
    """Indices (into ``sites``) of the faces to cloak: all, the ``face``-th (0-based), or the largest."""
    if face is not None and largest:
        raise InputError("give either a face number or largest, not both")
    if face is not None:
        if not 0 <= face < len(sites):
            raise InputError(
                f"face {face + 1} asked, but {len(sites)} face(s) were found (numbered left to right)"
            )
        return [face]
    if largest:
        return [max(range(len(sites)), key=lambda i: sites[i].area)]
    return list(range(len(sites)))


def embed(
    rgb: NDArray[np.generic], site: FaceSite, recognizers: Sequence[AttackSession]
) -> dict[str, Float32Array]:
    """Each recognizer's unit embedding ``[D]`` of the face at ``site`` in ``rgb`` ``[H, W, 3]``."""
    crop = Warp(site.crop_to_photo, rgb.shape, site.size).apply(rgb)[None]
    return {r.name: features_of(r, crop)[0] for r in recognizers}


def features_of(session: AttackSession, crops: Float32Array) -> Float32Array:
    """``session``'s unit embeddings ``[N, D]`` of canonical crops ``[N, S, S, 3]`` of any size ``S``."""
    size = session.info.canonical_size
    if crops.shape[1:3] != (size, size):
        crops = Resize(crops.shape[1:3], (size, size)).forward(crops)
    return session.features(crops)


@dataclass(frozen=True)
class Rematch:
    """A face found again on another version of its photo (the cloaked one): :func:`rematch`."""

    site: FaceSite
    """The re-detected face when ``matched``, else the face as it was."""
    matched: bool
    """A re-detected box overlaps the face's by at least :data:`MATCH_IOU` (always for the whole image)."""
    iou: float | None
    """The largest overlap of any re-detected box, or None when nothing was detected (or the face is
    the whole image, which has no box)."""


def best_match(site: FaceSite, found: Sequence[FaceSite]) -> tuple[FaceSite | None, float]:
    """The face of ``found`` whose box overlaps ``site``'s most, and that IoU (None, 0 when none does)."""
    best, best_iou = None, 0.0
    if site.box is None:
        return best, best_iou
    for other in found:
        if other.box is None:
            continue
        overlap = box_iou(site.box, other.box)
        if overlap > best_iou:
            best, best_iou = other, overlap
    return best, best_iou


def rematch(site: FaceSite, found: Sequence[FaceSite]) -> Rematch:
    """``site`` among the faces ``found`` on another version of its photo: the detection whose box
    overlaps it most, when that IoU reaches :data:`MATCH_IOU`. Cloak, verify and eval all re-match
    faces this way, so a face one of them calls found, the others do too."""
    if site.box is None:
        return Rematch(site, True, None)
    best, overlap = best_match(site, found)
    if best is None or overlap < MATCH_IOU:
        return Rematch(site, False, overlap if found else None)
    return Rematch(best, True, overlap)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
