"""A quick white-box probe of cloak recipes on the dev group photos (small faces, detected and aligned).

    python bench/group_probe.py '{}' '{"schedule": "constant", "step_size": 2.5}'

Cloaks every photo of ``../shared/faces/dev/photos`` with the default ensemble and counts, per
recognizer, the faces the attack left past its threshold (its own final check on the saved pixels,
before re-detection; ``uncnn-rt eval`` re-detects the written file). Each RECIPE is JSON: ``mode``
(default mid) and any CloakSettings field. Seconds are per photo.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from uncnn_rt.runtime import cloak
from uncnn_rt.runtime.imageio import load_image

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "faces" / "dev" / "photos"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipes", nargs="+", help="JSON objects: mode and CloakSettings fields")
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    args = parser.parse_args()
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    for text in args.recipes:
        fields = json.loads(text)
        base = cloak.MODES[fields.pop("mode", "mid")]
        settings = replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        passed = {r.name: 0 for r in recognizers}
        faces = steps = 0
        start = time.perf_counter()
        for photo in photos:
            result = cloak.cloak_image(
                load_image(photo), recognizers=recognizers, detector=detector, mode=settings, seed=0
            )
            for face in result.faces:
                faces += 1
                steps += face.steps
                for outcome in face.outcomes:
                    passed[outcome.name] += outcome.passed
        seconds = (time.perf_counter() - start) / max(len(photos), 1)
        counts = ", ".join(f"{name} {count}/{faces}" for name, count in passed.items())
        mean_steps = steps / max(faces, 1)
        print(f"{text}: {faces} faces, {seconds:.1f} s/photo, {mean_steps:.1f} steps; past: {counts}")


if __name__ == "__main__":
    main()
