"""Issue 26 probe: where the cloak's grid lines come from, and whether they buy protection.

On a large face (the crop shrinks the photo by ``s >= 2``) the perturbation ``cloak - original`` is
piecewise constant on squares about one canonical-crop pixel wide, with sharp edges on photo rows and
columns. Candidates: the crop warp's adjoint (:class:`~uncnn_rt.runtime.geometry.warp.Warp` averages
``f x f`` photo blocks, ``f = floor(s)``, before the bilinear sampling, so ``W^T`` spreads one value over
each block), the JPEG EOT's 8 x 8 blocks, the alignment jitter, the sign step.

Each face is cloaked in ``high`` mode (PNG, lossless, one seed) as shipped and with one thing changed:

- ``shipped``: as ``uncnn-rt cloak --mode high``;
- ``no-eot``: ``eot_quality=None``;
- ``no-jitter``: ``diversity=0``;
- ``no-antialias``: the attack's crop warp is plain bilinear (``Warp(antialias=False)``, patched into
  :mod:`uncnn_rt.runtime.cloak.photo` only; the recognizers and :func:`verify` still see the
  block-averaged crop, so this measures what the block lattice buys against the shipped pipeline);
- ``ti-3``: translation-invariant smoothing of the gradient (``smoothing=3``, photo pixels);
- ``coarse-2``: ``coarse=2`` (steps on a 2-crop-pixel grid, upsampled bilinearly).

Per face and variant it prints the grid-line figures of the perturbation ``d`` (grey: the mean over R,
G, B) on the face region:

- ``lat f``: the mean ``|d[x+1] - d[x]|`` across the block lattice's lines (``x+1`` a multiple of ``f``
  in photo coordinates, rows and columns together) over the mean across all other rows/columns;
  1 means no lattice, large means steps on the lattice and flat inside the blocks;
- ``lat 8``: the same on the 8-pixel JPEG grid, each line compared with lines of its own class on the
  ``f`` lattice (on it or off it);
- ``axis photo`` / ``axis crop``: on the central half of the region, the share of the spectral power of
  ``d`` blurred by a Gaussian of ``f/2`` photo pixels that lies within 3 degrees of the photo's
  row/column axes (or of the crop's, turned by the face's roll), frequencies from 4 cycles up to
  ``1/(2 f)``, over the share an isotropic texture would put there: > 1 means lines along those axes;
- ``crop peak``: on the central half, the power at one cycle per canonical-crop pixel along the crop's
  axes over the mean power at that radius: >> 1 when ``d`` repeats with the crop's sampling lattice;

with the face's FLIP and CIEDE2000 mean (:func:`visibility.measure`, on the saved file) and the
white-box verdict of :func:`verify` on the saved file, per model. Strips (original | cloak |
``128 + 8 d`` | ``128 + 16 blur(d)``) at 100% and 200%, and a 160-pixel cheek patch of them at 300%
(``*_detail.png``), go to ``--out`` (default under /tmp: they show
faces of ``../shared``, which must not be committed).

Usage::

    .venv/bin/python bench/grid_probe.py
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from uncnn_rt.runtime import cloak, visibility
from uncnn_rt.runtime.cloak import photo as cloak_photo
from uncnn_rt.runtime.cloak.verify import verify
from uncnn_rt.runtime.geometry.faces import crop_size_for
from uncnn_rt.runtime.geometry.warp import Warp
from uncnn_rt.runtime.imageio import load_image, save_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "faces" / "colour" / "identities"
PHOTOS = (
    "John_Lennon/lennon-2.jpg",
    "insightface_RD/d1.jpg",
    "compreface_A/002_A.jpg",
    "compreface_A/005_A.jpg",
)
KEYS = ("lattice_f", "lattice_8", "axis", "axis_crop", "crop_peak")
VARIANTS = ("shipped", "no-eot", "no-jitter", "no-antialias", "ti-3", "coarse-2")


@dataclass(frozen=True)
class Lines:
    lattice_f: float
    lattice_8: float
    axis: float
    axis_crop: float
    crop_peak: float
    roll: float


def _steps(d: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean |d[x+1] - d[x]| per line between photo columns ``x`` and ``x+1``, and ``x+1`` in photo
    coordinates."""
    return np.abs(np.diff(d, axis=1)).mean(axis=0), offset + 1 + np.arange(d.shape[1] - 1)


def lattice(d: np.ndarray, top: int, left: int, period: int, within: int = 1) -> float:
    """Steps across the lines of the ``period`` lattice over steps across the other lines, columns and
    rows together. With ``within`` > 1, lines are compared only with lines of their own class on the
    ``within`` lattice (on it or off it), and the classes' ratios averaged: the 8-pixel JPEG lattice
    apart from the block lattice."""
    steps = np.concatenate([_steps(d, left)[0], _steps(d.T, top)[0]])
    lines = np.concatenate([_steps(d, left)[1], _steps(d.T, top)[1]])
    on = lines % period == 0
    ratios = []
    for member in (True, False) if within > 1 else (True,):
        cls = (lines % within == 0) == member if within > 1 else np.ones_like(on)
        if (cls & on).any() and (cls & ~on).any():
            ratios.append(steps[cls & on].mean() / max(steps[cls & ~on].mean(), 1e-9))
    return float(np.mean(ratios))


def interior(d: np.ndarray) -> np.ndarray:
    """The central half (each side) of the face region: inside the crop, away from the feathered edge."""
    h, w = d.shape
    return d[h // 4 : h - h // 4, w // 4 : w - w // 4]


def _power(d: np.ndarray, blur: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hann-windowed power spectrum of ``d`` (blurred by a Gaussian of ``blur`` pixels if > 0), and the
    frequencies (cycles per photo pixel) of its bins along columns (x) and rows (y)."""
    x = gaussian_filter(d, blur) if blur > 0 else d
    h, w = x.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((x - x.mean()) * window)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    return power, fx, fy


def axis_share(d: np.ndarray, f: int, roll: float = 0.0, cone: float = 3.0) -> float:
    """Power of blur(d) within ``cone`` degrees of the axes turned by ``roll`` degrees (0: the photo's
    rows and columns; the face's roll: the crop's), frequencies from 4 cycles up to ``1/(2 f)``, over
    the share an isotropic texture would put there: > 1 means lines along those axes."""
    power, fx, fy = _power(d, max(f / 2, 0.5))
    radius = np.hypot(fx, fy)
    band = (radius >= 4 / min(d.shape)) & (radius <= 1 / (2 * f))
    angle = (np.degrees(np.arctan2(fy, fx)) - roll) % 90  # 0..90
    near = band & ((angle <= cone) | (angle >= 90 - cone))
    share = power[near].sum() / max(power[band].sum(), 1e-12)
    return float(share / (near.sum() / max(band.sum(), 1)))


def crop_peak(d: np.ndarray, crop_to_photo: np.ndarray) -> float:
    """Power at the canonical crop's pixel frequency (one cycle per crop pixel along each crop axis, in
    photo pixels: the rows of ``A^-1``, ``A = M[:, :2]``) over the mean power at that radius: >> 1 when
    the perturbation repeats with the crop's sampling lattice."""
    power, fx, fy = _power(d, 0.0)
    inverse = np.linalg.inv(np.asarray(crop_to_photo, np.float64)[:, :2])
    radius = np.hypot(fx, fy)
    step = 1.0 / min(d.shape)
    peaks = np.zeros(power.shape, bool)
    for kx, ky in (inverse[0], inverse[1]):
        for sign in (1, -1):
            peaks |= np.hypot(fx - sign * kx, fy - sign * ky) <= 1.5 * step
    target = float(np.hypot(*inverse[0]))
    ring = (np.abs(radius - target) <= 2 * step) & ~peaks
    return float(power[peaks].mean() / max(power[ring].mean(), 1e-12))


def settings_of(variant: str) -> cloak.CloakSettings:
    base = cloak.settings_for("high")
    return {
        "shipped": base,
        "no-eot": replace(base, eot_quality=None),
        "no-jitter": replace(base, diversity=0.0),
        "no-antialias": base,
        "ti-3": replace(base, smoothing=3),
        "coarse-2": cloak.settings_for("high", coarse=2),
    }[variant]


def strip(original: np.ndarray, cloaked: np.ndarray, d: np.ndarray, f: int, zoom: int) -> Image.Image:
    grey = np.repeat(d[..., None], 3, axis=2)
    diff = np.clip(128 + 8 * grey, 0, 255)
    soft = np.clip(128 + 16 * np.repeat(gaussian_filter(d, max(f / 2, 0.5))[..., None], 3, axis=2), 0, 255)
    panels = [original, cloaked, diff, soft]
    h = original.shape[0]
    gap = np.full((h, 4, 3), 255, np.uint8)
    row = np.concatenate([p for q in panels for p in (q.astype(np.uint8), gap)][:-1], axis=1)
    image = Image.fromarray(row)
    return image.resize((row.shape[1] * zoom, h * zoom), Image.Resampling.NEAREST) if zoom > 1 else image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", nargs="*", default=list(PHOTOS), help="paths under --shared")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("/tmp/grid_probe"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    size = crop_size_for(recognizers)
    names = [r.name for r in recognizers]
    print(
        "| photo | f | roll | variant | lat f | lat 8 | axis photo | axis crop | crop peak | face FLIP "
        "| CIEDE2000 | steps | sec | " + " | ".join(names) + " |"
    )
    print("|---" * (13 + len(names)) + "|")
    totals: dict[str, list[tuple[Lines, float, float, int]]] = {v: [] for v in args.variants}
    shipped_warp = cloak_photo.Warp
    for rel in args.photos:
        loaded = load_image(args.shared / rel)
        stem = Path(rel).stem
        for variant in args.variants:
            cloak_photo.Warp = (  # type: ignore[misc]
                partial(Warp, antialias=False) if variant == "no-antialias" else shipped_warp
            )
            try:
                start = time.perf_counter()
                result = cloak.cloak_image(
                    loaded,
                    recognizers=recognizers,
                    detector=detector,
                    mode=settings_of(variant),
                    largest=True,
                    seed=args.seed,
                )
                seconds = time.perf_counter() - start
            finally:
                cloak_photo.Warp = shipped_warp  # type: ignore[misc]
            written = save_image(result.image, loaded, args.out / f"{stem}_{variant}.png", format="PNG")
            report = verify(loaded, written, result, recognizers=recognizers, detector=detector)
            face = result.faces[0]
            region = face.visible_region
            assert region is not None
            f = Warp(face.site.crop_to_photo, loaded.rgb.shape, size).factor
            saved = load_image(written).rgb
            before, after = loaded.rgb[region.slices], saved[region.slices]
            d = after.astype(np.float32).mean(axis=2) - before.astype(np.float32).mean(axis=2)
            matrix = np.asarray(face.site.crop_to_photo, np.float64)
            roll = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
            inner = interior(d)
            lines = Lines(
                lattice(d, region.top, region.left, f),
                lattice(d, region.top, region.left, 8, within=f),
                axis_share(inner, f),
                axis_share(inner, f, roll),
                crop_peak(inner, matrix),
                roll,
            )
            v = visibility.measure(before, after)
            verdicts = {m.name: m for m in report.faces[0].models}
            totals[variant].append(
                (lines, v.flip, v.ciede2000_mean, sum(m.protected for m in verdicts.values()))
            )
            cells = " | ".join(
                f"{verdicts[n].after:.2f}{' P' if verdicts[n].protected else ''}" for n in names
            )
            print(
                f"| {stem} | {f} | {roll:.1f} | {variant} | {lines.lattice_f:.2f} | {lines.lattice_8:.2f} | "
                f"{lines.axis:.2f} | {lines.axis_crop:.2f} | {lines.crop_peak:.1f} | {v.flip:.4f} | "
                f"{v.ciede2000_mean:.2f} | {face.steps} | "
                f"{seconds:.0f} | {cells} |",
                flush=True,
            )
            for zoom in (1, 2):
                strip(before, after, d, f, zoom).save(args.out / f"{stem}_{variant}_{100 * zoom}.png")
            # A 160-pixel patch of cheek below the eye at 300%, small enough to look at in full.
            h, w = d.shape
            top, left = int(h * 0.45), int(w * 0.3)
            patch = (slice(top, top + 160), slice(left, left + 160))
            strip(before[patch], after[patch], d[patch], f, 3).save(args.out / f"{stem}_{variant}_detail.png")
    print(
        "\n| variant | lat f | lat 8 | axis photo | axis crop | crop peak | face FLIP | CIEDE2000 "
        "| protected (face x model) |"
    )
    print("|---" * 9 + "|")
    for variant, rows in totals.items():
        if not rows:
            continue
        mean = [float(np.mean([getattr(r[0], k) for r in rows])) for k in KEYS]
        print(
            f"| {variant} | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {mean[3]:.2f} | {mean[4]:.1f} | "
            f"{np.mean([r[1] for r in rows]):.4f} | {np.mean([r[2] for r in rows]):.2f} | "
            f"{sum(r[3] for r in rows)}/{len(rows) * len(names)} |"
        )
    print(f"strips and files: {args.out}")


if __name__ == "__main__":
    main()
