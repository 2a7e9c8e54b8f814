"""Before/after strips of colour faces per mode, at 100% and 200%, for the README.

The faces come with registry packages, so the strips can be committed (strips of ``../shared`` faces
come from ``uncnn-rt eval --plots`` and stay out of the repository):

- ``astronaut``: scikit-image's astronaut (NASA, public domain; the photo the ``[demo]`` extra ships),
  smooth skin, a 512 x 512 portrait;
- ``hopper``: matplotlib's Grace Hopper (US Navy, public domain), wrinkled skin and glasses;
- ``small``: the two portraits side by side at a third of their size, two faces of about 60 pixels
  (a small face as in a group photo; the strip shows Grace Hopper's).

Each mode cloaks each photo as ``uncnn-rt cloak`` would (PNG, lossless, every face, seed 0). A strip
shows one face region (box + a quarter of its side) per mode, left to right low, mid, high: original /
cloaked / difference x10. The script prints each mode's face FLIP, CIEDE2000 and share of pixels changed
past twice their JND next to the photo's own JPEG ladder on the same region.

Usage::

    .venv/bin/python bench/mode_strips.py -o bench/results/mode_strips
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from matplotlib import cbook
from PIL import Image
from skimage import data

from uncnn_rt.runtime import cloak, visibility
from uncnn_rt.runtime.evaluate import Sample
from uncnn_rt.runtime.evaluate.plots import face_strip
from uncnn_rt.runtime.imageio import LoadedImage, load_image


def photos() -> dict[str, tuple[LoadedImage, int]]:
    """Name -> (the photo as ``uncnn-rt cloak`` would load it from a PNG, the face the strip shows)."""
    astronaut = Image.fromarray(data.astronaut())
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    small = Image.new("RGB", (350, 200), (128, 128, 128))
    small.paste(astronaut.resize((171, 171), Image.Resampling.LANCZOS), (0, 29))
    small.paste(hopper.resize((171, 200), Image.Resampling.LANCZOS), (179, 0))

    def png(image: Image.Image, name: str) -> LoadedImage:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return load_image(buffer.getvalue(), name=name)

    # Faces are numbered left to right: the small Grace Hopper is the second.
    return {
        "astronaut": (png(astronaut, "astronaut.png"), 0),
        "hopper": (png(hopper, "hopper.png"), 0),
        "small": (png(small, "small.png"), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("bench/results/mode_strips"))
    args = parser.parse_args()
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    for name, (loaded, shown) in photos().items():
        samples = []
        region = None
        for mode in cloak.MODES:
            result = cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, mode=mode)
            for face in result.faces:
                assert face.visibility is not None
                print(
                    f"{name} face {face.number} {mode}: face FLIP {face.visibility.flip:.4f}, CIEDE2000 "
                    f"{face.visibility.ciede2000_mean:.2f} (p95 {face.visibility.ciede2000_p95:.2f}), "
                    f"over 2 JND {100 * face.visibility.over_jnd:.1f}%, SSIM {face.visibility.ssim:.4f}; "
                    + ", ".join(f"{o.name} {o.similarity - (o.threshold or 0):+.3f}" for o in face.outcomes)
                    + f"; protected {face.passed}{', short' if face.short else ''}"
                )
            face = result.faces[shown]
            region = face.visible_region
            assert region is not None and face.visibility is not None
            crop = (loaded.rgb[region.slices], result.image[region.slices])
            samples.append(Sample(mode, *crop, face.visibility.ssim))
        assert region is not None
        for q, v in visibility.region_ladder(loaded.rgb, region).items():
            print(
                f"{name} face {shown + 1} JPEG q{q}: face FLIP {v.flip:.4f}, "
                f"CIEDE2000 {v.ciede2000_mean:.2f} (p95 {v.ciede2000_p95:.2f}), "
                f"over 2 JND {100 * v.over_jnd:.1f}%"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        for zoom in (1, 2):
            path = face_strip(
                samples, args.out / f"{name}_modes_{100 * zoom}.png", zoom=zoom, height=region.height
            )
            print(f"strip: {path}")


if __name__ == "__main__":
    main()
