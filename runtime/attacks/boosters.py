"""Transfer boosters: input diversity (DI), translation invariance (TI) and expectation over transforms (EOT).

DI and EOT change the point where the gradient is taken; TI changes the gradient itself. All of them
plug into the one loop of :mod:`.base` and compose with every attack there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import image_ops
from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks.linear import LinearMap, ResizePad
from uncnn_rt.runtime.errors import InputError


@dataclass(frozen=True, kw_only=True)
class InputDiversity:
    """DI: with probability ``probability``, shrink the input to a random size and pad it back to size.

    Xie et al., "Improving Transferability of Adversarial Examples with Input Diversity", CVPR 2019.
    The map is the linear :class:`~.linear.ResizePad`, whose exact adjoint carries the gradient back.
    One transform is drawn per gradient evaluation and shared by the batch, as in the paper.

    Args:
        probability: chance of transforming at each evaluation (the paper's ``p``, 0.5).
        min_scale: the smallest side, as a fraction of the input's side (the paper's 299/330 ~ 0.9).
        fill: the canvas value in 0..255 (the paper pads with 0).
    """

    probability: float = 0.5
    min_scale: float = 0.9
    fill: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise InputError(f"input diversity probability must be in [0, 1], got {self.probability}")
        if not 0.0 < self.min_scale <= 1.0:
            raise InputError(f"input diversity min_scale must be in (0, 1], got {self.min_scale}")

    def sample(self, size: tuple[int, int], rng: np.random.Generator) -> LinearMap | None:
        """A random resize-and-pad of ``size`` images, or ``None`` (identity) with ``1 - probability``."""
        if rng.random() >= self.probability:
            return None
        h, w = size
        inner_h = int(rng.integers(max(1, int(np.ceil(h * self.min_scale))), h + 1))
        inner_w = max(1, round(inner_h * w / h))
        top = int(rng.integers(0, h - inner_h + 1))
        left = int(rng.integers(0, w - min(inner_w, w) + 1))
        return ResizePad(size, (inner_h, min(inner_w, w)), (top, left), self.fill)


@dataclass(frozen=True, kw_only=True)
class TranslationInvariance:
    """TI: convolve the gradient with a normalised Gaussian kernel, per channel.

    Dong et al., "Evading Defenses to Transferable Adversarial Examples by Translation-Invariant
    Attacks", CVPR 2019: the gradient averaged over small translations of the input is, to first
    order, the gradient convolved with the translation weights. The kernel is separable and sums to 1;
    borders are zero-padded as in the paper's ``depthwise_conv2d(padding="SAME")``.

    Args:
        radius: half-width in pixels (the paper's 15-tap kernel has radius 7).
        sigma: the Gaussian's standard deviation in pixels (the paper: ``radius / 3``).
    """

    radius: int = 7
    sigma: float | None = None

    def __post_init__(self) -> None:
        if self.radius < 0:
            raise InputError(f"translation-invariance radius must be >= 0, got {self.radius}")

    def kernel1d(self) -> NDArray[np.float64]:
        sigma = self.sigma if self.sigma is not None else max(self.radius / 3.0, 1e-6)
        return image_ops.gaussian_kernel1d(sigma, self.radius)

    def kernel(self) -> NDArray[np.float64]:
        """The 2-D kernel ``k k^T``, ``[2 r + 1, 2 r + 1]``, summing to 1."""
        k = self.kernel1d()
        return np.outer(k, k)

    def __call__(self, grad: Float32Array) -> Float32Array:
        """Smooth ``grad`` ``[N, H, W, C]`` spatially (same-size output, zero padding)."""
        k = self.kernel1d().astype(np.float32)
        r = self.radius
        h, w = grad.shape[1:3]
        padded = np.pad(grad, ((0, 0), (r, r), (0, 0), (0, 0)))
        rows = sum(k[i] * padded[:, i : i + h] for i in range(k.shape[0]))
        padded = np.pad(np.asarray(rows, np.float32), ((0, 0), (0, 0), (r, r), (0, 0)))
        return np.asarray(sum(k[i] * padded[:, :, i : i + w] for i in range(k.shape[0])), dtype=np.float32)


class Transform(ABC):
    """A random, non-differentiable image transform of ``[N, H, W, 3]`` 0..255 batches (same shape out)."""

    @abstractmethod
    def __call__(self, images: Float32Array, rng: np.random.Generator) -> Float32Array: ...


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return lo if lo == hi else float(rng.uniform(lo, hi))


@dataclass(frozen=True)
class Jpeg(Transform):
    """Re-encode as JPEG at a quality drawn uniformly from ``quality`` (inclusive), as upload sites do."""

    quality: tuple[int, int] = (60, 95)

    def __call__(self, images: Float32Array, rng: np.random.Generator) -> Float32Array:
        return image_ops.jpeg(images, int(rng.integers(self.quality[0], self.quality[1] + 1)))


@dataclass(frozen=True)
class Downscale(Transform):
    """Shrink by a factor drawn from ``factor`` and enlarge back (bilinear, Pillow)."""

    factor: tuple[float, float] = (0.5, 1.0)

    def __call__(self, images: Float32Array, rng: np.random.Generator) -> Float32Array:
        return image_ops.downscale(images, _uniform(rng, self.factor))


@dataclass(frozen=True)
class Blur(Transform):
    """Gaussian blur with a radius (standard deviation, pixels) drawn from ``radius``."""

    radius: tuple[float, float] = (0.0, 1.0)

    def __call__(self, images: Float32Array, rng: np.random.Generator) -> Float32Array:
        return image_ops.blur(images, _uniform(rng, self.radius))


@dataclass(frozen=True, kw_only=True)
class EOT:
    """Expectation over transformation with straight-through gradients.

    Athalye et al., "Synthesizing Robust Adversarial Examples" (EOT), ICML 2018, and the BPDA identity
    approximation of "Obfuscated Gradients Give a False Sense of Security", ICML 2018: each of
    ``samples`` evaluations draws one of ``transforms`` uniformly, takes the model gradient at the
    transformed image and uses it unchanged as the gradient at the untransformed one. The step follows
    the mean over the samples, so the perturbation survives the transforms on average.

    Args:
        transforms: the transforms to draw from (JPEG, downscale, blur, or your own :class:`Transform`).
        samples: gradient evaluations per step.
    """

    transforms: Sequence[Transform] = (Jpeg(), Downscale(), Blur())
    samples: int = 1

    def __post_init__(self) -> None:
        if not self.transforms:
            raise InputError("EOT needs at least one transform")
        if self.samples < 1:
            raise InputError(f"EOT samples must be >= 1, got {self.samples}")

    def sample(self, rng: np.random.Generator) -> Transform:
        return self.transforms[int(rng.integers(len(self.transforms)))]
