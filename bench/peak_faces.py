"""Where a cloak shows, face by face: the share of face pixels changed past twice their JND, per recipe.

FLIP and the CIEDE2000 mean pool a face's error by its mean, so a change concentrated on a few features
can score as low as the photo's own JPEG q75 re-encode while it shows as streaks. This script cloaks a
few faces with each recipe (``mid`` with CloakSettings fields replaced, as ``bench/visibility_probe.py``
takes them) and prints, per face and recipe, the figures of the saved cloak on the face region and
those of the q75 re-encode beside them, above all the share of pixels whose luminance changed by more
than twice its just-noticeable difference (``over 2 JND``, :func:`uncnn_rt.runtime.visibility.over_jnd`).
It saves one strip per face: the original and each recipe's cloak, and below them each change x8
around grey, at 100% (``NAME_100.png``) and the faces alone at 200% (``NAME_200.png``).

The faces: the registry photos of ``bench/mode_strips.py`` (the astronaut, Grace Hopper, the small
Grace Hopper) and, when ``../shared`` is beside the repository, four colour-set faces: smooth young skin
(compreface 007_B), dark skin (Colin Powell 0001), a beard (insightface_RD d1) and a face of a family
photo (Family1-Mom 1). Strips of ``../shared`` faces stay out of the repository.

Usage::

    .venv/bin/python bench/peak_faces.py -o /tmp/peaks mid='{}' eps16='{"eps": 16, "step_size": 4}'
    .venv/bin/python bench/peak_faces.py -o /tmp/peaks mid='{}' helped='{"helpers": ["sface", "openface"]}'
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from mode_strips import photos
from numpy.typing import NDArray
from PIL import Image

from uncnn_rt.runtime import cloak, visibility
from uncnn_rt.runtime.imageio import LoadedImage, load_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "faces" / "colour" / "identities"
SHARED_FACES = {
    "007_B": "compreface_B/007_B.jpg",
    "powell": "Colin_Powell/Colin_Powell_0001.jpg",
    "rd_d1": "insightface_RD/d1.jpg",
    "family_mom": "Family1-Mom/Family1-Mom1.jpg",
}


def faces() -> dict[str, tuple[LoadedImage, int | None]]:
    """Name -> (photo, the face to cloak: an index, or None for the largest)."""
    out: dict[str, tuple[LoadedImage, int | None]] = dict(photos())
    if SHARED.is_dir():
        out.update({name: (load_image(SHARED / path), None) for name, path in SHARED_FACES.items()})
    else:
        print(f"{SHARED} is absent: the registry faces only")
    return out


def save_strips(out: Path, name: str, original: NDArray[np.uint8], shown: list[NDArray[np.uint8]]) -> None:
    """``NAME_100.png``: the original and each changed face side by side, each change x8 around grey
    below; ``NAME_200.png``: the faces alone at 200% (nearest neighbour)."""
    changes = [
        np.clip(128 + 8 * (face.astype(np.float32) - original), 0, 255).astype(np.uint8) for face in shown
    ]
    top = np.concatenate([original, *shown], axis=1)
    bottom = np.concatenate([np.full_like(original, 128), *changes], axis=1)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(out / f"{name}_100.png")
    Image.fromarray(top).resize((2 * top.shape[1], 2 * top.shape[0]), Image.Resampling.NEAREST).save(
        out / f"{name}_200.png"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "recipes",
        nargs="+",
        help='LABEL=JSON: CloakSettings fields replaced on mid; "helpers": a list of recognizers that steer',
    )
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    recipes = []
    for text in args.recipes:
        label, _, overrides = text.partition("=")
        fields = json.loads(overrides or "{}")
        helpers = cloak.load_recognizers(fields.pop("helpers")) if "helpers" in fields else []
        recipes.append((label, replace(cloak.MODES["mid"], **fields), helpers))
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (loaded, index) in faces().items():
        shown = []
        original = None
        for label, settings, helpers in recipes:
            result = cloak.cloak_image(
                loaded,
                recognizers=recognizers,
                detector=detector,
                mode=settings,
                face=index,
                largest=index is None,
                helpers=helpers,
            )
            face = result.faces[0]
            region = face.visible_region
            assert region is not None and face.visibility is not None
            original, cloaked = loaded.rgb[region.slices], result.image[region.slices]
            q75 = visibility.region_ladder(loaded.rgb, region, (75,))[75]
            v = face.visibility
            print(
                f"{name:10s} {label:10s} face {region.height:4d} px  FLIP {v.flip:.4f} (q75 {q75.flip:.4f})  "
                f"CIEDE2000 {v.ciede2000_mean:.2f} p95 {v.ciede2000_p95:.2f} (q75 {q75.ciede2000_mean:.2f} "
                f"p95 {q75.ciede2000_p95:.2f})  over 2 JND {100 * v.over_jnd:.1f}% (q75 "
                f"{100 * q75.over_jnd:.1f}%)  protected {face.passed}{', short' if face.short else ''}",
                flush=True,
            )
            shown.append(cloaked)
        assert original is not None
        save_strips(args.out, name, original, shown)


if __name__ == "__main__":
    main()
