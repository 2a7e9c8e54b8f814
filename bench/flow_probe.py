"""How far a warp that adds no texture moves the recognizers: a geometric cloak probe (issue 26).

The default cloak adds a change to the pixels; what a person sees of it is texture (streaks and creases
on smooth skin, ``bench/peak_faces.py``). A spatial flow (Xiao et al., "Spatially Transformed
Adversarial Examples", ICLR 2018) moves the face's own pixels instead: each pixel is resampled
(bilinearly) a fraction of a canonical-crop pixel away, along a smooth field, so nothing that was not in
the photo appears in it. This script asks what such a warp buys against the shipped ensemble: for each
face of ``bench/peak_faces.py`` and each largest displacement (``--most``, in canonical-crop pixels), it
ascends the ensemble's untargeted loss in the flow field (the pixel gradient times the image's own
spatial gradient at the displaced point, on a Gaussian basis ``--sigma`` crop pixels wide, with
momentum, the modes' alignment jitter and JPEG EOT, each step on the recognizers still short of their
margin), stops at the first check past every threshold by 0.05, and shrinks the flow to the least share
that stays past it. It prints, on the face region of the file saved as JPEG q95, FLIP, CIEDE2000 mean
and the share of pixels past twice their JND beside the photo's own q75 re-encode, and each recognizer's
similarity minus its threshold (negative: no longer matched), and saves strips as ``peak_faces.py``
does (original, warped, change x8; ``NAME_100.png``, ``NAME_200.png``).

With ``--cloak MODE`` each warped photo is then cloaked by ``MODE`` (lossless, seed 0), aimed away from
the clean photo's embeddings rather than the warped photo's (the warp's own move is banked): the line
says the same figures of the warped and cloaked face against the clean photo, whether every recognizer
is past its threshold by 0.05 there (at the face as first found); the strips then show the warped and
cloaked face. ``bench/peak_faces.py`` gives the mode alone on the same faces.

Usage::

    .venv/bin/python bench/flow_probe.py -o /tmp/flow --most 1 2 4
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from peak_faces import faces, save_strips
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates

from uncnn_rt.runtime import cloak, visibility
from uncnn_rt.runtime.arrays import Float32Array, Uint8Array
from uncnn_rt.runtime.attacks import Ensemble, Victim
from uncnn_rt.runtime.cloak import photo as cloak_photo
from uncnn_rt.runtime.cloak.regions import (
    CropMap,
    crop_scale,
    face_mask,
    region_box,
    visible_region,
)
from uncnn_rt.runtime.geometry.faces import crop_size_for, embed, features_of, sites_from_detections
from uncnn_rt.runtime.geometry.warp import Warp
from uncnn_rt.runtime.imageio import LoadedImage
from uncnn_rt.runtime.sessions import AttackSession

MARGIN = 0.05
CHECK_EVERY = 6


class _Face:
    """One face of the probe: its crop, the ensemble's loss on it, and the flow field on its region."""

    def __init__(
        self, rgb: Uint8Array, index: int | None, recognizers: list[AttackSession], detector: Any, size: int
    ) -> None:
        height, width = rgb.shape[:2]
        sites = sites_from_detections(detector.detect(rgb), size)
        self.site = sites[index] if index is not None else max(sites, key=lambda s: s.area)
        warp = Warp(self.site.crop_to_photo, (height, width), size)
        self.reach = region_box(warp, height, width)
        self.scale = crop_scale(warp)
        self.rgb, self.size, self.recognizers = rgb, size, recognizers
        self.reference = embed(rgb, self.site, recognizers)
        victims = [Victim(r, self.reference[r.name][None], name=r.name) for r in recognizers]
        self.ensemble = Ensemble(
            victims, 1, (size, size), targeted=False, input_map=CropMap(warp, self.reach)
        )
        self.mask = face_mask(warp, self.reach, 0.1)
        self.source = rgb.astype(np.float32)
        self.slopes = (np.gradient(self.source, axis=0), np.gradient(self.source, axis=1))
        rows, cols = np.mgrid[self.reach.top : self.reach.bottom, self.reach.left : self.reach.right]
        self.rows, self.cols = rows.astype(np.float32), cols.astype(np.float32)
        self.visible = visible_region(self.site, self.reach, rgb.shape)

    def sample(self, values: Float32Array, flow: Float32Array) -> Float32Array:
        """``values`` ``[H, W, 3]`` read bilinearly at the region's pixels moved by ``flow`` ``[2, h, w]``."""
        at = [self.rows + flow[0], self.cols + flow[1]]
        return np.stack(
            [map_coordinates(values[..., c], at, order=1, mode="nearest") for c in range(3)], axis=-1
        )

    def warped(self, flow: Float32Array) -> Uint8Array:
        photo = self.rgb.copy()
        photo[self.reach.slices] = np.clip(np.rint(self.sample(self.source, flow)), 0, 255).astype(np.uint8)
        return photo

    def gaps(self, photo: Uint8Array) -> dict[str, float]:
        """Each recognizer's similarity to the clean face minus its threshold (negative: not matched)."""
        crop = Warp(self.site.crop_to_photo, photo.shape, self.size).apply(photo)[None]
        return {
            r.name: float(features_of(r, crop)[0] @ self.reference[r.name]) - float(r.info.threshold or 0.0)
            for r in self.recognizers
        }

    def past(self, photo: Uint8Array) -> bool:
        return all(g < -MARGIN for g in self.gaps(photo).values())

    def attack(self, most: float, args: argparse.Namespace) -> tuple[Float32Array, int]:
        """The flow, at most ``most`` crop pixels long, shrunk to its least share past the margin when it
        gets there; and the steps taken."""
        rng = np.random.default_rng(0)
        # The default mode's own alignment jitter and JPEG EOT, as its attack draws them.
        draws = cloak_photo._attack(cloak.MODES[cloak.DEFAULT_MODE])
        jitter, eot = draws.diversity, draws.eot
        flow = np.zeros((2, *self.rows.shape), np.float32)
        velocity = np.zeros_like(flow)
        shares = None
        taken = 0
        for taken in range(1, args.steps + 1):
            image = self.sample(self.source, flow)[None]
            grad = self.ensemble.gradient(image, rng, diversity=jitter, eot=eot, shares=shares).grad[0]
            moved = [(grad * self.sample(s, flow)).sum(axis=-1) * self.mask for s in self.slopes]
            moved = np.stack([gaussian_filter(m, max(1.0, args.sigma * self.scale)) for m in moved])
            velocity += moved / (np.abs(moved).mean() + 1e-12)
            flow += args.step * self.scale * velocity / (np.abs(velocity).max() + 1e-12)
            length = np.hypot(flow[0], flow[1])
            flow *= np.minimum(1.0, most * self.scale * self.mask / np.maximum(length, 1e-9))
            if taken % CHECK_EVERY == 0:
                gaps = self.gaps(self.warped(flow))
                if all(g < -MARGIN for g in gaps.values()):
                    low, share = 0.0, 1.0
                    for _ in range(6):
                        trial = (low + share) / 2
                        low, share = (low, trial) if self.past(self.warped(flow * trial)) else (trial, share)
                    return flow * share, taken
                # Each step on the recognizers still short of their margin.
                shares = {k: np.array([1.0 if g >= -MARGIN else 0.05], np.float32) for k, g in gaps.items()}
        return flow, taken


def cloaked(
    loaded: LoadedImage, warped: Uint8Array, recognizers: list[AttackSession], detector: Any, mode: str
) -> Uint8Array:
    """``warped`` cloaked by ``mode``, aimed away from ``loaded``'s clean embeddings: the cloak takes each
    face's reference from the photo it is given, so for the warped photo it is handed the clean one's."""
    own = cloak_photo.embed

    def clean(image: Uint8Array, site: Any, models: Any) -> dict[str, Float32Array]:
        return own(loaded.rgb if image is warped else image, site, models)

    cloak_photo.embed = clean  # type: ignore[assignment]
    try:
        result = cloak.cloak_image(
            replace(loaded, rgb=warped), recognizers=recognizers, detector=detector, mode=mode, largest=True
        )
    finally:
        cloak_photo.embed = own  # type: ignore[assignment]
    return result.image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument(
        "--most", type=float, nargs="+", default=[1.0, 2.0], help="largest displacement, crop pixels"
    )
    parser.add_argument("--sigma", type=float, default=1.0, help="the flow's smoothness, crop pixels")
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--step", type=float, default=0.15, help="the largest move per step, crop pixels")
    parser.add_argument("--cloak", help="then cloak the warped photo with this mode (e.g. mid)")
    args = parser.parse_args()
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    size = crop_size_for(recognizers)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (loaded, index) in faces().items():
        face = _Face(loaded.rgb, index, recognizers, detector, size)
        visible = face.visible
        q75 = visibility.region_ladder(loaded.rgb, visible, (75,))[75]
        original = loaded.rgb[visible.slices]
        shown = []
        for most in args.most:
            flow, taken = face.attack(most, args)
            buffer = io.BytesIO()
            Image.fromarray(face.warped(flow)).save(buffer, "JPEG", quality=95)
            saved = np.asarray(Image.open(buffer).convert("RGB"))
            after = saved[visible.slices]
            flip, de = visibility.colour_difference(original, after)
            over = visibility.over_jnd(original, after)
            gaps = face.gaps(saved)
            longest = float(np.hypot(flow[0], flow[1]).max()) / face.scale
            print(
                f"{name:10s} most {most:g}  longest {longest:.2f} crop px  face {visible.height:4d} px  "
                f"FLIP {flip:.4f} (q75 {q75.flip:.4f})  CIEDE2000 {de:.2f} (q75 {q75.ciede2000_mean:.2f})  "
                f"over 2 JND {100 * over:.1f}% (q75 {100 * q75.over_jnd:.1f}%)  steps {taken}  "
                f"past by {MARGIN:g}: {all(g < -MARGIN for g in gaps.values())}  "
                + " ".join(f"{k} {g:+.3f}" for k, g in gaps.items()),
                flush=True,
            )
            if args.cloak:
                pixels = cloaked(loaded, face.warped(flow), recognizers, detector, args.cloak)
                after = pixels[visible.slices]
                flip, de = visibility.colour_difference(original, after)
                over = visibility.over_jnd(original, after)
                gaps = face.gaps(pixels)
                print(
                    f"{name:10s} most {most:g} + {args.cloak}  FLIP {flip:.4f} (q75 {q75.flip:.4f})  "
                    f"CIEDE2000 {de:.2f}  over 2 JND {100 * over:.1f}%  past by "
                    f"{MARGIN:g}: {all(g < -MARGIN for g in gaps.values())}  "
                    + " ".join(f"{k} {g:+.3f}" for k, g in gaps.items()),
                    flush=True,
                )
            shown.append(after)
        save_strips(args.out, name, original, shown)


if __name__ == "__main__":
    main()
