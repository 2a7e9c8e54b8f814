"""Image quality measures (SSIM, PSNR) and the non-differentiable transforms of upload pipelines.

Every function takes batches ``[N, H, W, C]`` of float images in 0..255 units and works per image.
The transforms (JPEG re-encode, downscale, blur) go through Pillow exactly as an upload pipeline
would, so attacks treat them as black boxes (straight-through gradients; see ``attacks.boosters``).
"""

from __future__ import annotations

import io
import math
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from uncnn_rt.runtime.arrays import Float32Array, Float64Array
from uncnn_rt.runtime.errors import InputError

# Wang et al. (2004) constants, as in scikit-image's structural_similarity with gaussian_weights=True.
SSIM_SIGMA: Final = 1.5
SSIM_TRUNCATE: Final = 3.5
SSIM_K1: Final = 0.01
SSIM_K2: Final = 0.03
DATA_RANGE: Final = 255.0


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> Float64Array:
    """A sampled Gaussian of standard deviation ``sigma`` on ``[-radius, radius]``, summing to 1.

    ``radius`` defaults to ``round(3.5 * sigma)``, scipy's ``truncate=3.5`` rule.
    """
    if sigma <= 0:
        raise InputError(f"Gaussian sigma must be > 0, got {sigma}")
    r = int(SSIM_TRUNCATE * sigma + 0.5) if radius is None else radius
    if r < 0:
        raise InputError(f"Gaussian radius must be >= 0, got {r}")
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return np.asarray(k / k.sum(), dtype=np.float64)


def filter_valid(x: NDArray[np.floating], kernel: Float64Array) -> NDArray[np.floating]:
    """Separable correlation of ``[N, H, W, C]`` with a symmetric ``kernel`` on both spatial axes, 'valid'
    region only, in ``x``'s float dtype.

    Each pass folds the mirrored taps (``k_i (a_i + a_{-i})``) and accumulates in place, so it makes
    two temporaries instead of one per tap: about twice as fast as the plain sum of shifted products.
    """
    taps = kernel.shape[0]
    if taps % 2 != 1 or not np.allclose(kernel, kernel[::-1]):
        raise InputError(f"filter_valid needs a symmetric kernel of odd length, got {kernel.shape[0]} taps")
    k = kernel.astype(x.dtype)
    r = taps // 2
    out = x
    for axis in (1, 2):
        n = out.shape[axis] - taps + 1

        def tap(i: int, a: NDArray[np.floating] = out, axis: int = axis, n: int = n) -> NDArray[np.floating]:
            return a[:, i : i + n] if axis == 1 else a[:, :, i : i + n]

        acc = tap(r) * k[r]
        tmp = np.empty_like(acc)
        for i in range(r):
            np.add(tap(i), tap(taps - 1 - i), out=tmp)
            tmp *= k[i]
            acc += tmp
        out = acc
    return out


def ssim(reference: NDArray[np.generic], distorted: NDArray[np.generic]) -> Float64Array:
    """Mean structural similarity per image, ``[N]`` (Wang, Bovik, Sheikh & Simoncelli, 2004).

    Gaussian window (sigma 1.5, 11 taps), data range 255, population covariances, averaged over the
    channels and over the pixels whose window lies inside the image; this equals scikit-image's
    ``structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
    use_sample_covariance=False)``.

    Args:
        reference, distorted: ``[N, H, W, C]`` images in 0..255, ``H, W >= 11``.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(distorted, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise InputError(f"SSIM needs two [N, H, W, C] batches of one shape, got {x.shape} and {y.shape}")
    kernel = gaussian_kernel1d(SSIM_SIGMA)
    if min(x.shape[1:3]) < kernel.shape[0]:
        raise InputError(
            f"SSIM needs images of at least {kernel.shape[0]}x{kernel.shape[0]}, got {x.shape[1:3]}"
        )
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mx, my = filter_valid(x, kernel), filter_valid(y, kernel)
    vx = filter_valid(x * x, kernel) - mx * mx
    vy = filter_valid(y * y, kernel) - my * my
    cxy = filter_valid(x * y, kernel) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return np.asarray(index.mean(axis=(1, 2, 3)), dtype=np.float64)


def psnr(reference: NDArray[np.generic], distorted: NDArray[np.generic]) -> Float64Array:
    """Peak signal-to-noise ratio in dB per image, ``[N]``, for data range 255 (``inf`` when equal)."""
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(distorted, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise InputError(f"PSNR needs two [N, H, W, C] batches of one shape, got {x.shape} and {y.shape}")
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return np.asarray(10.0 * np.log10(DATA_RANGE**2 / mse), dtype=np.float64)


def to_uint8(images: NDArray[np.generic]) -> NDArray[np.uint8]:
    """Round 0..255 float images to the nearest integer, clipped, as a saved file stores them."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64)), 0, 255).astype(np.uint8)


def _per_image(images: NDArray[np.generic], apply: _PillowOp) -> Float32Array:
    batch = to_uint8(images)
    if batch.ndim != 4 or batch.shape[3] != 3:
        raise InputError(f"expected RGB images [N, H, W, 3], got shape {list(batch.shape)}")
    out = np.empty(batch.shape, np.float32)
    for i, image in enumerate(batch):
        result = apply(Image.fromarray(image, mode="RGB")).convert("RGB")
        out[i] = np.asarray(result, dtype=np.float32)
    return out


class _PillowOp:
    def __call__(self, image: Image.Image) -> Image.Image:
        raise NotImplementedError


class _Jpeg(_PillowOp):
    def __init__(self, quality: int) -> None:
        self.quality = quality

    def __call__(self, image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            rgb: Image.Image = decoded.convert("RGB")
        return rgb


class _Downscale(_PillowOp):
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        small = (max(1, round(w * self.factor)), max(1, round(h * self.factor)))
        return image.resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)


class _Blur(_PillowOp):
    def __init__(self, radius: float) -> None:
        self.radius = radius

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(self.radius))


def jpeg(images: NDArray[np.generic], quality: int) -> Float32Array:
    """Encode each image as a JPEG of ``quality`` (1..95) with Pillow and decode it again."""
    if not 1 <= quality <= 95:
        raise InputError(f"JPEG quality must be in 1..95, got {quality}")
    return _per_image(images, _Jpeg(quality))


def downscale(images: NDArray[np.generic], factor: float) -> Float32Array:
    """Shrink each image by ``factor`` (0 < factor <= 1) and enlarge it back, both bilinear (Pillow)."""
    if not 0 < factor <= 1 or math.isnan(factor):
        raise InputError(f"downscale factor must be in (0, 1], got {factor}")
    return _per_image(images, _Downscale(factor))


def blur(images: NDArray[np.generic], radius: float) -> Float32Array:
    """Gaussian blur of standard deviation ``radius`` pixels (Pillow's ``GaussianBlur``)."""
    if radius < 0:
        raise InputError(f"blur radius must be >= 0, got {radius}")
    return _per_image(images, _Blur(radius))
