"""The crop warp: exact adjoint, exact identity, agreement with scipy's bilinear sampling, the mask."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy import ndimage

from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.geometry.warp import (
    Box,
    Warp,
    WarpBatch,
    apply_affine,
    box_polygon,
    feather_mask,
    invert_affine,
)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> NDArray[np.float64]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def centred_similarity(
    size: int, photo_hw: tuple[int, int], scale: float, angle_deg: float, shift: tuple[float, float] = (0, 0)
) -> NDArray[np.float64]:
    """Crop centre -> photo centre + shift, rotated by angle and scaled (photo px per crop px)."""
    m = similarity(scale, angle_deg, 0.0, 0.0)
    centre = np.array([photo_hw[1] / 2 + shift[0], photo_hw[0] / 2 + shift[1]])
    m[:, 2] = centre - m[:, :2] @ np.array([size / 2, size / 2])
    return m


def dot_product_gap(warp: Warp, rng: np.random.Generator, channels: int = 3) -> float:
    """``|<W x, y> - <x, W^T y>|`` relative to the size of the terms summed (``sum |W x| |y|``)."""
    h, w = warp.photo_shape
    x = rng.standard_normal((h, w, channels)).astype(np.float32)
    y = rng.standard_normal((warp.size, warp.size, channels)).astype(np.float32)
    crop = warp.apply(x).astype(np.float64)
    lhs = float(np.sum(crop * y))
    rhs = float(np.sum(x.astype(np.float64) * warp.adjoint_photo(y)))
    return abs(lhs - rhs) / float(np.sum(np.abs(crop * y)))


def test_adjoint_dot_product_rotated_crop() -> None:
    rng = np.random.default_rng(0)
    warp = Warp(centred_similarity(32, (60, 80), 1.3, 23.0), (60, 80), 32)
    assert dot_product_gap(warp, rng) < 1e-5


def test_adjoint_dot_product_crop_over_the_border() -> None:
    """Clamped taps pile weights onto edge pixels; the scatter must pile them the same way."""
    rng = np.random.default_rng(1)
    warp = Warp(centred_similarity(40, (50, 70), 2.0, -35.0, shift=(-30, 20)), (50, 70), 40)
    assert warp.box.top == 0 or warp.box.left == 0 or warp.box.bottom == 50
    assert dot_product_gap(warp, rng) < 1e-5


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(0.2, 4.0),
    angle=st.floats(-180.0, 180.0),
    dx=st.floats(-40.0, 40.0),
    dy=st.floats(-40.0, 40.0),
    size=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
)
def test_adjoint_dot_product_property(
    scale: float, angle: float, dx: float, dy: float, size: int, seed: int
) -> None:
    warp = Warp(centred_similarity(size, (37, 45), scale, angle, (dx, dy)), (37, 45, 3), size)
    assert dot_product_gap(warp, np.random.default_rng(seed), channels=2) < 1e-5


def test_identity_reproduces_the_photo_exactly() -> None:
    photo = np.random.default_rng(2).uniform(0, 255, (48, 48, 3)).astype(np.float32)
    warp = Warp([[1, 0, 0], [0, 1, 0]], photo.shape, 48)
    np.testing.assert_array_equal(warp.apply(photo), photo)
    assert warp.box == Box(0, 0, 48, 48)


def test_integer_translation_is_a_plain_slice() -> None:
    photo = np.random.default_rng(3).uniform(0, 255, (60, 90, 3)).astype(np.float32)
    warp = Warp([[1, 0, 17], [0, 1, 5]], photo.shape, 30)
    np.testing.assert_array_equal(warp.apply(photo), photo[5:35, 17:47])
    assert warp.box == Box(5, 17, 35, 47)


def test_half_pixel_convention_on_a_2x_downscale() -> None:
    """Crop pixel (r, c) of a 2x shrink sits at photo (2c + 1, 2r + 1): the mean of a 2x2 block."""
    photo = np.random.default_rng(4).uniform(0, 255, (20, 20, 1)).astype(np.float32)
    crop = Warp([[2, 0, 0], [0, 2, 0]], photo.shape, 10).apply(photo)
    blocks = photo.reshape(10, 2, 10, 2, 1).mean(axis=(1, 3))
    np.testing.assert_allclose(crop, blocks, rtol=0, atol=1e-4)


def test_rotation_matches_scipy_map_coordinates() -> None:
    rng = np.random.default_rng(5)
    photo = ndimage.gaussian_filter(rng.uniform(0, 255, (120, 150, 3)), (2, 2, 0)).astype(np.float32)
    m = centred_similarity(64, (120, 150), 1.4, 20.0, shift=(5, -3))
    crop = Warp(m, photo.shape, 64).apply(photo)
    assert np.abs(crop - sample_like_scipy(photo, m, 64)).max() / 255 < 1e-4


def sample_like_scipy(photo: NDArray[np.float32], m: NDArray[np.float64], size: int) -> NDArray[np.float64]:
    """Independent reference: bilinear sampling at the crop's pixel centres with map_coordinates."""
    centres = np.arange(size) + 0.5
    u, v = np.meshgrid(centres, centres)
    xy = apply_affine(m, np.stack([u.ravel(), v.ravel()], axis=1))
    rows, cols = xy[:, 1] - 0.5, xy[:, 0] - 0.5
    channels = [
        ndimage.map_coordinates(photo[:, :, c].astype(np.float64), [rows, cols], order=1, mode="nearest")
        for c in range(photo.shape[2])
    ]
    return np.stack(channels, axis=1).reshape(size, size, photo.shape[2])


def test_large_shrink_without_antialias_is_plain_bilinear() -> None:
    photo = ndimage.gaussian_filter(np.random.default_rng(10).uniform(0, 255, (200, 210, 3)), (1, 1, 0))
    m = centred_similarity(40, (200, 210), 3.3, -15.0)
    crop = Warp(m, photo.shape, 40, antialias=False).apply(photo.astype(np.float32))
    assert np.abs(crop - sample_like_scipy(photo.astype(np.float32), m, 40)).max() / 255 < 1e-4


def test_large_shrink_with_antialias_samples_the_block_means() -> None:
    """Shrink 3.3: average 3x3 blocks, then bilinear at M / 3 on the block grid."""
    rng = np.random.default_rng(11)
    photo = rng.uniform(0, 255, (202, 212, 3)).astype(np.float32)  # not multiples of 3: short edge blocks
    m = centred_similarity(40, (202, 212), 3.3, -15.0, shift=(20, 30))
    warp = Warp(m, photo.shape, 40)
    assert warp.factor == 3
    pad = ((0, 2), (0, 1))  # to 204 x 213 = 68 x 71 blocks of 3 x 3
    sums = np.pad(photo, (*pad, (0, 0))).reshape(68, 3, 71, 3, 3).sum(axis=(1, 3))
    counts = np.pad(np.ones(photo.shape[:2]), pad).reshape(68, 3, 71, 3).sum(axis=(1, 3))
    blocks = (sums / counts[:, :, None]).astype(np.float32)
    expected = sample_like_scipy(blocks, m / 3, 40)
    assert np.abs(warp.apply(photo) - expected).max() / 255 < 1e-4
    assert dot_product_gap(warp, rng) < 1e-5


def test_antialias_puts_gradient_on_every_face_pixel() -> None:
    """Plain bilinear at shrink 3.3 leaves most pixels of the footprint without any gradient."""
    m = centred_similarity(40, (300, 300), 3.3, 20.0)
    inner = feather_mask((300, 300), Warp(m, (300, 300), 40).footprint(inset=2.0), 0.0) > 0
    ones = np.ones((40, 40, 1), np.float32)
    smooth = Warp(m, (300, 300), 40).adjoint_photo(ones)[:, :, 0]
    dotted = Warp(m, (300, 300), 40, antialias=False).adjoint_photo(ones)[:, :, 0]
    assert (smooth[inner] > 0).all()
    assert (dotted[inner] == 0).mean() > 0.3
    # Both spread the same total weight: each crop pixel's weights sum to 1.
    np.testing.assert_allclose(smooth.sum(), 1600.0, rtol=1e-5)
    np.testing.assert_allclose(dotted.sum(), 1600.0, rtol=1e-5)


def test_out_of_bounds_samples_replicate_the_edge() -> None:
    photo = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    crop = Warp([[1, 0, -2], [0, 1, -2]], photo.shape, 3).apply(photo)
    # Crop rows/cols 0..1 fall left of/above the photo: they read row/column 0.
    np.testing.assert_array_equal(crop[:, :, 0], [[0, 0, 0], [0, 0, 0], [0, 0, 0]])
    crop = Warp([[1, 0, 2], [0, 1, 1]], photo.shape, 3).apply(photo)
    np.testing.assert_array_equal(crop[:, :, 0], [[6, 7, 7], [10, 11, 11], [10, 11, 11]])


def test_region_api_equals_full_photo_api() -> None:
    rng = np.random.default_rng(6)
    photo = rng.uniform(0, 255, (200, 300, 3)).astype(np.float32)
    warp = Warp(centred_similarity(28, (200, 300), 0.9, 40.0, shift=(60, 10)), photo.shape, 28)
    np.testing.assert_array_equal(warp.apply_region(photo[warp.box.slices]), warp.apply(photo))
    g = rng.standard_normal((28, 28, 3)).astype(np.float32)
    full = warp.adjoint_photo(g)
    np.testing.assert_array_equal(full[warp.box.slices], warp.adjoint(g))
    outside = np.ones(photo.shape[:2], bool)
    outside[warp.box.slices] = False
    assert not full[outside].any()
    assert warp.box.height < 60 and warp.box.width < 60


def test_batch_stacks_crops_and_sums_adjoints() -> None:
    rng = np.random.default_rng(7)
    photo = rng.uniform(0, 255, (90, 120, 3)).astype(np.float32)
    matrices = np.stack(
        [
            centred_similarity(16, (90, 120), 1.5, 10.0, shift=(-30, -10)),
            centred_similarity(16, (90, 120), 1.0, -25.0, shift=(25, 15)),
            centred_similarity(16, (90, 120), 2.0, 5.0, shift=(-20, 0)),  # overlaps the first
        ]
    )
    batch = WarpBatch.from_matrices(matrices, photo.shape, 16)
    crops = batch.apply(photo)
    assert crops.shape == (3, 16, 16, 3)
    for warp, crop in zip(batch.warps, crops, strict=True):
        np.testing.assert_array_equal(crop, warp.apply(photo))
    g = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    expected = sum(w.adjoint_photo(gi) for w, gi in zip(batch.warps, g, strict=True))
    full = np.zeros_like(photo)
    full[batch.box.slices] = batch.adjoint(g)
    np.testing.assert_allclose(full, expected, rtol=1e-6, atol=1e-6)


def test_invalid_inputs_raise_input_errors() -> None:
    with pytest.raises(InputError, match="2x3"):
        Warp(np.eye(3), (10, 10), 4)
    with pytest.raises(InputError, match="non-finite"):
        Warp([[np.nan, 0, 0], [0, 1, 0]], (10, 10), 4)
    with pytest.raises(InputError, match="crop size"):
        Warp([[1, 0, 0], [0, 1, 0]], (10, 10), 0)
    warp = Warp([[1, 0, 0], [0, 1, 0]], (10, 10), 4)
    with pytest.raises(InputError, match=r"photo of shape \[10, 10, C\]"):
        warp.apply(np.zeros((9, 10, 3), np.float32))
    with pytest.raises(InputError, match="crop gradient"):
        warp.adjoint(np.zeros((5, 5, 3), np.float32))
    with pytest.raises(InputError, match="singular"):
        invert_affine([[1, 2, 0], [2, 4, 0]])


def test_invert_affine_round_trips() -> None:
    m = similarity(1.7, 33.0, 12.0, -4.0)
    pts = np.random.default_rng(8).uniform(-50, 50, (10, 2))
    np.testing.assert_allclose(apply_affine(invert_affine(m), apply_affine(m, pts)), pts, atol=1e-9)


def test_speed_224_crop_from_12_megapixel_photo() -> None:
    """Prints the time of one forward + adjoint; the target (well under 50 ms) is not asserted."""
    photo = np.zeros((3000, 4000, 3), np.float32)
    photo[1000:2000, 1500:2500] = np.random.default_rng(9).uniform(0, 255, (1000, 1000, 3))
    m = centred_similarity(224, (3000, 4000), 600 / 224, 12.0)
    start = time.perf_counter()
    warp = Warp(m, photo.shape, 224)
    built = time.perf_counter()
    g = np.ones((224, 224, 3), np.float32)
    runs = 5
    for _ in range(runs):
        warp.adjoint(g + warp.apply(photo))
    each = (time.perf_counter() - built) / runs
    print(
        f"\nwarp 224 from 4000x3000 (box {warp.box.height}x{warp.box.width}): "
        f"build {1e3 * (built - start):.1f} ms, forward + adjoint {1e3 * each:.1f} ms"
    )
    assert warp.box.height < 1000 and warp.box.width < 1000


def test_feather_mask_profile_across_an_edge() -> None:
    box = Box(20, 10, 80, 70)
    mask = feather_mask((100, 100), box, feather_px=8.0)
    assert mask.dtype == np.float32 and mask.shape == (100, 100)
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert mask[50, 40] == 1.0  # deep inside
    assert not mask[:20].any() and not mask[80:].any() and not mask[:, :10].any() and not mask[:, 70:].any()
    row = mask[50, 10:30]
    assert np.all(np.diff(row) >= 0) and 0 < row[0] < 0.05 and row[-1] == 1.0
    # Smoothstep at depth 4 of 8: exactly one half.
    np.testing.assert_allclose(feather_mask((100, 100), box, 8.0, grow_px=0.5)[50, 13], 0.5, atol=1e-6)


def test_feather_mask_grow_hard_edge_and_within() -> None:
    polygon = np.array([[50.0, 10.0], [90.0, 50.0], [50.0, 90.0], [10.0, 50.0]])  # a diamond
    full = feather_mask((100, 120, 3), polygon, 6.0, grow_px=3.0)
    within = Box(5, 8, 95, 60)
    part = feather_mask((100, 120), polygon[::-1], 6.0, grow_px=3.0, within=within)
    np.testing.assert_array_equal(part, full[within.slices])
    hard = feather_mask((100, 100), box_polygon(Box(10, 10, 20, 30)), 0.0)
    assert hard.sum() == 10 * 20 and set(np.unique(hard)) == {0.0, 1.0}
    shrunk = feather_mask((100, 100), Box(10, 10, 20, 30), 0.0, grow_px=-2.0)
    assert shrunk.sum() == 6 * 16


def test_feather_mask_on_a_warp_footprint() -> None:
    warp = Warp(centred_similarity(50, (200, 200), 2.0, 30.0), (200, 200), 50)
    mask = feather_mask((200, 200), warp.footprint(), 10.0, within=warp.box)
    assert mask.shape == (warp.box.height, warp.box.width)
    area = float((feather_mask((200, 200), warp.footprint(), 0.0) > 0).sum())
    assert abs(area - 100.0 * 100.0) < 0.02 * 100 * 100  # the footprint is a 100 x 100 square


def test_feather_mask_rejects_bad_regions() -> None:
    with pytest.raises(InputError, match="convex"):
        feather_mask((50, 50), [[0, 0], [40, 0], [10, 10], [0, 40]], 2.0)
    with pytest.raises(InputError, match="zero area"):
        feather_mask((50, 50), [[0, 0], [10, 10], [20, 20]], 2.0)
    with pytest.raises(InputError, match="feather_px"):
        feather_mask((50, 50), Box(0, 0, 10, 10), -1.0)
