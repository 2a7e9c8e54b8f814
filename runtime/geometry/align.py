"""Landmarks to the similarity transform that frames a face as the canonical crop.

**Canonical crop.** An ``S x S`` crop (``S = 224``) framed like the development set's aligned chips
(``faces/dev/identities/*/*.png``, 150 x 150 face-api.js example chips): "a dev chip scaled to 224".
Templates are given in chip pixels and scaled by ``S / 150``; coordinates follow the half-pixel
convention of :mod:`uncnn_rt.runtime.geometry.warp` (pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)``), so the
scaling is exact.

**Point order.** Index 0 is the subject's right eye, which is on the image's *left* in an unmirrored
photo (smaller x). This is both BlazeFace's order (MediaPipe: right eye, left eye, nose tip, mouth
centre, right ear tragion, left ear tragion; @vladmandic/human names the same indices by image side,
``leftEye: 0``) and the ArcFace 5-point order (eyes, nose, mouth corners, image-left first).

**Fit.** :func:`umeyama` finds the similarity ``T(p) = s R p + t`` (``s > 0``, ``R`` a rotation,
never a reflection) minimising ``sum_k w_k |T(landmark_k) - template_k|^2``, i.e. the error is
measured in canonical-crop pixels; :func:`transform_for_landmarks` returns its inverse, the
crop-to-photo matrix that :class:`uncnn_rt.runtime.geometry.warp.Warp` samples with.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import ArrayLike

from uncnn_rt.runtime.arrays import Float64Array
from uncnn_rt.runtime.contract import CANONICAL_SIZE
from uncnn_rt.runtime.errors import AlignmentError
from uncnn_rt.runtime.geometry.warp import apply_affine, invert_affine

CHIP_SIZE: Final = 150
"""Side of the development set's aligned chips, in which the templates below are written."""


def _frozen(values: ArrayLike) -> Float64Array:
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


# How these were measured (on the 40 chips of faces/dev, all grayscale 150 x 150):
# - eye centres, nose tip and mouth centre (the lips' junction) were read by hand on a 10-px grid at
#   4x zoom on six chips (amy1, bernadette3, howard4, penny3, raj2, stuart1), e.g. amy1: eyes (47, 42)
#   and (102, 43), nose (72, 80), mouth (78, 106); mean: eyes (47.3, 41.2), (101.8, 42.3), nose
#   (74.2, 80.8), mouth (75.7, 106.3);
# - cross-checked on all 40 chips: the darkness centroids of the eyes in the mean chip (Gaussian
#   sigma 2) are (45.7, 40.3) and (102.4, 40.0); normalised cross-correlation against mean-chip
#   patches gives medians eyes (47.3, 42.2), (101.8, 43.3), nose (74.2, 80.8), mouth (74.7, 107.8);
# - the chips are centred on the face (eye midpoint at x = 74.5), so the template is made left-right
#   symmetric about x = 75: inter-ocular distance 55.2 px, eyes at y = 41.5.
# - ear tragions are rarely inside the chip; (13, 66) and (137, 66) come from the frontal chips where
#   the ear shows (howard4, stuart1) and agree with the adult tragion-to-tragion width of about 2.25
#   inter-pupillary distances (124 px here).
# The chips are not rotation-normalised (bernadette3's eyes differ by 13 px in height); the template
# is their average framing, upright.
CHIP_LANDMARKS: Final = _frozen(
    [
        [47.4, 41.5],  # right eye (image left)
        [102.6, 41.5],  # left eye
        [75.0, 81.0],  # nose tip
        [75.0, 107.0],  # mouth centre
        [13.0, 66.0],  # right ear tragion
        [137.0, 66.0],  # left ear tragion
    ]
)
"""Anatomical landmarks of the dev-chip framing, measured by eye (see above); the ArcFace window of
the 112-px recognizers is derived from these."""

# Where the shipped BlazeFace detector puts its keypoints on the same 40 chips (mean over the chips,
# measured with runtime.detect.FaceDetector at its default settings). BlazeFace's "eye" sits about
# 4.5 px below the eye centre read by hand, so aligning detector output to CHIP_LANDMARKS would frame
# photos lower than the chips the recognizers were calibrated on; aligning to the detector's own mean
# reproduces the chip framing. Ears are not measured (rarely inside a chip) and keep the anatomical
# estimate with a low weight.
BLAZEFACE_TEMPLATE_CHIP: Final = _frozen(
    [
        [46.5, 46.6],  # right eye (image left)
        [102.6, 45.2],  # left eye
        [73.0, 80.3],  # nose tip
        [74.7, 108.3],  # mouth centre
        [13.0, 66.0],  # right ear tragion
        [137.0, 66.0],  # left ear tragion
    ]
)

BLAZEFACE_WEIGHTS: Final = _frozen([1.0, 1.0, 1.0, 1.0, 0.1, 0.1])
"""Ear tragions are the least reliable BlazeFace keypoints (hidden or on the cheek's edge as soon as
the head turns; their spread is about 3x the inner points'), so they weigh ~1/3^2 in the fit."""

ARCFACE_TEMPLATE_112: Final = _frozen(
    np.array(
        [
            [38.2946, 51.6963],
            [73.5318, 51.5014],
            [56.0252, 71.7366],
            [41.5493, 92.3655],
            [70.7299, 92.2041],
        ]
    )
    + 0.5  # published in pixel-index coordinates (centre at integers): shift to half-pixel
)
"""The standard 5-point ArcFace (insightface) template of a 112 x 112 crop: eyes, nose, mouth corners."""


def umeyama(src: ArrayLike, dst: ArrayLike, weights: ArrayLike | None = None) -> Float64Array:
    """Least-squares similarity from ``src`` to ``dst`` points, without reflection (Umeyama, 1991).

    With weights ``w_k`` (normalised to sum 1), means ``mu_s``, ``mu_d``, centred points ``X_k``,
    ``Y_k``, cross-covariance ``C = sum_k w_k Y_k X_k^T = U D V^T`` (SVD) and source variance
    ``var_s = sum_k w_k |X_k|^2``::

        E = diag(1, sign(det U det V))      (flips the weakest axis rather than reflect)
        R = U E V^T,   s = tr(D E) / var_s,   t = mu_d - s R mu_s

    minimises ``sum_k w_k |s R src_k + t - dst_k|^2`` over ``s > 0`` and rotations ``R``.

    Args:
        src, dst: ``[K, 2]`` (x, y) points, ``K >= 2``.
        weights: ``[K]`` non-negative, at least two points with positive weight; default all 1.

    Returns:
        The 2x3 matrix ``[s R | t]`` (float64).

    Raises:
        AlignmentError: shapes differ, values are not finite, or either point set has no spread
            (all weighted points coincide), so no scale or rotation is defined.
    """
    s = np.asarray(src, dtype=np.float64)
    d = np.asarray(dst, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 2 or s.shape != d.shape or s.shape[0] < 2:
        raise AlignmentError(
            f"a similarity fit needs two [K >= 2, 2] point sets of one shape, got {list(s.shape)} "
            f"and {list(d.shape)}"
        )
    w = np.ones(s.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (s.shape[0],) or not np.isfinite(w).all() or (w < 0).any() or (w > 0).sum() < 2:
        raise AlignmentError(
            f"weights must be {s.shape[0]} finite non-negative values with at least two positive, "
            f"got {w.tolist()}"
        )
    if not (np.isfinite(s).all() and np.isfinite(d).all()):
        raise AlignmentError(f"landmarks must be finite, got {s.tolist()} -> {d.tolist()}")
    w = w / w.sum()
    mu_s, mu_d = w @ s, w @ d
    x, y = s - mu_s, d - mu_d
    var_s = float(w @ np.sum(x * x, axis=1))
    var_d = float(w @ np.sum(y * y, axis=1))
    extent = max(float(np.abs(s).max()), float(np.abs(d).max()), 1.0)
    if var_s <= (1e-9 * extent) ** 2 or var_d <= (1e-9 * extent) ** 2:
        which = "source landmarks" if var_s <= (1e-9 * extent) ** 2 else "template points"
        raise AlignmentError(
            f"degenerate {which}: all points coincide (spread {np.sqrt(max(var_s, 0.0)):.3g} px -> "
            f"{np.sqrt(max(var_d, 0.0)):.3g} px); expected distinct eye, nose and mouth positions"
        )
    cov = (y * w[:, None]).T @ x
    u, sing, vt = np.linalg.svd(cov)
    flip = np.diag([1.0, float(np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0)])
    rotation = u @ flip @ vt
    scale = float(np.sum(sing * np.diag(flip))) / var_s
    if not scale > 0:
        raise AlignmentError(
            f"landmarks fit the template only with a reflection or zero scale (scale {scale:.3g}); "
            "check the point order (index 0 is the subject's right eye, on the image's left)"
        )
    translation = mu_d - scale * rotation @ mu_s
    return np.asarray(np.concatenate([scale * rotation, translation[:, None]], axis=1), dtype=np.float64)


def blazeface_template(size: int = CANONICAL_SIZE) -> Float64Array:
    """The 6 BlazeFace keypoints' positions in an ``size x size`` canonical crop, ``[6, 2]``."""
    return np.asarray(BLAZEFACE_TEMPLATE_CHIP * (size / CHIP_SIZE), dtype=np.float64)


def _arcface_in_chip() -> Float64Array:
    """The ArcFace template moved into the chip framing.

    A similarity maps the ArcFace eyes and mouth centre (mean of its corners) onto the measured chip
    eyes and mouth centre; its nose is left out of the fit because "nose" means the tip in the chip
    measurements but sits higher in ArcFace's template (0.49 vs 0.60 of the eye-to-mouth height).
    """
    arc = ARCFACE_TEMPLATE_112
    src = np.vstack([arc[:2], arc[3:].mean(axis=0, keepdims=True)])
    dst = CHIP_LANDMARKS[[0, 1, 3]]
    return np.asarray(apply_affine(umeyama(src, dst), arc), dtype=np.float64)


FIVE_POINT_TEMPLATE_CHIP: Final = _frozen(_arcface_in_chip())
"""ArcFace's 5 points in chip pixels: about (46.9, 41.7), (103.1, 41.7), (75.0, 73.8), (51.7, 106.6),
(98.3, 106.6): the ArcFace shape, scaled 1.594x and shifted to the dev-chip framing."""


def five_point_template(size: int = CANONICAL_SIZE) -> Float64Array:
    """The 5 ArcFace-order points (eyes, nose, mouth corners) in the canonical crop, ``[5, 2]``."""
    return np.asarray(FIVE_POINT_TEMPLATE_CHIP * (size / CHIP_SIZE), dtype=np.float64)


def canonical_to_arcface112(size: int = CANONICAL_SIZE) -> Float64Array:
    """2x3 map from canonical-crop coordinates to those of an ArcFace-aligned 112 x 112 crop.

    For folding an ArcFace-style model's own alignment into its attack graph. The ArcFace crop is
    framed looser and higher than the chips: at ``S = 224`` its square spans about x -22..245 and
    y -62..206 in canonical pixels, so it needs forehead the canonical crop does not hold.
    """
    return umeyama(five_point_template(size), ARCFACE_TEMPLATE_112)


def transform_for_landmarks(
    landmarks: ArrayLike, template: ArrayLike, weights: ArrayLike | None = None
) -> Float64Array:
    """Crop-to-photo 2x3 matrix that puts ``landmarks [K, 2]`` (photo coords) on ``template [K, 2]``.

    Fits photo -> crop with :func:`umeyama` (error measured in crop pixels, independent of the
    face's size in the photo) and inverts it.
    """
    return np.asarray(invert_affine(umeyama(landmarks, template, weights)), dtype=np.float64)


def transform_for_blazeface(landmarks: ArrayLike, size: int = CANONICAL_SIZE) -> Float64Array:
    """:func:`transform_for_landmarks` with the BlazeFace template and weights."""
    return transform_for_landmarks(landmarks, blazeface_template(size), BLAZEFACE_WEIGHTS)


def transform_for_box(
    box_xyxy: ArrayLike, size: int = CANONICAL_SIZE, *, box_scale: float = 1.0
) -> Float64Array:
    """Crop-to-photo matrix from a face box alone, when no landmarks are known.

    Upright and isotropic: the box's centre goes to the crop's centre and its longer side ``L``
    spans ``size / box_scale`` crop pixels, i.e. the crop covers a square of side ``L * box_scale``
    (``box_scale > 1`` adds margin). The detector's wrapper sets ``box_scale`` to its boxes'
    relation to the chip framing::

        x = (L box_scale / S) (u - S/2) + cx,    y = (L box_scale / S) (v - S/2) + cy

    Args:
        box_xyxy: ``(x0, y0, x1, y1)`` in continuous photo coordinates, ``x1 > x0``, ``y1 > y0``.
    """
    b = np.asarray(box_xyxy, dtype=np.float64)
    if b.shape != (4,) or not np.isfinite(b).all() or not (b[2] > b[0] and b[3] > b[1]):
        raise AlignmentError(
            f"a face box must be finite (x0, y0, x1, y1) with x1 > x0, y1 > y0, got {b.tolist()}"
        )
    if not box_scale > 0:
        raise AlignmentError(f"box_scale must be > 0, got {box_scale}")
    side = float(max(b[2] - b[0], b[3] - b[1])) * box_scale
    cx, cy = float(b[0] + b[2]) / 2, float(b[1] + b[3]) / 2
    k = side / size
    return np.array([[k, 0.0, cx - k * size / 2], [0.0, k, cy - k * size / 2]], dtype=np.float64)


def transform_for_whole_image(height: int, width: int, size: int = CANONICAL_SIZE) -> Float64Array:
    """``--no-align``: the centred square of side ``min(H, W)`` scaled onto the canonical crop.

    A centre crop rather than a letterbox: padding bars are nothing a recognizer saw in training and
    letterboxing would shrink the face; an input given with ``--no-align`` is meant to be a face chip
    or a head-and-shoulders portrait already. Pixels outside the square get no perturbation.
    """
    if height < 1 or width < 1:
        raise AlignmentError(f"image must be at least 1x1, got {height}x{width}")
    side = min(height, width)
    k = side / size
    return np.array([[k, 0.0, (width - side) / 2], [0.0, k, (height - side) / 2]], dtype=np.float64)
