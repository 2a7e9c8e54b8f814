"""Before/after strips of one colour face per mode, at 100% and 200%, for the README.

The face is scikit-image's astronaut (NASA, public domain; the photo the ``[demo]`` extra ships), so the
strips can be committed; strips of ``../shared`` faces come from ``uncnn-rt eval --plots`` and stay out
of the repository. Each mode cloaks the 512 x 512 portrait as ``uncnn-rt cloak`` would (PNG, lossless);
the strip shows the face region (box + a quarter of its side) original / cloaked / difference x10, and
the script prints each mode's face FLIP and CIEDE2000 next to the portrait's own JPEG ladder.

Usage::

    .venv/bin/python bench/mode_strips.py -o bench/results/modes_astronaut
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from skimage import data

from uncnn_rt.runtime import cloak, visibility
from uncnn_rt.runtime.evaluate import Sample
from uncnn_rt.runtime.evaluate.plots import face_strip
from uncnn_rt.runtime.imageio import load_image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("bench/results/modes_astronaut"))
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    loaded = load_image(buffer.getvalue(), name="astronaut.png")
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    samples = []
    region = None
    for mode in cloak.MODES:
        result = cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, mode=mode)
        face = result.faces[0]
        region = face.visible_region
        assert region is not None and face.visibility is not None
        crop = (loaded.rgb[region.slices], result.image[region.slices])
        samples.append(Sample(mode, *crop, face.visibility.ssim))
        similarities = ", ".join(f"{o.name} {o.similarity:.2f}" for o in face.outcomes)
        print(
            f"{mode}: face FLIP {face.visibility.flip:.4f}, CIEDE2000 {face.visibility.ciede2000_mean:.2f} "
            f"(p95 {face.visibility.ciede2000_p95:.2f}), SSIM {face.visibility.ssim:.4f}; {similarities}; "
            f"protected {result.passed}"
        )
    assert region is not None
    for q, v in visibility.region_ladder(loaded.rgb, region).items():
        print(
            f"JPEG q{q}: face FLIP {v.flip:.4f}, CIEDE2000 {v.ciede2000_mean:.2f} (p95 {v.ciede2000_p95:.2f})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for zoom in (1, 2):
        path = face_strip(
            samples, args.out / f"astronaut_modes_{100 * zoom}.png", zoom=zoom, height=region.height
        )
        print(f"strip: {path}")


if __name__ == "__main__":
    main()
