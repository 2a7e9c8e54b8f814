"""A quick leave-one-out probe of a cloak recipe: minutes instead of the full ``uncnn-rt eval``.

    python bench/loo_probe.py fr_feature '{}' '{"coarse": 4, "eps": 16, "step_size": 2.5}'
    python bench/loo_probe.py mobilefacenet '{"mode": "mid", "coarse": 1}' --chips 8

Cloaks every fifth dev chip (``--chips`` of them, one per identity first) with the default ensemble
*minus* HELD (``cloak --no-align``), then reports, per recipe: seconds per chip, mean SSIM, how many
(chip, white-box model) pairs end past their threshold, and the held-out model's mean cosine between the
cloaked and the clean chip, with how many chips fall under its threshold. The held-out similarity is a
finer signal than the protection rate on few chips: it moves long before a chip crosses the threshold.
Each RECIPE is JSON: ``mode`` (low, mid, high; default mid), ``targeted`` (move towards the dev chip of
another identity that is farthest from this one in the ensemble's view), ``extra`` (also attack the
``--extra`` attack graphs, e.g. intermediate-layer victims, except those built from HELD: their names
start with HELD's), and any CloakSettings field.
Use ``uncnn-rt eval`` (or ``bench/eval_dev.py run``) for the figures that go into the README.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from uncnn_rt.runtime.cloak import MODES, cloak_image, default_recognizer_names, load_recognizers
from uncnn_rt.runtime.geometry.faces import crop_size_for, embed, find_faces
from uncnn_rt.runtime.imageio import load_image
from uncnn_rt.runtime.sessions import open_session
from uncnn_rt.runtime.visibility import image_quality

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "faces" / "dev" / "identities"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("held", help="the recognizer left out of the ensemble and scored")
    parser.add_argument("recipes", nargs="+", help="JSON objects: mode, targeted, CloakSettings fields")
    parser.add_argument("--chips", type=int, default=8)
    parser.add_argument("--dev", type=Path, default=DEV)
    parser.add_argument("--extra", type=Path, nargs="*", default=[], help="more attack graphs")
    args = parser.parse_args()

    names = default_recognizer_names()
    if args.held not in names:
        raise SystemExit(f"held must be one of {names}")
    sessions = {r.name: r for r in load_recognizers(names, device="cpu")}
    ensemble = [sessions[n] for n in names if n != args.held]
    held = sessions[args.held]
    extras = [open_session(path, device="cpu") for path in args.extra]
    extras = [e for e in extras if not e.name.startswith(args.held)]
    everything = sorted(args.dev.glob("*/*.png"))
    chips = everything[::5][: args.chips]
    others = everything[2::5]
    size = crop_size_for(list(sessions.values()))

    def embedding(rgb: np.ndarray, models: list[Any]) -> dict[str, np.ndarray]:
        site = find_faces(rgb, None, size=size, no_align=True, name="chip")[0]
        return embed(rgb, site, models)

    for text in args.recipes:
        fields = json.loads(text)
        mode, targeted = fields.pop("mode", "mid"), fields.pop("targeted", False)
        victims = ensemble + extras if fields.pop("extra", False) else ensemble
        settings = replace(
            MODES[mode], **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        )
        rows = []
        start = time.perf_counter()
        for chip in chips:
            loaded = load_image(chip)
            target = None
            if targeted:
                mine = embedding(loaded.rgb, ensemble)
                candidates = [
                    embedding(load_image(o).rgb, ensemble) for o in others if o.parent != chip.parent
                ]
                target = min(candidates, key=lambda e: sum(float(e[n] @ mine[n]) for n in mine))
            result = cloak_image(
                loaded, recognizers=victims, mode=settings, no_align=True, seed=0, target=target
            )
            ssim, _ = image_quality(loaded.rgb, result.image)
            clean = embedding(loaded.rgb, [held])[held.name]
            after = embedding(result.image, [held])[held.name]
            rows.append((ssim, sum(o.passed for o in result.faces[0].outcomes), float(clean @ after)))
        seconds = (time.perf_counter() - start) / len(chips)
        threshold = held.info.threshold or 0.0
        print(
            f"held={held.name} {text}: {seconds:.1f} s/chip, SSIM {np.mean([r[0] for r in rows]):.3f}, "
            f"white-box past threshold {sum(r[1] for r in rows)}/{len(victims) * len(chips)}, "
            f"held-out similarity {np.mean([r[2] for r in rows]):.3f} (threshold {threshold:.3f}), "
            f"held-out protected {sum(r[2] < threshold for r in rows)}/{len(chips)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
