"""Hashes of what the cloak and the attack loop write, to check that a refactor changed nothing.

Run it at two revisions and compare the lines (equal lines: bit-identical outputs)::

    .venv/bin/python bench/output_hashes.py > after.txt
    git stash; .venv/bin/python bench/output_hashes.py > before.txt; git stash pop
    diff before.txt after.txt

Cases: a ``mid`` cloak of the astronaut's face (scikit-image's sample), two MIFGSM runs on its crop
that between them take every branch of the loop (coarse grids, chroma 0.5, cosine steps, one victim per
step, success margins, an SSIM floor), and ``high`` cloaks with refinement rounds of the first two
group photos of ``../shared/faces/dev/photos`` when that folder is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from uncnn_rt.runtime import cloak
from uncnn_rt.runtime.attacks import MIFGSM, Victim
from uncnn_rt.runtime.imageio import load_image

GROUPS = Path(__file__).resolve().parents[2] / "shared" / "faces" / "dev" / "photos"


def digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:16]


def older_names(options: dict[str, object], fields: set[str]) -> dict[str, object]:
    """``options`` spelled as an older revision's attack loop names them (before issue 20 unified
    ssim_floor into ssim_min and focus_margin into success_margin), so both revisions run one case."""
    renamed = {"ssim_min": "ssim_floor", "success_margin": "focus_margin"}
    return {(renamed[k] if k not in fields and k in renamed else k): v for k, v in options.items()}


def main() -> None:
    recognizers = cloak.load_recognizers(device="cpu")
    detector = cloak.load_detector(device="cpu")
    face = np.ascontiguousarray(data.astronaut()[:256, 96:352])
    encoded = io.BytesIO()
    Image.fromarray(face).save(encoded, "PNG")
    result = cloak.cloak_image(
        load_image(encoded.getvalue(), name="astronaut"), recognizers=recognizers, detector=detector,
        mode="mid", seed=7, steps=6,
    )  # fmt: skip
    print("cloak astronaut mid", digest(result.image), [f.steps for f in result.faces])
    crops = np.asarray(Image.fromarray(face).resize((224, 224)), np.float32)[None]
    victims = [Victim(s, s.features(crops), name=s.name) for s in recognizers]
    variants: dict[str, dict[str, object]] = {
        "coarse+chroma+cosine+sampling": dict(
            coarse=4.0, scales=(8.0,), chroma=0.5, schedule="cosine", schedule_floor=0.3, random_start=True,
            momentum=1.0, victims_per_step=1, success_margin=0.05,
        ),
        "grey+ssim": dict(chroma=0.0, ssim_min=0.9, ssim_every=2),
    }  # fmt: skip
    fields = {f.name for f in dataclasses.fields(MIFGSM)}
    for label, options in variants.items():
        run = MIFGSM(eps=8, steps=5, **older_names(options, fields))(crops, victims, seed=3)
        print("attack", label, digest(run.images), run.steps.tolist())
    if not GROUPS.is_dir():
        print(f"skip group photos: {GROUPS} is absent", file=sys.stderr)
        return
    for path in sorted(GROUPS.iterdir())[:2]:
        result = cloak.cloak_image(
            load_image(path), recognizers=recognizers, detector=detector, mode="high", seed=5, steps=4
        )
        print("cloak", path.name, "high", digest(result.image), [f.steps for f in result.faces])


if __name__ == "__main__":
    main()
