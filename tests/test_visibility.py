"""The visibility figures: answers known in advance (identical images, published CIEDE2000 pairs, the
JPEG ladder's order) and NVIDIA's reference FLIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from skimage import color, data

from uncnn_rt.runtime import visibility
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.geometry.warp import Box


def portrait(size: int = 200) -> NDArray[np.uint8]:
    """The astronaut's face (a PNG that scikit-image ships: no JPEG history)."""
    return np.ascontiguousarray(
        data.astronaut()[20:320, 130:430][:: 300 // size, :: 300 // size][:size, :size]
    )


def noisy(rgb: NDArray[np.uint8], amplitude: int, *, grey: bool, seed: int = 0) -> NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    shape = rgb.shape[:2] + ((1,) if grey else (3,))
    return np.clip(rgb.astype(int) + rng.integers(-amplitude, amplitude + 1, shape), 0, 255).astype(np.uint8)


def test_identical_images_are_invisible() -> None:
    rgb = portrait()
    figures = visibility.measure(rgb, rgb.copy())
    assert (figures.flip, figures.ciede2000_mean, figures.ciede2000_p95, figures.ssim) == (0.0, 0.0, 0.0, 1.0)
    assert math.isinf(figures.psnr)
    assert visibility.flip(rgb, rgb) == 0.0
    assert figures.over_jnd == 0.0
    assert visibility.photo_figures(rgb, rgb, ssim=1.0, psnr=math.inf) == visibility.IDENTICAL


# Sharma, Wu and Dalal (2005), Table 1: pairs chosen to exercise every branch of the formula (the hue
# wrap-around of pairs 9-13 included), with their published differences.
SHARMA_PAIRS = [
    ((50, 2.6772, -79.7751), (50, 0, -82.7485), 2.0425),
    ((50, 3.1571, -77.2803), (50, 0, -82.7485), 2.8615),
    ((50, -1.3802, -84.2814), (50, 0, -82.7485), 1.0000),
    ((50, 0, 0), (50, -1, 2), 2.3669),
    ((50, 2.49, -0.001), (50, -2.49, 0.0009), 7.1792),
    ((50, 2.49, -0.001), (50, -2.49, 0.0011), 7.2195),
    ((50, -0.001, 2.49), (50, 0.0009, -2.49), 4.8045),
    ((50, 2.5, 0), (73, 25, -18), 27.1492),
    ((50, 2.5, 0), (61, -5, 29), 22.8977),
    ((50, 2.5, 0), (56, -27, -3), 31.9030),
    ((50, 2.5, 0), (58, 24, 15), 19.4535),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
]


def test_ciede2000_reproduces_the_published_pairs() -> None:
    a = np.array([p[0] for p in SHARMA_PAIRS], float)
    b = np.array([p[1] for p in SHARMA_PAIRS], float)
    expected = np.array([p[2] for p in SHARMA_PAIRS])
    np.testing.assert_allclose(visibility.ciede2000(a, b), expected, atol=1e-4)
    np.testing.assert_allclose(visibility.ciede2000(b, a), expected, atol=1e-4)  # symmetric


def test_lab_matches_scikit_image() -> None:
    rgb = portrait(100)
    np.testing.assert_allclose(visibility.srgb_to_lab(rgb), color.rgb2lab(rgb), atol=0.02)


@pytest.mark.parametrize(
    "make",
    [
        lambda rgb: noisy(rgb, 6, grey=False),
        lambda rgb: noisy(rgb, 6, grey=True),
        lambda rgb: visibility.jpeg_ladder(rgb, (75,))[75],
        lambda rgb: np.clip(rgb + 8 * np.sin(np.arange(rgb.shape[1]) / 6)[None, :, None], 0, 255).astype(
            np.uint8
        ),
    ],
    ids=["colour noise", "grey noise", "jpeg75", "smooth stripes"],
)
def test_flip_matches_nvidias_reference(make: object) -> None:
    flip_evaluator = pytest.importorskip("flip_evaluator", reason="the [flip] extra (NVIDIA's reference)")
    assert flip_evaluator is not None
    rgb = portrait(120)
    test = make(rgb)  # type: ignore[operator]
    ours = visibility.flip(rgb, test)
    reference = visibility.reference_flip(rgb, test)
    assert ours > 0.005
    assert ours == pytest.approx(reference, rel=2e-3)


def test_strided_flip_estimates_the_mean() -> None:
    rgb = portrait(200)
    test = noisy(rgb, 5, grey=True)
    exact = visibility.FlipReference(rgb).mean(test)
    for stride in (2, 3, 4):
        assert visibility.FlipReference(rgb, stride=stride).mean(test) == pytest.approx(exact, rel=0.03)
    with pytest.raises(InputError, match="stride"):
        visibility.FlipReference(rgb, stride=0)


def test_one_originals_difference_serves_many_tests_with_the_same_figures() -> None:
    rgb = portrait(120)
    for stride in (1, 3):
        against = visibility.ColourDifference(rgb, stride=stride)
        assert against(rgb.copy()) == (0.0, 0.0)
        for amount in (2, 9, 4):
            test = noisy(rgb, amount, grey=False)
            assert against(test) == visibility.colour_difference(rgb, test, stride=stride)


def test_flip_and_ciede2000_grow_with_the_change() -> None:
    rgb = portrait(120)
    flips = [visibility.flip(rgb, noisy(rgb, a, grey=True)) for a in (1, 3, 6, 12)]
    des = [visibility.measure(rgb, noisy(rgb, a, grey=True)).ciede2000_mean for a in (1, 3, 6, 12)]
    assert flips == sorted(flips) and des == sorted(des) and flips[0] > 0


def test_jpeg_ladder_is_monotone() -> None:
    rgb = portrait(200)
    ladder = visibility.jpeg_ladder(rgb)
    figures = {q: visibility.measure(rgb, img) for q, img in ladder.items()}
    assert list(figures) == [95, 85, 75]
    for finer, coarser in ((95, 85), (85, 75)):
        assert figures[finer].flip < figures[coarser].flip
        assert figures[finer].ciede2000_mean < figures[coarser].ciede2000_mean
        assert figures[finer].ssim > figures[coarser].ssim
        assert figures[finer].psnr > figures[coarser].psnr


def test_region_ladder_equals_the_whole_photos_reencode_on_the_region() -> None:
    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((320, 320)))
    region = Box(40, 72, 200, 230)
    local = visibility.region_ladder(rgb, region, (75,))[75]
    whole = visibility.measure(rgb[region.slices], visibility.jpeg_ladder(rgb, (75,))[75][region.slices])
    assert local.flip == pytest.approx(whole.flip, rel=0.02)
    assert local.ciede2000_mean == pytest.approx(whole.ciede2000_mean, rel=0.02)


def test_envelope_makes_a_dipping_ladder_monotone() -> None:
    v = visibility.Visibility
    ladder = {
        95: v(0.02, 0.4, 1.0, 0.99, 45.0),
        85: v(0.001, 0.01, 0.1, 0.999, 60.0),
        75: v(0.04, 1.2, 3, 0.97, 38),
    }
    env = visibility.envelope(ladder)
    assert env[85].flip == 0.02 and env[85].ciede2000_mean == 0.4 and env[85].psnr == 45.0
    assert env[75] == ladder[75] and env[95] == ladder[95]


def test_photo_figures_equal_the_whole_photo_computation() -> None:
    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((256, 256)))
    test = rgb.copy()
    test[100:140, 90:150] = noisy(rgb[100:140, 90:150], 30, grey=True)  # past this textured patch's JND
    got = visibility.photo_figures(rgb, test, ssim=0.5, psnr=30.0)
    de = visibility.ciede2000(visibility.srgb_to_lab(rgb), visibility.srgb_to_lab(test))
    assert got.flip == pytest.approx(visibility.flip(rgb, test), rel=1e-5)
    assert got.ciede2000_mean == pytest.approx(float(de.mean()), rel=1e-9)
    assert got.ciede2000_p95 == pytest.approx(float(np.percentile(de, 95)), abs=1e-9)
    assert got.over_jnd == visibility.over_jnd(rgb, test) > 0
    assert (got.ssim, got.psnr) == (0.5, 30.0)
    # A change everywhere (a lossy save), in bands of 8 rows: the same figures as on the whole photo.
    saved = noisy(rgb, 2, grey=False)
    whole = visibility.photo_figures(rgb, saved, ssim=0.5, psnr=30.0)
    banded = visibility.photo_figures(rgb, saved, ssim=0.5, psnr=30.0, band_pixels=8 * 256)
    assert banded.flip == pytest.approx(whole.flip, rel=1e-6)
    assert whole.flip == pytest.approx(visibility.flip(rgb, saved), rel=1e-5)
    assert banded.ciede2000_mean == pytest.approx(whole.ciede2000_mean, rel=1e-12)
    assert banded.ciede2000_p95 == whole.ciede2000_p95
    # The JND reads a few rows around each pixel: every band reads them too.
    loud = noisy(rgb, 20, grey=True)
    whole = visibility.photo_figures(rgb, loud, ssim=0.5, psnr=30.0)
    banded = visibility.photo_figures(rgb, loud, ssim=0.5, psnr=30.0, band_pixels=8 * 256)
    assert banded.over_jnd == whole.over_jnd == visibility.over_jnd(rgb, loud) > 0


def test_face_region_grows_the_box_and_stays_in_the_photo() -> None:
    assert visibility.face_region((40, 50, 80, 110), (200, 300)) == Box(35, 25, 125, 95)
    assert visibility.face_region((0, 0, 40, 40), (50, 50)) == Box(0, 0, 50, 50)
    with pytest.raises(InputError, match="outside"):
        visibility.face_region((400, 400, 420, 420), (100, 100))


def test_luminance_jnd_follows_adaptation_and_masking() -> None:
    flat_mid = np.full((32, 32, 3), 128, np.uint8)
    flat_dark = np.full((32, 32, 3), 20, np.uint8)
    rng = np.random.default_rng(0)
    texture = np.clip(128 + rng.normal(0, 30, (32, 32, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)
    mid, dark, busy = (float(np.median(visibility.luminance_jnd(x))) for x in (flat_mid, flat_dark, texture))
    assert mid == pytest.approx(3.0, abs=0.1)  # Chou and Li's floor at mid-grey
    assert dark > 2 * mid  # luminance adaptation: dark areas hide more
    assert busy > 2 * mid  # texture masking
    # Without the rise towards black, a flat dark patch hides no more than mid grey; texture still does.
    flat = float(np.median(visibility.luminance_jnd(flat_dark, dark=0)))
    assert flat == pytest.approx(mid, abs=0.1)
    assert float(np.median(visibility.luminance_jnd(texture, dark=0))) > 2 * mid


def test_visibility_inputs_are_checked() -> None:
    with pytest.raises(InputError, match="one shape"):
        visibility.measure(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(InputError, match="RGB"):
        visibility.FlipReference(np.zeros((8, 8), np.uint8))


def test_jpeg_equivalent_is_the_finest_reencode_the_cloak_stays_within() -> None:
    v = visibility.Visibility
    ladder = {
        95: v(0.016, 0.46, 1.6, 0.99, 49.0),
        85: v(0.033, 1.06, 2.7, 0.98, 41.0),
        75: v(0.046, 1.5, 3.5, 0.96, 38),
    }
    assert visibility.RegionReport(v(0.03, 0.7, 1.9, 0.98, 42.0), ladder).jpeg_equivalent() == 85
    assert visibility.RegionReport(v(0.04, 0.9, 2.5, 0.96, 38.0), ladder).jpeg_equivalent() == 75
    assert visibility.RegionReport(v(0.07, 1.8, 5.8, 0.85, 30.0), ladder).jpeg_equivalent() is None


def test_over_jnd_counts_streaks_that_the_means_forgive() -> None:
    """A faint change everywhere and the same total change on a few rows of the face: the means (FLIP,
    CIEDE2000) rank them close, the share over twice the JND tells them apart."""
    rgb = portrait()
    jnd = visibility.luminance_jnd(rgb)
    spread = np.clip(rgb + np.round(0.5 * jnd)[..., None], 0, 255).astype(np.uint8)
    rows = np.zeros(rgb.shape[:2], bool)
    rows[::8] = True  # one row in eight carries eight times the change: streaks
    streaks = np.clip(rgb + np.round(4 * jnd * rows)[..., None], 0, 255).astype(np.uint8)
    faint, streaked = visibility.measure(rgb, spread), visibility.measure(rgb, streaks)
    # The means: 1.08 against 1.14 (CIEDE2000), 0.088 against 0.104 (FLIP).
    assert streaked.ciede2000_mean < 1.2 * faint.ciede2000_mean
    assert streaked.flip < 1.4 * faint.flip
    assert faint.over_jnd == 0.0  # half a JND changes no pixel past two
    # About one pixel in eight (rows clipped at white or black count less).
    assert 0.08 < streaked.over_jnd <= 0.126
