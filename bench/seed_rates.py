"""The figures behind the tests' rates: how each randomised verdict varies with the seed.

A cloak's verdict is a draw of a randomised attack (alignment jitter, JPEG EOT, random starts), and
floating-point differences between machines move the draws, so the tests assert rates over fixed seeds
with a margin. This prints the figures those margins were chosen from (``tests/test_cloak.py``):

- ``astronaut``: the high mode on scikit-image's astronaut, verified from the written PNG, per seed:
  PROTECTED or not, and each recognizer's similarity after against its threshold.
- ``group``: the high mode on the dev group photos (``../shared/faces/dev/photos``), faces batched and
  one at a time: pairs verified PROTECTED, pairs protected in the loop, faces with the same verdict.
- ``linkability``: plain and scattered untargeted cloaks of two people on a 64-d linear recognizer:
  P1 and P3 per seed, and the weakest plain link / strongest scattered link against the threshold 0.5.
- ``capped``: two faces cloaked under a JPEG q75 cap by the linear test recognizers: the share of the
  cap each face spends, in FLIP and in CIEDE2000.

Usage::

    .venv/bin/python bench/seed_rates.py astronaut --seeds 0:30      # about 2 minutes on 2 cores
    .venv/bin/python bench/seed_rates.py group --seeds 0:2           # about 6 minutes
    .venv/bin/python bench/seed_rates.py linkability --seeds 0:12
    .venv/bin/python bench/seed_rates.py capped --seeds 0:10
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test fixtures the figures are of


def seed_range(text: str) -> range:
    start, _, stop = text.partition(":")
    return range(int(start), int(stop)) if stop else range(int(start), int(start) + 1)


def astronaut(seeds: range, work: Path) -> None:
    from skimage import data

    from uncnn_rt.runtime import cloak
    from uncnn_rt.runtime.cloak.verify import verify
    from uncnn_rt.runtime.imageio import load_image, save_image

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    loaded = load_image(buffer.getvalue(), name="astronaut.png")
    recognizers, detector = cloak.load_recognizers(device="cpu"), cloak.load_detector(device="cpu")
    protected, closest = 0, -np.inf
    for seed in seeds:
        result = cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, mode="high", seed=seed)
        written = save_image(result.image, loaded, work / f"astronaut.{seed}.png")
        report = verify(loaded, written, result, recognizers=recognizers, detector=detector)
        margins = {m.name: m.after - m.threshold for f in report.faces for m in f.models}
        protected += report.protected
        closest = max(closest, *margins.values())
        cells = ", ".join(f"{name} {margin:+.3f}" for name, margin in margins.items())
        verdict = "PROTECTED" if report.protected else "NOT PROTECTED"
        print(f"seed {seed:3d}: {verdict:13}  after - threshold: {cells}")
    print(f"astronaut, high: {protected} of {len(seeds)} seeds PROTECTED; closest model {closest:+.3f}")


def group(seeds: range, work: Path) -> None:
    import test_cloak as t

    from uncnn_rt.runtime import cloak
    from uncnn_rt.runtime.cloak.verify import verify
    from uncnn_rt.runtime.imageio import load_image, lossy_round_trip, save_image

    photos = sorted(t.DEV_PHOTOS.glob("*.jpg"))
    if not photos:
        sys.exit(f"{t.DEV_PHOTOS} holds no photos (the shared dev set)")
    recognizers, detector = cloak.load_recognizers(device="cpu"), cloak.load_detector(device="cpu")
    for seed in seeds:
        verified = {"batched": 0, "single": 0}
        in_loop = {"batched": 0, "single": 0}
        pairs = agree = faces = 0
        for path in photos:
            loaded = load_image(path)
            run = partial(
                cloak.cloak_image,
                loaded,
                recognizers=recognizers,
                detector=detector,
                mode=t.DEV_MODE,
                saved=lossy_round_trip(loaded, fmt="JPEG"),
                seed=seed,
            )
            results = {"batched": run(), "single": run(faces_per_batch=1)}
            agree += sum(
                a.passed == b.passed
                for a, b in zip(results["batched"].faces, results["single"].faces, strict=True)
            )
            faces += len(results["batched"].faces)
            for how, result in results.items():
                in_loop[how] += sum(o.passed for f in result.faces for o in f.outcomes)
                written = save_image(
                    result.image, loaded, work / f"{path.stem}.{how}.jpg", quality=result.output_quality
                )
                report = verify(loaded, written, result, recognizers=recognizers, detector=detector)
                verified[how] += sum(m.protected for f in report.faces for m in f.models)
                pairs += len([m for f in report.faces for m in f.models]) if how == "batched" else 0
        print(
            f"seed {seed}: verified PROTECTED batched {verified['batched']} and one at a time "
            f"{verified['single']} of {pairs} pairs; "
            f"in the loop {in_loop['batched']} and {in_loop['single']}; "
            f"{agree} of {faces} faces with the same verdict"
        )


def linkability(seeds: range, work: Path) -> None:
    from conftest import build_linear_face

    from uncnn_rt.runtime import cloak, evaluate
    from uncnn_rt.runtime.attacks import MIFGSM, Victim
    from uncnn_rt.runtime.sessions import AttackSession

    graph = build_linear_face(work / "f64.onnx", size=16, dim=64, seed=3, threshold=0.5)
    model = AttackSession(graph.path, device="cpu")
    rng = np.random.default_rng(0)
    people = [rng.uniform(40, 215, (16, 16, 3)) for _ in range(2)]
    photos = [np.clip(p[None] + rng.normal(0, 3, (5, 16, 16, 3)), 0, 255).round() for p in people]
    x = np.concatenate(photos).astype(np.float32)
    labels = np.repeat([0, 1], 5)
    same = labels[:, None] == labels[None, :]
    clean = model.features(x)
    attack = MIFGSM(eps=128, steps=40, momentum=1.0, random_start=True)
    directions = np.stack(
        [cloak.scatter_directions({"f": c}, cloak.scatter_rng(0, x[k], 0))["f"] for k, c in enumerate(clean)]
    )
    for seed in seeds:
        cells = []
        for name, steer in (("plain", None), ("scattered", -3.0 * directions)):
            features = attack(x, [Victim(model, clean, steer=steer)], quantize=True, seed=seed).features[
                model.name
            ]
            outcome = evaluate.run_protocols(clean, features, labels, 0.5, range(10))
            sims = features @ features.T
            np.fill_diagonal(sims, -np.inf)
            own = np.where(same, sims, -np.inf).max(axis=1)  # each photo's best link to its own person
            link = own.min() if name == "plain" else own.max()
            cells.append(
                f"{name}: P1 {outcome.protection('p1').hits}/10, "
                f"unlinked {outcome.protection('p3').hits}/10, "
                f"{'weakest' if name == 'plain' else 'strongest'} link {link:.3f}"
            )
        print(f"seed {seed:3d}: " + "; ".join(cells))


def capped(seeds: range, work: Path) -> None:
    import test_cloak as t
    from conftest import build_linear_face

    from uncnn_rt.runtime.sessions import AttackSession

    graphs = [
        build_linear_face(work / "linear_face.onnx"),
        build_linear_face(
            work / "linear_face_24.onnx", size=24, dim=6, seed=7, name="linear_face_24", threshold=0.4
        ),
    ]
    recognizers = [AttackSession(g.path, device="cpu") for g in graphs]
    loaded = t.loaded_photo()
    detector = t.FakeDetector([t.similarity(2.0, 0.0, 8.0, 40.0), t.similarity(3.0, 8.0, 90.0, 30.0)])
    for seed in seeds:
        result = t.run(loaded, recognizers, detector, **{**t.STRONG, "cap": "jpeg75"}, seed=seed)
        cells = [
            f"face {f.number}: FLIP {f.visibility.flip / f.limits.flip:.3f}, "
            f"CIEDE2000 {f.visibility.ciede2000_mean / f.limits.ciede2000:.3f} of the cap"
            for f in result.faces
            if f.visibility is not None and f.limits is not None
        ]
        print(f"seed {seed:3d}: " + "; ".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("figure", choices=("astronaut", "group", "linkability", "capped"))
    parser.add_argument("--seeds", type=seed_range, default=range(10), help="START:STOP (default 0:10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="uncnn-seed-rates-") as work:
        {"astronaut": astronaut, "group": group, "linkability": linkability, "capped": capped}[args.figure](
            args.seeds, Path(work)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
