"""What people see: colour differences between two photos, measured as people compare them.

Four measures, each of an 8-bit sRGB photo ``[H, W, 3]`` against its original:

* **FLIP** (Andersson et al., "FLIP: A Difference Evaluator for Alternating Images", HPG 2020), the
  mean of a per-pixel error in [0, 1] for an observer who flips between the two images at
  :data:`FLIP_PPD` pixels per degree. :func:`flip_map` is this project's own numpy implementation of
  LDR-FLIP (float32, separable filters; with a stride it estimates the mean from a grid of pixels,
  for searches);
  ``tests/test_visibility.py`` checks it against NVIDIA's ``flip-evaluator`` (PyPI, the ``[flip]``
  extra), which :func:`reference_flip` calls. In short: both images go to the opponent space YCxCz,
  each channel is filtered by its contrast-sensitivity function (what the eye cannot resolve at that
  distance is gone), the results are compared in Hunt-adjusted L*a*b* with the HyAB distance and
  remapped to [0, 1] (the colour error ``e_c``), and edges and points found on the luminance are
  compared (the feature error ``e_f``); the pixel's error is ``e_c ^ (1 - e_f)``.
* **CIEDE2000** (Sharma, Wu and Dalal, Color Res. Appl. 2005), per pixel in CIELAB (D65); about 2.3 is
  one just-noticeable difference. Reported as the mean and the 95th percentile.
* **Over JND**: the share of pixels whose luminance changes by more than :data:`OVER_JND_FACTOR` times
  its just-noticeable difference (:func:`luminance_jnd`), a change a person can see when looking there.
  FLIP and CIEDE2000 pool by the mean, so a change concentrated on a few features can score as low as
  a JPEG re-encode's faint change everywhere while showing as streaks; this figure counts the streaks.
* **SSIM** and **PSNR** (:mod:`.image_ops`), for comparison with published work.

Every figure is taken on a *face region* (:func:`face_region`: the face box grown by a quarter of its
side on each side) and on the whole photo, next to the same photo's own JPEG q95/q85/q75 re-encodes
(:func:`jpeg_ladder`), so that a cloak reads as a "JPEG equivalent".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import image_ops
from uncnn_rt.runtime.arrays import Float32Array, Float64Array, Uint8Array
from uncnn_rt.runtime.errors import InputError, MissingExtraError
from uncnn_rt.runtime.geometry.warp import Box

FLIP_PPD: Final = 67.0
"""Pixels per degree of visual angle: FLIP's default (a 0.7 m wide 4K monitor seen from 0.7 m)."""
JPEG_LADDER: Final = (95, 85, 75)
"""The re-encodes every visibility figure is compared with."""
FACE_MARGIN: Final = 0.25
"""A face region is the detector's face box grown by this share of its longer side on each side."""
JND_CIEDE2000: Final = 2.3
"""About one just-noticeable difference in CIEDE2000 units (Sharma's review; Mahy et al. 1994)."""
OVER_JND_FACTOR: Final = 2.0
"""A pixel counts in :attr:`Visibility.over_jnd` when its luminance changes by more than this many times
its just-noticeable difference: well past the threshold of detection, not a borderline one."""

# D65 white and the sRGB primaries (IEC 61966-2-1), as CIELAB and FLIP use them.
_WHITE: Final = np.array([0.950428545, 1.0, 1.088900371])
_RGB_TO_XYZ: Final = np.array(
    [
        [10135552 / 24577794, 8788810 / 24577794, 4435075 / 24577794],
        [2613072 / 12288897, 8788810 / 12288897, 887015 / 12288897],
        [1425312 / 73733382, 8788810 / 73733382, 70074185 / 73733382],
    ]
)
_XYZ_TO_RGB: Final = np.linalg.inv(_RGB_TO_XYZ)


class MissingFlipError(MissingExtraError):
    """NVIDIA's ``flip-evaluator`` is needed (only for the reference figure) and not installed."""


@cache
def _linear_lut() -> Float32Array:
    """sRGB code value 0..255 -> linear light in [0, 1] (the sRGB transfer function)."""
    v = np.arange(256, dtype=np.float64) / 255.0
    return np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92).astype(np.float32)


def srgb_to_linear(rgb: NDArray[np.generic]) -> Float32Array:
    """Linear RGB in [0, 1] of 8-bit sRGB values (a table look-up; float input is rounded)."""
    codes = np.asarray(rgb)
    if codes.dtype != np.uint8:
        codes = np.clip(np.rint(codes), 0, 255).astype(np.uint8)
    return _linear_lut()[codes]


def _lab_f(t: NDArray[np.floating]) -> NDArray[np.floating]:
    delta = 6.0 / 29.0
    return np.where(t > delta**3, np.cbrt(np.maximum(t, delta**3)), t / (3 * delta * delta) + 4.0 / 29.0)


def linear_to_lab(linear: NDArray[np.floating]) -> NDArray[np.floating]:
    """CIELAB (D65) of linear RGB ``[..., 3]``; keeps the input's float precision."""
    dtype = linear.dtype if linear.dtype in (np.float32, np.float64) else np.float64
    xyz = linear.astype(dtype) @ (_RGB_TO_XYZ.T / _WHITE[None, :]).astype(dtype)
    f = _lab_f(xyz)
    lab = np.empty_like(f)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def srgb_to_lab(rgb: NDArray[np.generic]) -> Float64Array:
    """CIELAB (D65) of 8-bit sRGB pixels ``[..., 3]`` (0..255), float64."""
    return np.asarray(linear_to_lab(srgb_to_linear(rgb).astype(np.float64)), dtype=np.float64)


def ciede2000(lab1: NDArray[np.floating], lab2: NDArray[np.floating]) -> NDArray[np.floating]:
    """Per-pixel CIEDE2000 colour difference of two CIELAB arrays ``[..., 3]`` (kL = kC = kH = 1).

    The formulas and their conventions (hue of an achromatic colour is 0; the mean hue of a pair
    whose hues are more than 180 degrees apart wraps) are those of Sharma, Wu and Dalal (2005), whose
    test pairs ``tests/test_visibility.py`` reproduces to 1e-4.
    """
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    c7 = c_mean**7
    g = 0.5 * (1 - np.sqrt(c7 / (c7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chromatic = (c1p * c2p) != 0
    dhp = h2p - h1p
    dhp = np.where(dhp > 180, dhp - 360, np.where(dhp < -180, dhp + 360, dhp))
    dhp = np.where(chromatic, dhp, 0.0)
    d_l = l2 - l1
    d_c = c2p - c1p
    d_h = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dhp) / 2)
    l_mean = (l1 + l2) / 2
    cp_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(
        np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2)
    )
    h_mean = np.where(chromatic, h_mean, h_sum)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_mean - 30))
        + 0.24 * np.cos(np.radians(2 * h_mean))
        + 0.32 * np.cos(np.radians(3 * h_mean + 6))
        - 0.20 * np.cos(np.radians(4 * h_mean - 63))
    )
    d_theta = 30 * np.exp(-(((h_mean - 275) / 25) ** 2))
    cp7 = cp_mean**7
    r_c = 2 * np.sqrt(cp7 / (cp7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    tl, tc, th = d_l / s_l, d_c / s_c, d_h / s_h
    return np.asarray(np.sqrt(np.maximum(tl * tl + tc * tc + th * th + r_t * tc * th, 0.0)))


# ---------------------------------------------------------------------------------------------------
# FLIP


def _gaussian(radius: int, variance_deg2: float, ppd: float) -> Float64Array:
    """The 1-D factor of the CSF Gaussian ``exp(-pi^2 x^2 / b)`` on pixel offsets -radius..radius."""
    x = np.arange(-radius, radius + 1) / ppd
    return np.asarray(np.exp(-(math.pi**2) * x * x / variance_deg2), dtype=np.float64)


@dataclass(frozen=True)
class _FlipKernels:
    """Separable kernels of LDR-FLIP at one pixels-per-degree: each CSF is a sum of products of 1-D
    Gaussians (A and RG one term, BY two), normalised as the 2-D filter is; edges and points are the
    first and second derivative of a Gaussian along one axis times the Gaussian along the other."""

    radius: int
    csf: tuple[tuple[tuple[float, Float32Array], ...], ...]
    """Per channel (A, RG, BY): terms ``(weight, g)`` whose 2-D filter is ``sum weight * g g^T``."""
    feature_radius: int
    gauss: Float32Array
    edge: Float32Array
    point: Float32Array


@cache
def _flip_kernels(ppd: float) -> _FlipKernels:
    # (a1, b1, a2, b2) of the achromatic, red-green and blue-yellow CSFs (FLIP paper, Table 1).
    params = ((1.0, 0.0047, 0.0, 1e-5), (1.0, 0.0053, 0.0, 1e-5), (34.1, 0.04, 13.5, 0.025))
    widest = max(b for p in params for b in (p[1], p[3]))
    radius = math.ceil(3 * math.sqrt(widest / (2 * math.pi**2)) * ppd)
    csf = []
    for a1, b1, a2, b2 in params:
        terms = [
            (a * math.sqrt(math.pi / b), _gaussian(radius, b, ppd)) for a, b in ((a1, b1), (a2, b2)) if a
        ]
        total = sum(w * float(g.sum()) ** 2 for w, g in terms)
        csf.append(tuple((w / total, g.astype(np.float32)) for w, g in terms))
    sd = 0.5 * 0.082 * ppd  # half the peak-to-trough width (0.082 degrees) of the eye's edge detector
    fr = math.ceil(3 * sd)
    x = np.arange(-fr, fr + 1, dtype=np.float64)
    gauss = np.exp(-x * x / (2 * sd * sd))
    edge = -x * gauss
    point = (x * x / (sd * sd) - 1) * gauss
    # The 2-D filters have their positive weights normalised to sum to 1 and negative ones to -1; in
    # the separable form that is the 1-D derivative's parts over (their sum times the Gaussian's).
    edge = np.where(edge < 0, edge / -edge[edge < 0].sum(), edge / edge[edge > 0].sum()) / gauss.sum()
    point = np.where(point < 0, point / -point[point < 0].sum(), point / point[point > 0].sum()) / gauss.sum()
    return _FlipKernels(
        radius,
        tuple(csf),
        fr,
        gauss.astype(np.float32),
        edge.astype(np.float32),
        point.astype(np.float32),
    )


def _correlate(image: Float32Array, kernel: Float32Array, axis: int, stride: int = 1) -> Float32Array:
    """``image`` ``[H, W, ...]`` correlated with a 1-D kernel along ``axis`` (0 or 1), edges replicated,
    evaluated at every ``stride``-th position along that axis."""
    r = (kernel.shape[0] - 1) // 2
    pad = [(0, 0)] * image.ndim
    pad[axis] = (r, r)
    padded = np.pad(image, pad, mode="edge")
    n = image.shape[axis]
    shape = list(image.shape)
    shape[axis] = -(-n // stride)
    out = np.zeros(shape, np.float32)
    for k, weight in enumerate(kernel):
        piece = padded[k : k + n : stride] if axis == 0 else padded[:, k : k + n : stride]
        out += np.float32(weight) * piece
    return out


def _separable(image: Float32Array, rows: Float32Array, cols: Float32Array, stride: int = 1) -> Float32Array:
    return _correlate(_correlate(image, rows, 0, stride), cols, 1, stride)


def _ycxcz(linear: Float32Array, *, offset: bool = True) -> Float32Array:
    """The opponent space of FLIP: CIELAB without its cube root, affine in linear RGB (``offset``
    False: its linear part, for differences)."""
    xyz = linear @ (_RGB_TO_XYZ.T / _WHITE[None, :]).astype(np.float32)
    out = np.empty_like(xyz)
    out[..., 0] = 116 * xyz[..., 1] - (16 if offset else 0)
    out[..., 1] = 500 * (xyz[..., 0] - xyz[..., 1])
    out[..., 2] = 200 * (xyz[..., 1] - xyz[..., 2])
    return np.asarray(out, dtype=np.float32)


def _ycxcz_to_linear(opp: Float32Array) -> Float32Array:
    y = (opp[..., 0] + 16) / 116
    xyz = np.stack([y + opp[..., 1] / 500, y, y - opp[..., 2] / 200], axis=-1) * _WHITE.astype(np.float32)
    return np.asarray(xyz @ _XYZ_TO_RGB.T.astype(np.float32), dtype=np.float32)


def _hunt_lab(linear: Float32Array) -> Float32Array:
    lab = linear_to_lab(np.clip(linear, 0.0, 1.0)).astype(np.float32)
    lab[..., 1:] *= 0.01 * lab[..., :1]
    return lab


@cache
def _cmax() -> float:
    """FLIP's largest colour error: HyAB between pure green and pure blue, to the power 0.7."""
    green, blue = _hunt_lab(np.array([[0, 1, 0]], np.float32)), _hunt_lab(np.array([[0, 0, 1]], np.float32))
    d = green - blue
    return float((abs(d[0, 0]) + math.hypot(d[0, 1], d[0, 2])) ** 0.7)


class FlipReference:
    """LDR-FLIP against one fixed reference image, for many test images of the same size.

    The reference's filtered opponent image and features are computed once; the filtering is linear
    before the clamp to the RGB cube, so each test image needs only its difference filtered. With
    ``stride`` > 1 the error is evaluated on every ``stride``-th row and column only (the filters still
    read every pixel), an estimate of the mean at about ``1 / stride`` of the cost, for searches.
    """

    def __init__(self, reference: NDArray[np.generic], ppd: float = FLIP_PPD, *, stride: int = 1) -> None:
        ref = np.asarray(reference)
        if ref.ndim != 3 or ref.shape[2] != 3:
            raise InputError(f"FLIP needs an RGB image [H, W, 3], got {list(ref.shape)}")
        if stride < 1:
            raise InputError(f"FLIP stride must be >= 1, got {stride}")
        self.shape, self.stride = ref.shape, stride
        self.kernels = _flip_kernels(float(ppd))
        self.linear = srgb_to_linear(ref)
        opp = _ycxcz(self.linear)
        self._filtered = self._csf(opp)
        self._lab = _hunt_lab(_ycxcz_to_linear(self._filtered))
        self._y = np.asarray((opp[..., 0] + 16) / 116, dtype=np.float32)
        self._edges, self._points = self._features(self._y)

    def _csf(self, opp: Float32Array) -> Float32Array:
        s = self.stride
        out = np.empty((-(-opp.shape[0] // s), -(-opp.shape[1] // s), 3), np.float32)
        for c, terms in enumerate(self.kernels.csf):
            out[..., c] = sum(w * _separable(opp[..., c], g, g, s) for w, g in terms)
        return out

    def _features(self, y: Float32Array) -> tuple[Float32Array, Float32Array]:
        k, s = self.kernels, self.stride
        edges = np.hypot(_separable(y, k.gauss, k.edge, s), _separable(y, k.edge, k.gauss, s))
        points = np.hypot(_separable(y, k.gauss, k.point, s), _separable(y, k.point, k.gauss, s))
        return edges, points

    def error_map(self, test: NDArray[np.generic]) -> Float32Array:
        """Per-pixel FLIP error ``[H, W]`` in [0, 1] of ``test`` (8-bit sRGB, the reference's shape);
        with a stride, on every ``stride``-th row and column."""
        t = np.asarray(test)
        if t.shape != self.shape:
            raise InputError(f"FLIP needs images of one shape, got {list(self.shape)} and {list(t.shape)}")
        d_opp = _ycxcz(srgb_to_linear(t) - self.linear, offset=False)
        lab = _hunt_lab(_ycxcz_to_linear(self._filtered + self._csf(d_opp)))
        diff = self._lab - lab
        hyab = np.abs(diff[..., 0]) + np.hypot(diff[..., 1], diff[..., 2])
        cmax = _cmax()
        power = hyab**0.7
        pc, pt = 0.4, 0.95
        colour = np.where(
            power < pc * cmax,
            power * (pt / (pc * cmax)),
            pt + (power - pc * cmax) / (cmax - pc * cmax) * (1 - pt),
        )
        edges, points = self._features(np.asarray(self._y + d_opp[..., 0] / 116, dtype=np.float32))
        feature = np.maximum(np.abs(edges - self._edges), np.abs(points - self._points))
        feature = np.sqrt(feature / math.sqrt(2))
        return np.asarray(colour ** (1 - feature), dtype=np.float32)

    def mean(self, test: NDArray[np.generic]) -> float:
        return float(self.error_map(test).mean(dtype=np.float64))


def flip_map(
    reference: NDArray[np.generic], test: NDArray[np.generic], ppd: float = FLIP_PPD
) -> Float32Array:
    """Per-pixel LDR-FLIP error ``[H, W]`` of ``test`` against ``reference`` (8-bit sRGB ``[H, W, 3]``)."""
    return FlipReference(reference, ppd).error_map(test)


def flip(reference: NDArray[np.generic], test: NDArray[np.generic], ppd: float = FLIP_PPD) -> float:
    """Mean LDR-FLIP error of ``test`` against ``reference`` (0: identical; see the module docstring)."""
    return float(flip_map(reference, test, ppd).mean(dtype=np.float64))


def reference_flip(reference: NDArray[np.generic], test: NDArray[np.generic], ppd: float = FLIP_PPD) -> float:
    """Mean LDR-FLIP by NVIDIA's ``flip-evaluator`` (the ``[flip]`` extra), inputs 8-bit sRGB."""
    try:
        import flip_evaluator
    except ImportError as exc:
        raise MissingFlipError(
            "the reference FLIP needs NVIDIA's flip-evaluator, which the [flip] extra installs: "
            "pip install 'uncnn-rt[flip]'"
        ) from exc
    ref = np.ascontiguousarray(np.asarray(reference, np.float32) / 255.0)
    tst = np.ascontiguousarray(np.asarray(test, np.float32) / 255.0)
    _, mean, _ = flip_evaluator.evaluate(ref, tst, "LDR", applyMagma=False, parameters={"ppd": float(ppd)})
    return float(mean)


# ---------------------------------------------------------------------------------------------------
# figures of one image pair


@dataclass(frozen=True)
class Visibility:
    """How visible ``test`` is next to its original: FLIP mean, CIEDE2000 mean and 95th percentile,
    SSIM, PSNR (dB; ``inf`` for identical images) and the share of pixels changed past twice their
    luminance JND (:func:`over_jnd`; NaN where not measured, as in a cap)."""

    flip: float
    ciede2000_mean: float
    ciede2000_p95: float
    ssim: float
    psnr: float
    over_jnd: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "flip": round(self.flip, 5),
            "ciede2000_mean": round(self.ciede2000_mean, 4),
            "ciede2000_p95": round(self.ciede2000_p95, 4),
            "ssim": round(self.ssim, 5),
            "psnr": None if math.isinf(self.psnr) else round(self.psnr, 3),
            "over_jnd": None if math.isnan(self.over_jnd) else round(self.over_jnd, 5),
        }

    def within(self, cap: Visibility) -> bool:
        """Whether this meets ``cap`` on FLIP and on the CIEDE2000 mean (the two figures a mode caps)."""
        return self.flip <= cap.flip and self.ciede2000_mean <= cap.ciede2000_mean


IDENTICAL: Final = Visibility(0.0, 0.0, 0.0, 1.0, math.inf, 0.0)


def measure(original: NDArray[np.generic], test: NDArray[np.generic]) -> Visibility:
    """Every figure of ``test`` against ``original`` (8-bit sRGB ``[H, W, 3]`` of one shape)."""
    a, b = np.asarray(original), np.asarray(test)
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise InputError(
            f"visibility needs two RGB images [H, W, 3] of one shape, got {a.shape} and {b.shape}"
        )
    if np.array_equal(a, b):
        return IDENTICAL
    de = ciede2000(srgb_to_lab(a), srgb_to_lab(b))
    mse = float(np.mean(np.square(a.astype(np.float64) - b)))
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    ssim = float(image_ops.ssim(a[None], b[None])[0]) if min(a.shape[:2]) >= 11 else 1.0 - float(mse > 0)
    return Visibility(flip(a, b), float(de.mean()), float(np.percentile(de, 95)), ssim, psnr, over_jnd(a, b))


def _luma(rgb: NDArray[np.generic]) -> Float32Array:
    return np.asarray(np.asarray(rgb, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))


def over_jnd_map(original: NDArray[np.generic], test: NDArray[np.generic]) -> NDArray[np.bool_]:
    """``[H, W]``: where the luminance of ``test`` differs from ``original``'s by more than
    :data:`OVER_JND_FACTOR` times ``original``'s luminance JND (:func:`luminance_jnd`)."""
    change = np.abs(_luma(test) - _luma(original))
    return np.asarray(change > OVER_JND_FACTOR * luminance_jnd(original))


def over_jnd(original: NDArray[np.generic], test: NDArray[np.generic]) -> float:
    """The share of pixels of ``test`` changed past :data:`OVER_JND_FACTOR` times their luminance JND."""
    return float(np.mean(over_jnd_map(original, test)))


def colour_difference(
    original: NDArray[np.generic], test: NDArray[np.generic], *, stride: int = 1
) -> tuple[float, float]:
    """``(FLIP, CIEDE2000 mean)`` of ``test`` against ``original``; with ``stride`` > 1 estimated on every
    ``stride``-th row and column (FLIP's filters still read every pixel)."""
    return ColourDifference(original, stride=stride)(test)


class ColourDifference:
    """:func:`colour_difference` against one fixed original, whose FLIP filtering and CIELAB are computed
    once, on the first test that differs from it, for every later test."""

    def __init__(self, original: NDArray[np.generic], *, stride: int = 1) -> None:
        self.original, self.stride = np.asarray(original), stride
        self._flip: FlipReference | None = None
        self._lab: Float64Array | None = None

    def __call__(self, test: NDArray[np.generic]) -> tuple[float, float]:
        a, b, s = self.original, np.asarray(test), self.stride
        if np.array_equal(a, b):
            return 0.0, 0.0
        if self._lab is None:
            self._lab = srgb_to_lab(a[::s, ::s])
        de = ciede2000(self._lab, srgb_to_lab(b[::s, ::s]))
        if self._flip is None:
            self._flip = FlipReference(a, stride=s)
        return self._flip.mean(b), float(de.mean())


PHOTO_BAND_PIXELS: Final = 1_000_000
""":func:`photo_figures` computes FLIP in bands of rows of about this many pixels (each with its filters'
reach of rows on either side), so that a 12-megapixel photo needs the memory of a one-megapixel one."""


def photo_figures(
    original: NDArray[np.generic],
    test: NDArray[np.generic],
    *,
    ssim: float,
    psnr: float,
    band_pixels: int = PHOTO_BAND_PIXELS,
) -> Visibility:
    """The whole photo's figures, computed where the photos differ: FLIP's error is 0 farther than its
    filters reach from every changed pixel, so FLIP and CIEDE2000 are computed on the changed box grown
    by twice that reach and summed over the photo (``ssim`` and ``psnr`` of the whole photo are given,
    e.g. by :func:`uncnn_rt.runtime.visibility.image_quality`). A lossy save changes every pixel, so the box
    is often the whole photo: it is taken in bands of rows (``band_pixels``), each error row from the
    rows within its filters' reach, as on the whole box."""
    a, b = np.asarray(original), np.asarray(test)
    if a.shape != b.shape or a.ndim != 3:
        raise InputError(
            f"visibility needs two RGB images [H, W, 3] of one shape, got {a.shape} and {b.shape}"
        )
    diff = np.any(a != b, axis=2)
    rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
    if rows.size == 0:
        return IDENTICAL
    k = _flip_kernels(FLIP_PPD)
    reach = max(k.radius, k.feature_radius)
    height, width = a.shape[:2]

    def grown(lo: int, hi: int, by: int, size: int) -> tuple[int, int]:
        return max(0, lo - by), min(size, hi + by)

    (t0, b0), (l0, r0) = (
        grown(int(rows[0]), int(rows[-1]) + 1, 2 * reach, height),
        grown(int(cols[0]), int(cols[-1]) + 1, 2 * reach, width),
    )
    (t1, b1), (l1, r1) = (
        grown(int(rows[0]), int(rows[-1]) + 1, reach, height),
        grown(int(cols[0]), int(cols[-1]) + 1, reach, width),
    )
    rows_per_band = max(1, band_pixels // max(r0 - l0, 1))
    error_sum, de_sum, over, pieces = 0.0, 0.0, 0, []
    jnd_reach = JND_WINDOW  # the JND's box means and gradient read this far
    for start in range(t1, b1, rows_per_band):
        stop = min(b1, start + rows_per_band)
        lo, hi = max(t0, start - 2 * reach), min(b0, stop + 2 * reach)
        band = flip_map(a[lo:hi, l0:r0], b[lo:hi, l0:r0])[start - lo : stop - lo, l1 - l0 : r1 - l0]
        error_sum += float(band.sum(dtype=np.float64))
        de_band = ciede2000(srgb_to_lab(a[start:stop, l1:r1]), srgb_to_lab(b[start:stop, l1:r1])).ravel()
        de_sum += float(de_band.sum())
        top, left = max(0, start - jnd_reach), max(0, l1 - jnd_reach)
        seen = over_jnd_map(
            a[top : stop + jnd_reach, left : r1 + jnd_reach], b[top : stop + jnd_reach, left : r1 + jnd_reach]
        )
        over += int(seen[start - top : stop - top, l1 - left : r1 - left].sum())
        pieces.append(de_band.astype(np.float32))  # kept for the percentile, at half the memory
    de = np.concatenate(pieces)
    total = height * width
    # The 95th percentile over the photo: the box's values plus a zero for every pixel outside it.
    zeros = total - de.size
    rank = 0.95 * (total - 1) - zeros
    p95 = 0.0 if rank < 0 else float(np.quantile(de, rank / max(de.size - 1, 1)))
    return Visibility(error_sum / total, de_sum / total, p95, ssim, psnr, over / total)


def search_stride(height: int, width: int, pixels: int = 60_000) -> int:
    """The stride at which a ``height x width`` region is sampled by about ``pixels`` points."""
    return max(1, math.isqrt(height * width // pixels))


def face_region(box: Sequence[float], shape: Sequence[int], margin: float = FACE_MARGIN) -> Box:
    """The face box ``(x0, y0, x1, y1)`` grown by ``margin`` of its longer side on each side, in the photo."""
    x0, y0, x1, y1 = box
    grow = margin * max(x1 - x0, y1 - y0)
    height, width = int(shape[0]), int(shape[1])
    top, bottom = max(0, int(y0 - grow)), min(height, math.ceil(y1 + grow))
    left, right = max(0, int(x0 - grow)), min(width, math.ceil(x1 + grow))
    if bottom <= top or right <= left:
        raise InputError(f"face box {tuple(box)} lies outside the {width}x{height} photo")
    return Box(top, left, bottom, right)


def jpeg_ladder(rgb: Uint8Array, qualities: Sequence[int] = JPEG_LADDER) -> dict[int, Uint8Array]:
    """The photo re-encoded as JPEG at each quality (Pillow, 4:2:0 chroma as its default) and decoded."""
    return {q: image_ops.to_uint8(image_ops.jpeg(np.asarray(rgb)[None], q)[0]) for q in qualities}


def envelope(ladder: dict[int, Visibility]) -> dict[int, Visibility]:
    """The ladder made monotone: each quality's figures are the largest of it and every higher
    quality's. Re-encoding a JPEG at about its own quality is nearly lossless (the same quantisation
    tables give back the same coefficients), so a raw ladder of a JPEG photo can dip at one rung; a cap
    of "at most the q85 re-encode" means at most what q85 or any finer re-encode changes."""

    def worst(values: list[float], larger: bool) -> float:
        known = [v for v in values if not math.isnan(v)]
        return math.nan if not known else (max(known) if larger else min(known))

    out: dict[int, Visibility] = {}
    for q in sorted(ladder, reverse=True):
        rungs = [ladder[q], *out.values()]
        out[q] = Visibility(
            worst([r.flip for r in rungs], True),
            worst([r.ciede2000_mean for r in rungs], True),
            worst([r.ciede2000_p95 for r in rungs], True),
            worst([r.ssim for r in rungs], False),
            worst([r.psnr for r in rungs], False),
            worst([r.over_jnd for r in rungs], True),
        )
    return {q: out[q] for q in ladder}


@dataclass(frozen=True)
class RegionReport:
    """One region's figures: the cloak's, and each JPEG re-encode's of the same (clean) pixels."""

    cloak: Visibility
    jpeg: dict[int, Visibility]

    def jpeg_equivalent(self) -> int | None:
        """The highest ladder quality whose FLIP and CIEDE2000 mean the cloak does not exceed (the finest
        re-encode it is no more visible than), or None when it exceeds even the lowest quality's."""
        met = [q for q, v in self.jpeg.items() if self.cloak.within(v)]
        return max(met) if met else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.cloak.to_dict(),
            "jpeg": {f"q{q}": v.to_dict() for q, v in self.jpeg.items()},
            "jpeg_equivalent": self.jpeg_equivalent(),
        }


def region_report(
    original: Uint8Array,
    cloaked: Uint8Array,
    region: Box,
    *,
    ladder: dict[int, Uint8Array] | None = None,
    qualities: Sequence[int] = JPEG_LADDER,
) -> RegionReport:
    """The cloak's and the JPEG ladder's figures on ``region`` of the photo. ``ladder`` (the whole
    photo's re-encodes) is made when not given; JPEG depends on the blocks around a region, so the
    re-encode is of the whole photo and only its figures are taken on the region."""
    ladder = jpeg_ladder(original, qualities) if ladder is None else ladder
    ref = original[region.slices]
    return RegionReport(
        measure(ref, cloaked[region.slices]),
        {q: measure(ref, img[region.slices]) for q, img in ladder.items()},
    )


def jpeg_window(shape: Sequence[int], region: Box, block: int = 16) -> tuple[Box, Box]:
    """The window of the photo a region's JPEG re-encode needs, and the region inside it.

    The window starts on the JPEG grid (16-pixel MCUs with 4:2:0 chroma), so its blocks are the whole
    photo's; one block of margin keeps the region clear of the window's own edges, so the region's
    pixels come out of the window's encoding as they come out of the whole photo's.
    """
    height, width = int(shape[0]), int(shape[1])
    top, left = max(0, (region.top - block) // block * block), max(0, (region.left - block) // block * block)
    bottom, right = min(height, region.bottom + block), min(width, region.right + block)
    inner = Box(region.top - top, region.left - left, region.bottom - top, region.right - left)
    return Box(top, left, bottom, right), inner


def region_ladder(
    original: Uint8Array,
    region: Box,
    qualities: Sequence[int] = JPEG_LADDER,
    *,
    block: int = 16,
    stride: int | None = None,
) -> dict[int, Visibility]:
    """Each JPEG re-encode's figures on ``region`` of the photo, encoding only the region and a margin.

    The encoded window starts on the JPEG grid (16-pixel MCUs with 4:2:0 chroma), so its blocks are the
    whole photo's; one block of margin keeps the region clear of the window's own edges.
    """
    window, inner = jpeg_window(original.shape, region, block)
    crop = np.ascontiguousarray(original[window.slices])
    ref = crop[inner.slices]
    ladder = jpeg_ladder(crop, qualities)
    if stride is None:
        return {q: measure(ref, img[inner.slices]) for q, img in ladder.items()}
    # Only FLIP and the CIEDE2000 mean, estimated on a grid (what a cap needs).
    against = ColourDifference(ref, stride=stride)
    out = {}
    for q, img in ladder.items():
        f, de = against(img[inner.slices])
        out[q] = Visibility(f, de, math.nan, math.nan, math.nan)
    return out


# ---------------------------------------------------------------------------------------------------
# where people see least: a luminance just-noticeable-difference model

JND_WINDOW: Final = 5
"""Side of the window of the background luminance and of the averaged gradient (Chou and Li)."""
JND_TEXTURE: Final = 0.117
"""Texture-masking gain on the local gradient (Yang et al.'s NAMM, eta)."""
JND_OVERLAP: Final = 0.3
"""How much luminance and texture masking overlap when added (NAMM's C)."""
JND_DARK: Final = 17.0
"""How far the luminance adaptation rises from mid grey towards black (Chou and Li's 17 grey levels)."""


def _box_mean(values: Float32Array, side: int) -> Float32Array:
    r = side // 2
    padded = np.pad(values, r, mode="edge")
    c = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), np.float64)
    c[1:, 1:] = padded.cumsum(0).cumsum(1)
    k = side
    return np.asarray((c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k), dtype=np.float32)


def luminance_jnd(rgb: NDArray[np.generic], *, dark: float = JND_DARK) -> Float32Array:
    """Per pixel, the smallest visible change of luminance, in grey levels ``[H, W]``.

    The nonlinear additive masking model (Yang, Ling, Lu, Ong and Yao, IEEE TCSVT 2005) over Chou and
    Li's luminance adaptation (IEEE TCSVT 1995): with ``b`` the local mean luminance and ``g`` the local
    gradient magnitude,

        LA = D (1 - sqrt(b / 127)) + 3   (b <= 127),   3 (b - 127) / 128 + 3   (b > 127)
        TM = 0.117 g
        JND = LA + TM - 0.3 min(LA, TM)

    Dark and very bright areas hide more than mid-grey skin (luminance adaptation); hair, beards,
    brows and edges hide far more than smooth cheeks and forehead (texture masking). ``dark`` is ``D``,
    the rise towards black (Chou and Li's 17, :data:`JND_DARK`; 0: flat below mid grey).
    """
    luma = _luma(rgb)
    background = _box_mean(luma, JND_WINDOW)
    adaptation = np.where(
        background <= 127,
        dark * (1 - np.sqrt(np.maximum(background, 0) / 127)) + 3,
        3 * (background - 127) / 128 + 3,
    )
    gy, gx = np.gradient(luma)
    gradient = _box_mean(2 * np.hypot(gx, gy).astype(np.float32), JND_WINDOW)
    texture = JND_TEXTURE * gradient
    jnd = adaptation + texture - JND_OVERLAP * np.minimum(adaptation, texture)
    return np.asarray(jnd, dtype=np.float32)


def changed_box(a: NDArray[np.generic], b: NDArray[np.generic]) -> Box | None:
    """The smallest box holding every pixel where ``a`` and ``b`` ``[H, W, C]`` differ, or None."""
    diff = np.any(a != b, axis=2)
    rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
    if rows.size == 0:
        return None
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def image_quality(
    original: NDArray[np.generic], other: NDArray[np.generic], *, strip: int = 128
) -> tuple[float, float]:
    """Whole-image ``(SSIM, PSNR)`` of ``other`` against ``original`` (``[H, W, 3]``, 0..255).

    SSIM equals :func:`image_ops.ssim` on the whole image, but only windows that see a changed pixel are
    computed (unchanged windows score exactly 1), in strips of rows, so a 12 MP photo needs tens of MB.
    """
    a, b = np.asarray(original), np.asarray(other)
    if a.shape != b.shape or a.ndim != 3:
        raise InputError(f"quality needs two [H, W, C] images of one shape, got {a.shape} and {b.shape}")
    box = changed_box(a, b)
    if box is None:
        return 1.0, math.inf
    height, width = a.shape[:2]
    sq = 0.0
    for r in range(box.top, box.bottom, strip):
        d = a[r : min(r + strip, box.bottom), box.left : box.right].astype(np.float64)
        d -= b[r : min(r + strip, box.bottom), box.left : box.right]
        sq += float(np.square(d).sum())
    mse = sq / a.size
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    radius = 5  # the 11-tap window of image_ops.ssim
    if min(height, width) < 2 * radius + 1:
        return 1.0 - float(mse > 0), psnr
    # Window centres that can see a change, within the valid range [radius, H - radius).
    c_top, c_bottom = max(radius, box.top - radius), min(height - radius, box.bottom + radius)
    c_left, c_right = max(radius, box.left - radius), min(width - radius, box.right + radius)
    total = (height - 2 * radius) * (width - 2 * radius) * a.shape[2]
    counted = 0
    summed = 0.0
    cols = slice(c_left - radius, c_right + radius)
    for r in range(c_top, c_bottom, strip):
        r_end = min(r + strip, c_bottom)
        rows = slice(r - radius, r_end + radius)
        n = (r_end - r) * (c_right - c_left) * a.shape[2]
        summed += float(image_ops.ssim(a[None, rows, cols], b[None, rows, cols])[0]) * n
        counted += n
    return (summed + (total - counted)) / total, psnr
