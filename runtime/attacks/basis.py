"""Where a step lives: the pixel grid, or coarser grids upsampled to it, and its colour split.

A step on a grid ``c`` times coarser than the image is the norm's steepest direction taken there (the
velocity brought down by the upsampling's adjoint) and upsampled bilinearly: a smooth perturbation,
which survives the resampling a recognizer's own pipeline does. With ``chroma`` < 1 the luminance part
of the velocity (the same on R, G and B) and its chroma part (what remains) get their directions apart,
the chroma one scaled by ``chroma``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks.linear import LinearMap, Upsample

Direction = Callable[[Float32Array], Float32Array]
"""The norm's unit steepest-ascent direction of a velocity ``[N, H, W, 3]``."""


def coarse_basis(factor: float, size: tuple[int, int]) -> Upsample | None:
    """Bilinear upsampling from a grid ``factor`` times coarser onto ``size``, or None for ``factor`` 1."""
    if factor <= 1.0:
        return None
    grid = (max(1, round(size[0] / factor)), max(1, round(size[1] / factor)))
    return Upsample(grid, size)


def chroma_part(values: Float32Array) -> Float32Array:
    """What remains of ``[N, H, W, 3]`` values after their channel mean (their luminance part)."""
    return np.asarray(values - values.mean(axis=3, keepdims=True), dtype=np.float32)


def step_direction(
    direction: Direction, velocity: Float32Array, bases: Sequence[LinearMap | None], chroma: float
) -> Float32Array:
    """The step's direction: ``direction`` of ``velocity`` on each basis (None: the pixel grid), averaged
    over the bases, with the chroma part scaled by ``chroma``. A basis is an upsampling from a coarser grid
    (:func:`coarse_basis`) or a smoothing (:class:`~.linear.Smooth`): ``basis.forward(direction(
    basis.adjoint(v)))`` either way."""

    def on(basis: LinearMap | None, v: Float32Array) -> Float32Array:
        return direction(v) if basis is None else basis.forward(direction(basis.adjoint(v)))

    def split(basis: LinearMap | None) -> Float32Array:
        if chroma >= 1.0:
            return on(basis, velocity)
        luminance = np.ascontiguousarray(
            np.broadcast_to(velocity.mean(axis=3, keepdims=True), velocity.shape)
        )
        d = on(basis, luminance)
        if chroma > 0.0:
            d = d + np.float32(chroma) * chroma_part(on(basis, velocity - luminance))
        return np.asarray(d, dtype=np.float32)

    directions = [split(basis) for basis in bases]
    return directions[0] if len(directions) == 1 else np.mean(directions, axis=0)
