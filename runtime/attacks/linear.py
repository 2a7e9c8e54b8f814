"""Linear image maps with exact adjoints: resizes, the resize-and-pad, mirror and grey of input diversity.

A resize of ``[N, H, W, C]`` images to ``h x w`` is ``Y = R_y X R_x^T`` per channel, with ``R_y`` ``[h, H]``
and ``R_x`` ``[w, W]`` the resampling weights. Its adjoint, which carries a gradient at the output back
to the input, is ``R_y^T G R_x``. The weights are Pillow's bilinear filter (a triangle kernel widened by
the scale factor when shrinking, so downscaling averages instead of aliasing).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import image_ops
from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.errors import InputError


@lru_cache(maxsize=64)
def resize_matrix(source: int, target: int) -> Float32Array:
    """``[target, source]`` weights of a 1-D bilinear (triangle-filter) resize; each row sums to 1.

    Pixel centres sit at half-integers (``align_corners=False``). When shrinking, the triangle's
    support grows by ``source / target``, as in Pillow's ``Image.resize(..., BILINEAR)``.
    """
    if source <= 0 or target <= 0:
        raise InputError(f"resize sizes must be positive, got {source} -> {target}")
    scale = source / target
    support = max(scale, 1.0)
    centres = (np.arange(target, dtype=np.float64) + 0.5) * scale
    taps = np.arange(source, dtype=np.float64) + 0.5
    weights = np.clip(1.0 - np.abs(taps[None, :] - centres[:, None]) / support, 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    matrix = weights.astype(np.float32)
    matrix.flags.writeable = False  # cached and shared
    return matrix


class LinearMap(ABC):
    """A linear (or affine, with a constant offset) map of ``[N, H, W, C]`` images and its adjoint."""

    @abstractmethod
    def forward(self, images: Float32Array) -> Float32Array: ...

    @abstractmethod
    def adjoint(self, grad: Float32Array) -> Float32Array:
        """``A^T grad``: the gradient at the input, given the gradient at the output."""


def _apply_rows_cols(images: Float32Array, rows: Float32Array, cols: Float32Array) -> Float32Array:
    """``rows @ X @ cols^T`` per image and channel, for ``X`` ``[N, H, W, C]``."""
    n, _, w, c = images.shape
    tall = np.matmul(rows, images.reshape(n, images.shape[1], w * c)).reshape(n, rows.shape[0], w, c)
    out = np.matmul(cols, tall.transpose(0, 2, 1, 3).reshape(n, w, -1))  # [N, w', h' * C]
    return np.ascontiguousarray(out.reshape(n, cols.shape[0], rows.shape[0], c).transpose(0, 2, 1, 3))


class Resize(LinearMap):
    """Bilinear resize of ``[N, H, W, C]`` to ``[N, h, w, C]`` (see :func:`resize_matrix`)."""

    def __init__(self, source: tuple[int, int], target: tuple[int, int]) -> None:
        self.source, self.target = source, target
        self._rows = resize_matrix(source[0], target[0])
        self._cols = resize_matrix(source[1], target[1])

    def forward(self, images: Float32Array) -> Float32Array:
        _check_hw(images, self.source, "resize input")
        return _apply_rows_cols(images, self._rows, self._cols)

    def adjoint(self, grad: Float32Array) -> Float32Array:
        _check_hw(grad, self.target, "resize adjoint input")
        return _apply_rows_cols(grad, self._rows.T, self._cols.T)


class Upsample(LinearMap):
    """Bilinear upsampling of ``[N, h, w, C]`` to ``[N, H, W, C]`` (``H >= h``, ``W >= w``): the same map as
    :class:`Resize`, computed from the two taps each output pixel has instead of dense matrices.

    An upsampling row of :func:`resize_matrix` has at most two non-zero weights, so forward is two
    gathers per axis and the adjoint two sorted segment sums (``np.add.reduceat``) per axis: O(H W C)
    work where the dense products cost O(H W C (h + w)). The perturbation basis of
    :class:`~.base.GradientAttack` (``coarse``) applies it twice per step on whole face regions.
    """

    def __init__(self, source: tuple[int, int], target: tuple[int, int]) -> None:
        if target[0] < source[0] or target[1] < source[1]:
            raise InputError(
                f"Upsample needs a target at least as large as the source, got {source} -> {target}"
            )
        self.source, self.target = source, target
        self._rows = _two_taps(resize_matrix(source[0], target[0]))
        self._cols = _two_taps(resize_matrix(source[1], target[1]))

    def forward(self, images: Float32Array) -> Float32Array:
        _check_hw(images, self.source, "upsample input")
        return _taps_forward(_taps_forward(images, self._rows, axis=1), self._cols, axis=2)

    def adjoint(self, grad: Float32Array) -> Float32Array:
        _check_hw(grad, self.target, "upsample adjoint input")
        rows, cols = self.source
        return _taps_adjoint(_taps_adjoint(grad, self._cols, cols, axis=2), self._rows, rows, axis=1)


class Smooth(LinearMap):
    """A Gaussian blur of each image with its own width: ``[N, H, W, C]`` -> the same shape.

    Separable, zero-padded and symmetric, so the map is its own adjoint. As a perturbation basis
    (``blur`` of :class:`~.base.GradientAttack`: the step is ``G direction(G mask v)``) it keeps the
    steps smooth at the scale of ``sigmas``: a face's canonical-crop pixel, the finest detail its
    recognizers resolve, so nothing is spent on edges finer than that, which people see and
    recognizers average away. A sigma under 0.3 pixels leaves its image as it is.

    Args:
        sigmas: one standard deviation per image, in pixels (a single value applies to every image).
    """

    def __init__(self, sigmas: float | tuple[float, ...]) -> None:
        values = (sigmas,) if isinstance(sigmas, (int, float)) else tuple(sigmas)
        if not values or not all(0.0 <= s < math.inf for s in values):
            raise InputError(f"Smooth needs finite sigmas >= 0, got {sigmas}")
        self.sigmas = values

    def forward(self, images: Float32Array) -> Float32Array:
        if len(self.sigmas) not in (1, images.shape[0]):
            raise InputError(f"Smooth has {len(self.sigmas)} sigmas for {images.shape[0]} images")
        out = np.empty_like(images, dtype=np.float32)
        for k in range(images.shape[0]):
            sigma = self.sigmas[k if len(self.sigmas) > 1 else 0]
            out[k] = images[k] if sigma < 0.3 else _blur_one(images[k], sigma)
        return out

    def adjoint(self, grad: Float32Array) -> Float32Array:
        return self.forward(grad)


def _blur_one(image: Float32Array, sigma: float) -> Float32Array:
    """``[H, W, C]`` blurred by a normalised Gaussian (radius 3 sigma), zero-padded, separably."""
    radius = max(1, math.ceil(3.0 * sigma))
    taps = image_ops.gaussian_kernel1d(sigma, radius).astype(np.float32)
    h, w = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)))
    rows = np.zeros_like(image, dtype=np.float32)
    for i, t in enumerate(taps):
        rows += t * padded[i : i + h]
    padded = np.pad(rows, ((0, 0), (radius, radius), (0, 0)))
    out = np.zeros_like(rows)
    for i, t in enumerate(taps):
        out += t * padded[:, i : i + w]
    return out


_Taps = tuple[NDArray[np.intp], NDArray[np.intp], Float32Array, Float32Array]


def _two_taps(matrix: Float32Array) -> _Taps:
    """Per output index, its two input taps ``(i0, i1)`` (non-decreasing) and weights ``(w0, w1)``."""
    nonzero = matrix > 0
    if int(nonzero.sum(axis=1).max(initial=0)) > 2:
        raise InputError("Upsample: a resize row has more than two taps (that is a downscale)")
    first = np.argmax(nonzero, axis=1)
    last = matrix.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    rows = np.arange(matrix.shape[0])
    w0 = matrix[rows, first].astype(np.float32)
    w1 = np.where(last != first, matrix[rows, last], 0.0).astype(np.float32)
    return first.astype(np.intp), last.astype(np.intp), w0, w1


def _along(weights: Float32Array, axis: int) -> Float32Array:
    shape = [1, 1, 1, 1]
    shape[axis] = weights.shape[0]
    return weights.reshape(shape)


def _taps_forward(images: Float32Array, taps: _Taps, axis: int) -> Float32Array:
    i0, i1, w0, w1 = taps
    near = np.take(images, i0, axis=axis) * _along(w0, axis)
    return np.asarray(near + np.take(images, i1, axis=axis) * _along(w1, axis), dtype=np.float32)


def _taps_adjoint(grad: Float32Array, taps: _Taps, size: int, axis: int) -> Float32Array:
    i0, i1, w0, w1 = taps
    shape = list(grad.shape)
    shape[axis] = size
    out = np.zeros(shape, np.float32)
    for index, weight in ((i0, w0), (i1, w1)):
        starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])  # runs of equal, sorted taps
        sums = np.add.reduceat(grad * _along(weight, axis), starts, axis=axis)
        where: list[slice | NDArray[np.intp]] = [slice(None)] * 4
        where[axis] = index[starts]
        out[tuple(where)] += sums
    return out


class ResizePad(LinearMap):
    """Shrink ``[N, H, W, C]`` to ``inner`` and paste it at ``offset`` into an ``H x W`` canvas of ``fill``.

    The canvas is constant, so the map is affine and its adjoint (of the linear part) crops the
    gradient to the pasted window and applies the resize's adjoint.
    """

    def __init__(
        self, size: tuple[int, int], inner: tuple[int, int], offset: tuple[int, int], fill: float = 0.0
    ) -> None:
        top, left = offset
        if not (0 <= top <= size[0] - inner[0] and 0 <= left <= size[1] - inner[1]):
            raise InputError(f"a {inner} window at {offset} does not fit in {size}")
        self.size, self.inner, self.offset, self.fill = size, inner, offset, fill
        self._resize = Resize(size, inner)

    def forward(self, images: Float32Array) -> Float32Array:
        top, left = self.offset
        canvas = np.full(images.shape, self.fill, dtype=np.float32)
        canvas[:, top : top + self.inner[0], left : left + self.inner[1]] = self._resize.forward(images)
        return canvas

    def adjoint(self, grad: Float32Array) -> Float32Array:
        top, left = self.offset
        window = grad[:, top : top + self.inner[0], left : left + self.inner[1]]
        return self._resize.adjoint(np.ascontiguousarray(window))


class Mirror(LinearMap):
    """Each image mirrored left to right: a permutation that is its own inverse, so its own adjoint."""

    def forward(self, images: Float32Array) -> Float32Array:
        return np.ascontiguousarray(images[:, :, ::-1])

    def adjoint(self, grad: Float32Array) -> Float32Array:
        return self.forward(grad)


LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights, as Pillow's ``convert("L")`` uses them."""


class Grey(LinearMap):
    """RGB ``[N, H, W, 3]`` to its luma in all three channels (``y = 1 w^T x`` per pixel); the adjoint
    sends the summed gradient of the three channels back along ``w`` (``w 1^T g``)."""

    def forward(self, images: Float32Array) -> Float32Array:
        luma = np.tensordot(images, np.asarray(LUMA, np.float32), axes=([3], [0]))
        return np.ascontiguousarray(np.repeat(luma[..., None], images.shape[3], axis=3), dtype=np.float32)

    def adjoint(self, grad: Float32Array) -> Float32Array:
        total = grad.sum(axis=3, keepdims=True)
        return np.asarray(total * np.asarray(LUMA, np.float32), dtype=np.float32)


class Chain(LinearMap):
    """``maps[-1] ... maps[1] maps[0]``: the maps applied in order; the adjoints in reverse."""

    def __init__(self, maps: list[LinearMap]) -> None:
        if not maps:
            raise InputError("Chain needs at least one map")
        self.maps = maps

    def forward(self, images: Float32Array) -> Float32Array:
        for m in self.maps:
            images = m.forward(images)
        return images

    def adjoint(self, grad: Float32Array) -> Float32Array:
        for m in reversed(self.maps):
            grad = m.adjoint(grad)
        return grad


def _check_hw(images: Float32Array, hw: tuple[int, int], what: str) -> None:
    if images.ndim != 4 or images.shape[1:3] != hw:
        raise InputError(f"{what}: expected [N, {hw[0]}, {hw[1]}, C], got {list(images.shape)}")


class PerImage(LinearMap):
    """Each image of a padded batch through its own map: ``[N, H, W, C]`` -> ``[N, h, w, C]``.

    Image ``k`` holds its own ``extents[k]`` pixels in its top-left corner (the rest is padding that no
    map reads, so its gradient is 0), and ``maps[k]`` takes those ``[1, h_k, w_k, C]`` to ``[1, h, w, C]``.
    This lets one attack call run images of different sizes, e.g. the face regions of a group photo,
    each with its own crop warp, through the victims as one batch.
    """

    def __init__(self, maps: list[LinearMap], extents: list[tuple[int, int]]) -> None:
        if not maps or len(maps) != len(extents):
            raise InputError(f"PerImage needs one extent per map, got {len(maps)} and {len(extents)}")
        self.maps, self.extents = maps, extents
        self.size = (max(h for h, _ in extents), max(w for _, w in extents))

    def forward(self, images: Float32Array) -> Float32Array:
        self._check(images)
        return np.concatenate(
            [m.forward(np.ascontiguousarray(images[k : k + 1, :h, :w])) for k, (m, (h, w)) in self._each()]
        )

    def adjoint(self, grad: Float32Array) -> Float32Array:
        if grad.shape[0] != len(self.maps):
            raise InputError(f"PerImage adjoint: expected {len(self.maps)} images, got {grad.shape[0]}")
        out = np.zeros((grad.shape[0], *self.size, grad.shape[3]), np.float32)
        for k, (m, (h, w)) in self._each():
            out[k, :h, :w] = m.adjoint(np.ascontiguousarray(grad[k : k + 1]))[0]
        return out

    def _each(self) -> list[tuple[int, tuple[LinearMap, tuple[int, int]]]]:
        return list(enumerate(zip(self.maps, self.extents, strict=True)))

    def _check(self, images: Float32Array) -> None:
        if images.ndim != 4 or images.shape[0] != len(self.maps) or images.shape[1:3] != self.size:
            raise InputError(
                f"PerImage: expected [{len(self.maps)}, {self.size[0]}, {self.size[1]}, C], "
                f"got {list(images.shape)}"
            )
