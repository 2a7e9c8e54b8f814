"""Similarity fits (Umeyama), the canonical templates, and the box / whole-image fallbacks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from uncnn_rt.runtime.errors import AlignmentError, InputError
from uncnn_rt.runtime.geometry import align
from uncnn_rt.runtime.geometry.warp import Warp, apply_affine

DEV_CHIPS = Path(__file__).resolve().parents[1] / ".." / "shared" / "faces" / "dev" / "identities"


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> NDArray[np.float64]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def test_umeyama_recovers_a_known_similarity_exactly() -> None:
    template = align.blazeface_template()
    truth = similarity(0.37, -28.0, 140.0, -12.5)
    landmarks = apply_affine(truth, template)
    np.testing.assert_allclose(align.umeyama(template, landmarks), truth, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        align.umeyama(template, landmarks, align.BLAZEFACE_WEIGHTS), truth, rtol=0, atol=1e-6
    )


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(0.05, 20.0),
    angle=st.floats(-179.0, 179.0),
    tx=st.floats(-2000.0, 2000.0),
    ty=st.floats(-2000.0, 2000.0),
    points=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_umeyama_recovers_random_similarities(
    scale: float, angle: float, tx: float, ty: float, points: int, seed: int
) -> None:
    src = np.random.default_rng(seed).uniform(0, 224, (points, 2))
    if np.ptp(src, axis=0).max() < 1:
        return
    truth = similarity(scale, angle, tx, ty)
    fit = align.umeyama(src, apply_affine(truth, src))
    np.testing.assert_allclose(fit, truth, rtol=0, atol=1e-6 * max(1.0, scale, abs(tx), abs(ty)))


def test_transform_for_landmarks_maps_the_template_back_onto_the_landmarks() -> None:
    truth_crop_to_photo = similarity(2.5, 17.0, 812.0, 433.0)
    landmarks = apply_affine(truth_crop_to_photo, align.blazeface_template())
    crop_to_photo = align.transform_for_blazeface(landmarks)
    np.testing.assert_allclose(crop_to_photo, truth_crop_to_photo, atol=1e-6)
    five = apply_affine(truth_crop_to_photo, align.five_point_template())
    np.testing.assert_allclose(
        align.transform_for_landmarks(five, align.five_point_template()), truth_crop_to_photo, atol=1e-6
    )


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), points=st.integers(2, 8))
def test_reflection_is_never_returned(seed: int, points: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.uniform(-100, 100, (points, 2))
    mirrored = src * np.array([-1.0, 1.0]) + rng.normal(0, 1, src.shape)
    for dst in (mirrored, rng.uniform(-100, 100, (points, 2))):
        # Noisy or random points are never perfectly symmetric, so a proper rotation with a positive
        # scale always exists: the fit must not raise (the symmetric case is checked below).
        fit = align.umeyama(src, dst)
        assert np.linalg.det(fit[:, :2]) > 0
        scale = math.sqrt(np.linalg.det(fit[:, :2]))
        np.testing.assert_allclose(fit[:, :2].T @ fit[:, :2], scale**2 * np.eye(2), atol=1e-9 * scale**2)


def test_a_perfectly_mirrored_symmetric_set_admits_only_zero_scale() -> None:
    """A square and its mirror image: every rotation fits it equally badly, the best scale is 0 (the two
    singular values of the cross-covariance are equal), which the fit refuses rather than reflect."""
    square = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]) * 30 + [100.0, 80.0]
    mirrored = square * [-1.0, 1.0]
    with pytest.raises(AlignmentError, match="reflection or zero scale"):
        align.umeyama(square, mirrored)


def test_mirrored_face_gets_a_rotation_not_a_flip() -> None:
    """Landmarks given in the wrong order (image-left/right swapped) still fit a proper rotation."""
    template = align.five_point_template()
    swapped = template[[1, 0, 2, 4, 3]]
    fit = align.umeyama(swapped, template)
    assert np.linalg.det(fit[:, :2]) > 0


def test_degenerate_points_raise_a_clear_error() -> None:
    same = np.full((5, 2), 42.0)
    with pytest.raises(AlignmentError, match="degenerate source landmarks: all points coincide"):
        align.umeyama(same, align.five_point_template())
    with pytest.raises(AlignmentError, match="degenerate template points"):
        align.umeyama(align.five_point_template(), same)
    with pytest.raises(AlignmentError, match="finite"):
        align.umeyama([[0, 0], [np.nan, 1]], [[0, 0], [1, 1]])
    with pytest.raises(AlignmentError, match="one shape"):
        align.umeyama(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(AlignmentError, match="at least two positive"):
        align.umeyama(align.five_point_template(), align.five_point_template(), [1, 0, 0, 0, 0])
    assert issubclass(AlignmentError, InputError)


def test_templates_scale_exactly_with_the_crop_size() -> None:
    np.testing.assert_allclose(align.blazeface_template(150), align.BLAZEFACE_TEMPLATE_CHIP)
    np.testing.assert_allclose(align.blazeface_template(224), align.BLAZEFACE_TEMPLATE_CHIP * 224 / 150)
    assert align.five_point_template().shape == (5, 2)
    with pytest.raises(ValueError, match="read-only"):
        align.BLAZEFACE_TEMPLATE_CHIP[0, 0] = 0.0


def test_five_point_template_is_arcface_shaped_in_chip_framing() -> None:
    five = align.FIVE_POINT_TEMPLATE_CHIP
    # ArcFace's shape exactly: the 112-px template maps onto it by a similarity with zero residual.
    fit = align.umeyama(align.ARCFACE_TEMPLATE_112, five)
    np.testing.assert_allclose(apply_affine(fit, align.ARCFACE_TEMPLATE_112), five, atol=1e-9)
    # Framed like the chips: eyes and mouth centre within a pixel of the measured chip landmarks.
    blaze = align.CHIP_LANDMARKS
    assert np.abs(five[:2] - blaze[:2]).max() < 1.0
    assert np.abs(five[3:].mean(axis=0) - blaze[3]).max() < 1.0
    arc_crop = apply_affine(
        align.canonical_to_arcface112(), align.five_point_template()
    )  # canonical -> ArcFace 112 crop
    np.testing.assert_allclose(arc_crop, align.ARCFACE_TEMPLATE_112, atol=1e-6)


def test_transform_for_box_centres_and_scales_the_box() -> None:
    m = align.transform_for_box([100.0, 50.0, 300.0, 210.0], 224, box_scale=1.25)
    np.testing.assert_allclose(apply_affine(m, [[112.0, 112.0]]), [[200.0, 130.0]])
    np.testing.assert_allclose(np.linalg.det(m[:, :2]), (200 * 1.25 / 224) ** 2)
    assert m[0, 1] == 0 and m[1, 0] == 0
    with pytest.raises(AlignmentError, match="x1 > x0"):
        align.transform_for_box([10, 10, 5, 20])
    with pytest.raises(AlignmentError, match="box_scale"):
        align.transform_for_box([0, 0, 5, 5], box_scale=0)


def test_whole_image_is_a_centred_square_crop() -> None:
    m = align.transform_for_whole_image(200, 300, 224)
    corners = apply_affine(m, [[0.0, 0.0], [224.0, 224.0]])
    np.testing.assert_allclose(corners, [[50.0, 0.0], [250.0, 200.0]])
    # A chip scaled to 224 is the canonical crop: the 150-px template lands on the 224-px one.
    m = align.transform_for_whole_image(150, 150)
    np.testing.assert_allclose(apply_affine(m, align.blazeface_template()), align.BLAZEFACE_TEMPLATE_CHIP)


def test_aligned_crop_of_a_placed_chip_is_the_chip_scaled_to_224() -> None:
    """End to end through align and warp: place a chip in a photo, align on its landmarks, crop.

    The chip is a linear ramp, which bilinear sampling reproduces exactly, so any half-pixel slip in
    the conventions would show as an offset of the ramp.
    """
    ys, xs = np.mgrid[0:150, 0:150] + 0.5  # chip pixel centres
    chip = np.stack([xs * 0.9 + ys * 0.3, 200 - ys * 1.1, xs * 0.5 + 20], axis=2).astype(np.float32)
    chip_to_photo = similarity(2.2, 15.0, 150.0, 40.0)
    photo = Warp(np.linalg.inv(np.vstack([chip_to_photo, [0, 0, 1]]))[:2], chip.shape, 480).apply(chip)
    landmarks = apply_affine(chip_to_photo, align.BLAZEFACE_TEMPLATE_CHIP)
    crop = Warp(align.transform_for_blazeface(landmarks), photo.shape, 224, antialias=False).apply(photo)
    expected = Warp(align.transform_for_whole_image(150, 150), chip.shape, 224).apply(chip)
    inner = slice(8, -8)  # away from the chip's clamped border
    np.testing.assert_allclose(crop[inner, inner], expected[inner, inner], rtol=0, atol=1e-3)


@pytest.mark.shared
@pytest.mark.skipif(not DEV_CHIPS.is_dir(), reason="development set ../shared/faces/dev not present")
def test_template_eyes_match_the_dev_chips() -> None:
    """Re-measure: darkness centroid of each eye in the mean dev chip is within 3 px of the template."""
    chips = sorted(DEV_CHIPS.glob("*/*.png"))
    assert len(chips) >= 10
    mean = np.mean([np.asarray(Image.open(p).convert("L"), np.float64) for p in chips], axis=0)
    assert mean.shape == (align.CHIP_SIZE, align.CHIP_SIZE)
    smooth = ndimage.gaussian_filter(mean, 2.0)
    for eye in align.CHIP_LANDMARKS[:2]:
        x0, y0 = int(eye[0]) - 14, int(eye[1]) - 11
        window = smooth[y0 : y0 + 22, x0 : x0 + 28]
        weight = (window.max() - window) ** 3
        rows, cols = np.mgrid[y0 : y0 + 22, x0 : x0 + 28]
        centroid = np.array([(cols * weight).sum(), (rows * weight).sum()]) / weight.sum() + 0.5
        assert np.hypot(*(centroid - eye)) < 3.0, (centroid, eye)


@pytest.mark.shared
@pytest.mark.skipif(not DEV_CHIPS.is_dir(), reason="development set ../shared/faces/dev not present")
def test_blazeface_template_is_where_the_detector_puts_keypoints_on_the_chips() -> None:
    """Aligning detector keypoints to this template must reproduce the chip framing the recognizers
    were calibrated on: the detector's mean keypoints on the chips are within 1.5 px of it."""
    from uncnn_rt.runtime import catalog
    from uncnn_rt.runtime.geometry.detect import FaceDetector

    if not any(e.name == "blazeface" for e in catalog.load_manifest()):
        pytest.skip("the shipped BlazeFace detector is not in models/manifest.json")
    detector = FaceDetector(device="cpu")
    points = []
    for chip in sorted(DEV_CHIPS.glob("*/*.png")):
        faces = detector.detect(np.asarray(Image.open(chip).convert("RGB")))
        assert faces, f"no face found in {chip.name}"
        points.append(faces[0].landmarks[:4])
    mean = np.mean(points, axis=0)
    np.testing.assert_allclose(mean, align.BLAZEFACE_TEMPLATE_CHIP[:4], atol=1.5)
