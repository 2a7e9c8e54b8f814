"""Where a face's cloak may go: its region of the photo, the crop map from that region to the
recognizer's canonical crop, and the mask that shares the budget out over the region's pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import visibility
from uncnn_rt.runtime.arrays import Float32Array, Float64Array, Uint8Array
from uncnn_rt.runtime.attacks import (
    Chain,
    Grey,
    InputDiversity,
    LinearMap,
    Mirror,
    Smooth,
)
from uncnn_rt.runtime.cloak.modes import FEATHER, CloakSettings
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.geometry.faces import FaceSite
from uncnn_rt.runtime.geometry.warp import Box, Warp, feather_mask

SSIM_MARGIN: Final = 10
"""Pixels around a face's warp box kept in its region, so every SSIM window that sees a changed
pixel lies inside the region (two window radii of the 11-tap Gaussian)."""


JPEG_BLOCK: Final = 16
"""Regions start on this grid, so EOT's JPEG blocks fall where the saved file's do."""


BLURRED_SIGMA: Final = 1.0 / 112
"""The blurred view's Gaussian (:class:`AlignmentJitter`), as a share of the crop's side: one pixel of a
112-pixel crop, the native size of most face recognizers."""


TEXTURE_RADIUS: Final = 3


TEXTURE_STD: Final = 12.0
"""Local luminance standard deviation (0..255, over a 7x7 window) at which a pixel gets its full budget;
flatter pixels get a share ``std / TEXTURE_STD``, down to the mode's ``texture_floor``."""


class CropMap(LinearMap):
    """A face's crop warp as a map of photo regions: ``[N, h, w, C]`` (``region``) -> ``[N, S, S, C]``.

    The warp reads only its own box, which lies inside ``region``; the adjoint is zero outside it.
    """

    def __init__(self, warp: Warp, region: Box) -> None:
        inner = warp.box
        if not (
            region.top <= inner.top
            and region.left <= inner.left
            and inner.bottom <= region.bottom
            and inner.right <= region.right
        ):
            raise InputError(f"the warp's box {inner} is not inside the region {region}")
        self.warp, self.region = warp, region
        self._rows = slice(inner.top - region.top, inner.bottom - region.top)
        self._cols = slice(inner.left - region.left, inner.right - region.left)

    def forward(self, images: Float32Array) -> Float32Array:
        self._check(images, (self.region.height, self.region.width))
        return np.stack([self.warp.apply_region(image[self._rows, self._cols]) for image in images])

    def adjoint(self, grad: Float32Array) -> Float32Array:
        self._check(grad, (self.warp.size, self.warp.size))
        out = np.zeros((grad.shape[0], self.region.height, self.region.width, grad.shape[3]), np.float32)
        for i, g in enumerate(grad):
            out[i, self._rows, self._cols] = self.warp.adjoint(g)
        return out

    @staticmethod
    def _check(images: Float32Array, hw: tuple[int, int]) -> None:
        if images.ndim != 4 or images.shape[1:3] != hw:
            raise InputError(f"expected [N, {hw[0]}, {hw[1]}, C], got {list(images.shape)}")


def region_box(warp: Warp, height: int, width: int) -> Box:
    """The warp's box grown by :data:`SSIM_MARGIN` and snapped outwards to the JPEG grid, in the photo."""
    b = warp.box
    top = max(0, (b.top - SSIM_MARGIN) // JPEG_BLOCK * JPEG_BLOCK)
    left = max(0, (b.left - SSIM_MARGIN) // JPEG_BLOCK * JPEG_BLOCK)
    bottom = min(height, -(-(b.bottom + SSIM_MARGIN) // JPEG_BLOCK) * JPEG_BLOCK)
    right = min(width, -(-(b.right + SSIM_MARGIN) // JPEG_BLOCK) * JPEG_BLOCK)
    return Box(top, left, bottom, right)


def crop_scale(warp: Warp) -> float:
    """Photo pixels per crop pixel."""
    return float(math.sqrt(abs(np.linalg.det(warp.matrix[:, :2]))))


def face_mask(warp: Warp, region: Box, feather: float = FEATHER, inside: bool = True) -> Float32Array:
    """The feathered footprint of the crop in the photo, evaluated on ``region``: ``[h, w]`` in [0, 1]."""
    width = feather * warp.size * crop_scale(warp)
    return feather_mask(
        warp.photo_shape, warp.footprint(), width, grow_px=0.0 if inside else width, within=region
    )


def local_contrast(rgb: NDArray[np.generic]) -> Float64Array:
    """Standard deviation of luminance over the 7x7 window around each pixel, ``[h, w]`` (0..255 units)."""
    luma = np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    r = TEXTURE_RADIUS
    padded = np.pad(luma, r, mode="reflect") if min(luma.shape) > r else np.pad(luma, r, mode="edge")
    n = (2 * r + 1) ** 2
    mean = _box_sum(padded, r) / n
    mean_sq = _box_sum(padded * padded, r) / n
    return np.asarray(np.sqrt(np.maximum(mean_sq - mean * mean, 0.0)), dtype=np.float64)


def texture_weight(
    rgb: NDArray[np.generic],
    floor: float,
    *,
    within: NDArray[np.floating] | None = None,
    quantile: float | None = None,
) -> Float32Array:
    """A per-pixel share of the budget, ``[h, w]`` in ``[floor, 1]``, from the local luminance contrast.

    A change of a few grey levels is invisible in hair, eyes and edges and visible on smooth skin or
    sky (contrast masking; the same reason SSIM falls fastest in flat areas). The share is the local
    contrast (:func:`local_contrast`) over a reference contrast, clipped: :data:`TEXTURE_STD`, or with
    ``quantile`` that quantile of the contrast where ``within`` (the face mask) exceeds 0.5, so that a
    smooth photo (an upscaled one) still gives its most textured pixels the whole budget.
    """
    if floor >= 1:
        return np.ones(rgb.shape[:2], np.float32)
    contrast = local_contrast(rgb)
    reference = TEXTURE_STD
    if quantile is not None:
        inside = contrast[within > 0.5] if within is not None else contrast.ravel()
        if inside.size:
            reference = min(TEXTURE_STD, max(float(np.quantile(inside, quantile)), 1.0))
    return np.clip(contrast / reference, floor, 1.0).astype(np.float32)


def _box_sum(padded: Float64Array, r: int) -> Float64Array:
    """Sums over the ``(2r+1)^2`` windows of an array padded by ``r`` (integral image)."""
    k = 2 * r + 1
    c = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1))
    c[1:, 1:] = padded.cumsum(0).cumsum(1)
    return np.asarray(c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k], dtype=np.float64)


class CropWarp(LinearMap):
    """A warp of square crops ``[N, S, S, C]`` onto crops of the same size (each image alike)."""

    def __init__(self, warp: Warp) -> None:
        self.warp = warp

    def forward(self, images: Float32Array) -> Float32Array:
        return np.stack([self.warp.apply(np.ascontiguousarray(image, dtype=np.float32)) for image in images])

    def adjoint(self, grad: Float32Array) -> Float32Array:
        return np.stack([self.warp.adjoint_photo(g) for g in grad])


@dataclass(frozen=True, kw_only=True)
class AlignmentJitter(InputDiversity):
    """Input diversity for aligned faces: a random small similarity transform of the crop.

    Xie et al.'s DI (CVPR 2019) shrinks the input and pads it with black; for a face crop the nearer
    change is the one a recognizer's own pipeline makes: another detector (or the same one on the
    cloaked photo) puts the landmarks a little elsewhere, so the crop is scaled, shifted and rotated a
    little. Each draw (with ``probability``) resamples the crop bilinearly about its centre with a scale
    in ``1 +- scale``, a rotation in ``+-rotation`` degrees and a shift in ``+-shift`` of the side; the
    map is linear with an exact adjoint (:class:`~uncnn_rt.runtime.geometry.warp.Warp`), edges are replicated.

    Three more views, each drawn on its own: the crop mirrored (``mirror``; a face's mirror image is the
    same person, and many recognizers embed both), its luma in all three channels (``grey``; a
    recognizer that leans on colour less than ours sees the cloak's luminance only), and blurred
    (``blurred``: a Gaussian of :data:`BLURRED_SIGMA` of the side; LowKey, Cherepanova et al. 2021, attacks a
    blurred copy of each face beside the face, so that the change holds in the coarse features any
    recognizer reads).
    """

    scale: float = 0.05
    rotation: float = 4.0
    shift: float = 0.03
    mirror: float = 0.0
    grey: float = 0.0
    blurred: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in (("mirror", self.mirror), ("grey", self.grey), ("blurred", self.blurred)):
            if not 0.0 <= value <= 1.0:
                raise InputError(f"the {name} view's probability must be in [0, 1], got {value}")

    def sample(self, size: tuple[int, int], rng: np.random.Generator) -> LinearMap | None:
        maps: list[LinearMap] = []
        jitter = self._jitter(size, rng)
        if jitter is not None:
            maps.append(jitter)
        if self.mirror > 0 and rng.random() < self.mirror:
            maps.append(Mirror())
        if self.grey > 0 and rng.random() < self.grey:
            maps.append(Grey())
        if self.blurred > 0 and rng.random() < self.blurred:
            maps.append(Smooth(BLURRED_SIGMA * size[0]))
        if not maps:
            return None
        return maps[0] if len(maps) == 1 else Chain(maps)

    def _jitter(self, size: tuple[int, int], rng: np.random.Generator) -> LinearMap | None:
        if rng.random() >= self.probability:
            return None
        side = size[0]
        if size[1] != side:
            raise InputError(f"alignment jitter needs square crops, got {size}")
        factor = 1.0 + float(rng.uniform(-self.scale, self.scale))
        angle = math.radians(float(rng.uniform(-self.rotation, self.rotation)))
        shift = rng.uniform(-self.shift, self.shift, size=2) * side
        a = factor * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        centre = np.array([side / 2, side / 2])
        matrix = np.concatenate([a, (centre + shift - a @ centre)[:, None]], axis=1)
        return CropWarp(Warp(matrix, (side, side), side, antialias=False))


def within(outer: Box, inner: Box) -> Box:
    """``inner`` clipped to ``outer``, in ``outer``'s coordinates."""
    top, left = max(inner.top, outer.top) - outer.top, max(inner.left, outer.left) - outer.left
    bottom, right = min(inner.bottom, outer.bottom) - outer.top, min(inner.right, outer.right) - outer.left
    return Box(top, left, max(bottom, top + 1), max(right, left + 1))


def _box_ramp(shape: tuple[int, int], box: Box, width: float) -> Float32Array:
    """1 inside ``box`` (in an array of ``shape``), falling linearly to 0 over ``width`` pixels inside its
    edges: the perturbation stays inside the measured face region, with no hard edge of its own."""
    rows, cols = np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32)
    w = max(float(width), 1.0)
    ry = np.clip(np.minimum(rows - box.top + 0.5, box.bottom - rows - 0.5) / w, 0.0, 1.0)
    rx = np.clip(np.minimum(cols - box.left + 0.5, box.right - cols - 0.5) / w, 0.0, 1.0)
    return np.asarray(ry[:, None] * rx[None, :], dtype=np.float32)


def visible_region(site: FaceSite, region: Box, shape: tuple[int, ...]) -> Box:
    """Where a face's visibility is measured and capped: its detection box grown as
    :func:`visibility.face_region` does, or, for the whole image (no detection), the attacked region."""
    if site.box is None:
        return region
    return visibility.face_region(site.box, shape)


def union(a: Box, b: Box) -> Box:
    return Box(min(a.top, b.top), min(a.left, b.left), max(a.bottom, b.bottom), max(a.right, b.right))


def paste(values: Float32Array, source: Box, target: Box) -> Float32Array:
    """``values`` laid out on ``source``, read on ``target`` (zero where ``source`` does not reach)."""
    out = np.zeros((target.height, target.width), np.float32)
    top, left = max(source.top, target.top), max(source.left, target.left)
    bottom, right = min(source.bottom, target.bottom), min(source.right, target.right)
    if top < bottom and left < right:
        out[top - target.top : bottom - target.top, left - target.left : right - target.left] = values[
            top - source.top : bottom - source.top, left - source.left : right - source.left
        ]
    return out


def shaped_mask(
    mask: Float32Array, original: Uint8Array, region: Box, seen: Box, settings: CloakSettings
) -> Float32Array:
    """A face's mask on ``region`` shaped by the mode: kept inside the measured face region ``seen``
    (with a cap), times the texture or JND share of the budget."""
    pixels = original[region.slices]
    if settings.cap_jpeg is not None:
        inner = within(region, seen)
        mask = mask * _box_ramp(mask.shape, inner, settings.feather * 0.5 * max(inner.height, inner.width))
    if settings.texture_floor < 1:
        mask = mask * texture_weight(
            pixels, settings.texture_floor, within=mask, quantile=settings.texture_quantile
        )
    if settings.jnd_floor is not None:
        jnd = visibility.luminance_jnd(pixels, dark=settings.jnd_dark)
        inside = jnd[mask > 0.5]
        reference = float(np.quantile(inside, 0.9)) if inside.size else float(jnd.max(initial=1.0))
        mask = mask * np.clip(jnd / max(reference, 1e-6), settings.jnd_floor, 1.0)
    return np.asarray(mask, dtype=np.float32)


def exclusive_mask(
    index: int, chosen: Sequence[int], warps: dict[int, Warp], region: Box, settings: CloakSettings
) -> Float32Array:
    """Face ``index``'s mask on ``region``, zero where another chosen face's mask is larger (ties: the
    earlier face), so that every pixel belongs to at most one face and the L-inf budget holds."""
    mine = face_mask(warps[index], region, settings.feather, settings.feather_inside)
    for j in chosen:
        if j == index or not overlaps(warps[j].box, region):
            continue
        theirs = face_mask(warps[j], region, settings.feather, settings.feather_inside)
        mine = np.where((theirs > mine) | ((theirs == mine) & (j < index)), np.float32(0.0), mine)
    return np.asarray(mine, dtype=np.float32)


def overlaps(a: Box, b: Box) -> bool:
    return a.top < b.bottom and b.top < a.bottom and a.left < b.right and b.left < a.right
