"""The visibility cap of a face: limits taken from the photo's own JPEG re-encode, the in-loop cap that
holds them, the output quality that leaves room for the cloak, and the final holds on the whole photo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import image_ops, visibility
from uncnn_rt.runtime.arrays import Float32Array, Uint8Array
from uncnn_rt.runtime.attacks import (
    BoundCap,
    VisibilityCap,
)
from uncnn_rt.runtime.cloak.modes import CloakSettings
from uncnn_rt.runtime.cloak.regions import within
from uncnn_rt.runtime.geometry.warp import Box
from uncnn_rt.runtime.imageio import LossyOutput
from uncnn_rt.runtime.visibility import image_quality

MIN_CAP: Final = visibility.Visibility(0.01, 0.25, 0.0, 1.0, math.inf)
"""The least cap a face gets, for faces so flat that their JPEG re-encode is all but lossless."""


ENCODER_SHARE: Final = 0.5
"""Most of a face's cap (FLIP and CIEDE2000 each) that the output encoder's own loss may take: a lossy
output whose round trip of the clean photo takes more is written at a higher quality
(:func:`room_for_the_cloak`)."""


OUTPUT_QUALITIES: Final = (90, 95, 98, 100)
"""The higher qualities :func:`room_for_the_cloak` tries, in order."""


SEARCH_PIXELS: Final = 60_000
"""The in-loop cap samples a face region larger than this on every ``stride``-th row and column, so
that one evaluation costs about as much as on a region of this size; the result is checked on every
pixel."""


@dataclass(frozen=True)
class FaceLimits:
    """A face's visibility cap: its region in the photo and the FLIP and CIEDE2000-mean limits there,
    with the JPEG re-encode figures they come from."""

    region: Box
    flip: float
    ciede2000: float
    reference: visibility.Visibility
    """The figures of the re-encode the cap is taken from (the photo's own JPEG at ``cap_jpeg``)."""


def face_limits(original: Uint8Array, region: Box, settings: CloakSettings) -> FaceLimits | None:
    """The cap of the face whose region (:func:`visibility.face_region`) is ``region``, or None when the
    mode has no cap."""
    if settings.cap_jpeg is None:
        return None
    finer = tuple(q for q in visibility.JPEG_LADDER if q > settings.cap_jpeg)
    stride = visibility.search_stride(region.height, region.width, SEARCH_PIXELS)
    ladder = visibility.region_ladder(original, region, (settings.cap_jpeg, *finer), stride=stride)
    ladder = visibility.envelope(ladder)
    ref = ladder[settings.cap_jpeg]
    flip = max(settings.cap_scale * ref.flip, MIN_CAP.flip)
    de = max(settings.cap_scale * ref.ciede2000_mean, MIN_CAP.ciede2000_mean)
    if settings.cap_ciede2000 is not None:
        de = min(de, settings.cap_ciede2000)
    return FaceLimits(region, flip, de, ref)


def room_for_the_cloak(original: Uint8Array, limits: Sequence[FaceLimits], saved: LossyOutput) -> LossyOutput:
    """``saved`` at the lowest quality, its own or one of :data:`OUTPUT_QUALITIES` above it, whose round
    trip of the clean photo takes at most :data:`ENCODER_SHARE` of every face's cap (else the highest).

    A cap is the photo's own JPEG re-encode at the mode's quality (and at most a CIEDE2000 mean of 1.3
    in ``mid``). Written at a quality near that one, or a noisy photo written at q95, the file's own
    encoding loss can take all of it: the cloak would have to be 0. Measured on strided samples of
    each face region, like the in-loop cap."""
    trial = saved
    for quality in (saved.quality, *(q for q in OUTPUT_QUALITIES if q > saved.quality)):
        trial = saved.at(quality)
        if all(_encoder_fits(original, trial, lim) for lim in limits):
            return trial
    return trial


def _encoder_fits(original: Uint8Array, saved: LossyOutput, limits: FaceLimits) -> bool:
    """Whether ``saved``'s loss on the clean face region takes at most ENCODER_SHARE of its cap; only
    the region's JPEG window is encoded (:func:`visibility.jpeg_window`), not the whole photo."""
    window, inner = visibility.jpeg_window(original.shape, limits.region)
    crop = np.ascontiguousarray(original[window.slices])
    stride = visibility.search_stride(inner.height, inner.width, SEARCH_PIXELS)
    flip, de = visibility.colour_difference(crop[inner.slices], saved(crop)[inner.slices], stride=stride)
    return flip <= ENCODER_SHARE * limits.flip and de <= ENCODER_SHARE * limits.ciede2000


@dataclass(frozen=True)
class FaceCap(VisibilityCap):
    """The cap of :class:`FaceLimits` for an attack on a photo region: FLIP and CIEDE2000 mean of the
        face's box (``face``, in the attacked images' coordinates), each over its limit; at most 1 holds.

        The in-loop score computes CIEDE2000 in float32, the exact one in float64; FLIP is the same in both
        (:class:`visibility.FlipReference`, float32; ``tests/test_visibility.py`` holds it to NVIDIA's
    reference within a relative 2e-3).
    """

    face: Box
    flip: float
    ciede2000: float
    saved: Callable[[Uint8Array], Uint8Array] | None = field(default=None, compare=False)
    """The output encoder's round trip, applied to the attacked region before measuring (its blocks
    start on the JPEG grid, so they are the saved photo's), so the cap holds on the file as saved."""
    extent: tuple[int, int] | None = None
    """The attacked region's own ``H x W`` when its images come padded in a batch of larger ones
    (:class:`~uncnn_rt.runtime.attacks.PerImage`): the padding is cut off before ``saved``."""
    exponent: float = 0.85  # FLIP grows about as c^0.7 (its colour error's power), CIEDE2000 as c

    def bind(self, x0: Float32Array) -> BoundCap:
        return _BoundFaceCap(self, x0)


class _BoundFaceCap(BoundCap):
    def __init__(self, cap: FaceCap, x0: Float32Array) -> None:
        self.cap, self.exponent = cap, cap.exponent
        self.stride = visibility.search_stride(cap.face.height, cap.face.width, SEARCH_PIXELS)
        refs = [image_ops.to_uint8(x[cap.face.slices]) for x in x0]
        self.exact_flips = [visibility.FlipReference(r) for r in refs]
        self.fast_flips = (
            self.exact_flips
            if self.stride == 1
            else [visibility.FlipReference(r, stride=self.stride) for r in refs]
        )
        self.labs = [visibility.srgb_to_lab(r) for r in refs]
        s = self.stride
        self.labs_fast = [lab[::s, ::s].astype(np.float32) for lab in self.labs]

    def _ratio(self, flip: float, de: NDArray[np.floating]) -> float:
        return max(flip / self.cap.flip, float(de.mean(dtype=np.float64)) / self.cap.ciede2000)

    def _face(self, image: Float32Array) -> Uint8Array:
        if self.cap.extent is not None:
            image = image[: self.cap.extent[0], : self.cap.extent[1]]
        pixels = image_ops.to_uint8(image)
        if self.cap.saved is not None:
            pixels = self.cap.saved(pixels)
        return pixels[self.cap.face.slices]

    def fast(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        s, out = self.stride, np.empty(len(idx))
        for k, i in enumerate(idx):
            test = self._face(images[k])
            lab = visibility.srgb_to_lab(test[::s, ::s]).astype(np.float32)
            out[k] = self._ratio(self.fast_flips[i].mean(test), visibility.ciede2000(self.labs_fast[i], lab))
        return out

    def exact(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        out = np.empty(len(idx))
        for k, i in enumerate(idx):
            test = self._face(images[k])
            lab = visibility.srgb_to_lab(test)
            out[k] = self._ratio(self.exact_flips[i].mean(test), visibility.ciede2000(self.labs[i], lab))
        return out


def face_cap(
    region: Box,
    limits: FaceLimits | None,
    saved: Callable[[Uint8Array], Uint8Array] | None,
    *,
    extent: tuple[int, int] | None = None,
) -> FaceCap | None:
    """The cap of :class:`FaceLimits` on an attack of ``region`` (None without limits)."""
    if limits is None:
        return None
    return FaceCap(within(region, limits.region), limits.flip, limits.ciede2000, saved, extent=extent)


def hold_ssim_together(
    original: Uint8Array, photo: Uint8Array, regions: Sequence[Box], floor: float
) -> Uint8Array:
    """Scale the whole perturbation down (bisection on a common factor, truncating towards the original)
    when overlapping face regions pushed a region's SSIM, or the photo's, under the floor. Each face's
    attack held the floor against the photo it started from; with disjoint regions that is the original.
    """

    def worst(candidate: Uint8Array) -> float:
        scores = [image_quality(original, candidate)[0]]
        scores += [
            float(image_ops.ssim(original[r.slices][None], candidate[r.slices][None])[0])
            for r in regions
            if min(r.height, r.width) >= 11
        ]
        return min(scores)

    if worst(photo) >= floor:
        return photo
    delta = photo.astype(np.float32) - original
    lo, hi = 0.0, 1.0
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst(_scaled(original, delta, mid)) >= floor else (lo, mid)
    return _scaled(original, delta, lo)


def exceeds(figures: visibility.Visibility, limits: FaceLimits | None) -> bool:
    """Whether a face's figures exceed its cap (never without one)."""
    return limits is not None and (figures.flip > limits.flip or figures.ciede2000_mean > limits.ciede2000)


def hold_caps_together(
    original: Uint8Array,
    photo: Uint8Array,
    limits: Sequence[FaceLimits],
    saved: Callable[[Uint8Array], Uint8Array] | None,
) -> Uint8Array:
    """Scale the whole perturbation down (bisection on a common factor) when a face region exceeds its
    cap on the photo as it will be saved: the encoder's own loss (a JPEG output's), faces whose regions
    overlap, and refinement rounds change pixels that each face's attack held its cap without. Checked
    on the exact uint8 pixels of the saved file (``saved``)."""

    against = [visibility.ColourDifference(original[lim.region.slices]) for lim in limits]

    def over(candidate: Uint8Array) -> bool:
        if saved is not None:
            candidate = saved(candidate)
        for lim, difference in zip(limits, against, strict=True):
            flip, de = difference(candidate[lim.region.slices])
            if de > lim.ciede2000 or flip > lim.flip:
                return True
        return False

    if not over(photo):
        return photo
    delta = photo.astype(np.float32) - original
    lo, hi = 0.0, 1.0
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if not over(_scaled(original, delta, mid)) else (lo, mid)
    return _scaled(original, delta, lo)


def _scaled(original: Uint8Array, delta: Float32Array, factor: float) -> Uint8Array:
    return np.asarray(np.clip(np.trunc(delta * factor) + original, 0, 255), dtype=np.uint8)
