"""A quick leave-one-out probe of one cloak recipe on the colour set: protection against visibility.

Runs ``uncnn-rt eval``'s protocol (runtime/evaluate/) on the first identities of
``../shared/faces/colour`` (``--limit`` photos, whole identities), as saved and after JPEG 75, with a
mode's settings changed by a JSON object of ``CloakSettings`` fields, and prints one JSON line: pooled
white-box and leave-one-out P1/P2 as ``[protected, eligible]`` and P3 as ``[unlinked, eligible]``, the
median (and worst) face FLIP and CIEDE2000 mean of the saved white-box cloaks, the same photos' JPEG
ladder, and seconds per photo.
``bench/RESULTS.md`` (run 15) lists the probes behind the modes' recipe.

Usage::

    .venv/bin/python bench/visibility_probe.py fine '{"coarse": 1.0, "scales": []}'
    .venv/bin/python bench/visibility_probe.py coarse '{"base": "mid"}' --limit 12
    .venv/bin/python bench/visibility_probe.py mid_s1 '{}' --limit 200 --seed 1
    .venv/bin/python bench/visibility_probe.py mid_groups '{}' --groups      # the group photos, white-box

One seed's pooled figures move with its draws (bench/RESULTS.md: the default's leave-one-out P1 over
seeds 0-3 spans 18 of 191 pairs with one draw sequence for every photo, run 24, and 10 with each photo's
own, run 25): compare recipes at several seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import cloak as c
from uncnn_rt.runtime import evaluate as ev
from uncnn_rt.runtime.imageio import load_image
from uncnn_rt.runtime.sessions import AttackSession

COLOUR = Path(__file__).resolve().parents[2] / "shared" / "faces" / "colour"


def far_pool(folder: Path, sessions: list[AttackSession]) -> dict[str, np.ndarray]:
    """Per recognizer, the unit mean embedding ``[K, D]`` of each of ``folder``'s K people (one
    sub-folder of aligned chips each, the whole image the face)."""
    people = sorted(p for p in folder.iterdir() if p.is_dir())
    means: dict[str, list[np.ndarray]] = {s.name: [] for s in sessions}
    for person in people:
        shots = [load_image(p) for p in sorted(person.iterdir()) if p.suffix.lower() in (".png", ".jpg")]
        if not shots:
            raise SystemExit(f"{person}: no .png or .jpg chips for the far-target pool")
        for s in sessions:
            mean = np.mean([c.target_embeddings(x, [s], None, no_align=True)[s.name] for x in shots], axis=0)
            means[s.name].append(mean / np.linalg.norm(mean))
    return {n: np.asarray(v, np.float32) for n, v in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("label", help="a name for the recipe in the output")
    parser.add_argument(
        "overrides", nargs="?", default="{}", help='CloakSettings fields as JSON; "base": a mode'
    )
    parser.add_argument("--limit", type=int, default=12, help="photos to cloak (whole identities)")
    parser.add_argument("--dataset", type=Path, default=COLOUR)
    parser.add_argument(
        "--seed", type=int, default=0, help="the cloak seed (jitter, EOT, scatter); another shows the noise"
    )
    parser.add_argument(
        "--models", default=None, help="comma-separated ensemble (default: the shipped default ensemble)"
    )
    parser.add_argument(
        "--ghosts", type=Path, default=None, help="ghost attack graphs (NAME.onnx) for the gradients"
    )
    parser.add_argument(
        "--far-pool",
        type=Path,
        default=None,
        help="folders of one person's photos each (e.g. ../shared/faces/dev/identities, not the scored "
        "set): the far-target pool of the recipe's far weight",
    )
    parser.add_argument(
        "--helpers",
        default=None,
        help="comma-separated recognizers that steer every cloak's gradients and gate none "
        "(cloak_image's helpers: no face waits for them)",
    )
    parser.add_argument(
        "--helper-weight",
        type=float,
        default=None,
        help="a helper's weight in the step's draw (default: the settings' helper_weight, 0.25)",
    )
    parser.add_argument(
        "--groups",
        action="store_true",
        help="cloak the dataset's group photos instead (photos/, every face, white-box only, as saved): "
        "per recognizer the faces past its threshold, and the faces' FLIP against their q75 re-encode's",
    )
    parser.add_argument(
        "--evaluators",
        default="all",
        help='comma-separated recognizers that score the cloaks ("all": every shipped face recognizer); '
        "those outside the ensemble are external",
    )
    args = parser.parse_args()
    overrides: dict[str, Any] = json.loads(args.overrides)
    base = c.MODES[overrides.pop("base", "mid")]
    if "scales" in overrides:
        overrides["scales"] = tuple(overrides["scales"])
    settings = replace(base, **overrides)

    data = ev.load_dataset(args.dataset)
    names = args.models.split(",") if args.models else c.default_recognizer_names()
    scorers = (
        [e.name for e in catalog.load_manifest() if e.kind == "face"]
        if args.evaluators == "all"
        else args.evaluators.split(",")
    )
    sessions = c.load_recognizers(list(dict.fromkeys(names + scorers)))
    detector = c.load_detector()
    ghosts = None
    if args.ghosts is not None:
        ghosts = {
            n: c.load_recognizers([str(args.ghosts / f"{n}.onnx")])[0]
            for n in names
            if (args.ghosts / f"{n}.onnx").is_file()
        }
    far_targets = None if args.far_pool is None else far_pool(args.far_pool, sessions)
    helpers = [] if args.helpers is None else c.load_recognizers(args.helpers.split(","))
    if args.helper_weight is not None:
        settings = replace(settings, helper_weight=args.helper_weight)
    start = time.perf_counter()
    if args.groups:
        print(json.dumps(groups(args, settings, sessions, names, detector, start)))
        return
    report = ev.evaluate(
        data,
        cloaks={
            args.label: ev.cloak_function(
                {s.name: s for s in sessions},
                settings,
                detector=detector,
                largest=True,
                seed=args.seed,
                ghosts=ghosts,
                far_targets=far_targets,
                helpers=helpers,
            )
        },
        embedders=ev.shipped_embedders(sessions),
        ensemble=names,
        finder=ev.detected_faces(detector),
        aligned=False,
        conditions=(ev.as_saved_condition(), ev.jpeg_condition(75)),
        limit=args.limit,
        samples=0,
    )
    d = report.to_dict()
    mode = d["modes"][0]
    out: dict[str, Any] = {"label": args.label, "overrides": args.overrides, "seed": args.seed}
    if helpers:
        out["helpers"] = {"names": [h.name for h in helpers], "weight": settings.helper_weight}
    out["probes"] = d["probes"]
    out["ladder"] = {
        q: (v["flip"]["median"], v["ciede2000_mean"]["median"]) for q, v in d["jpeg_ladder"].items()
    }
    out["ladder_over_jnd"] = {q: v["over_jnd"]["median"] for q, v in d["jpeg_ladder"].items()}
    for kind, summary in mode["summary"].items():
        out[kind] = {
            condition: {p: (r[p]["unlinked" if p == "p3" else "protected"], r[p]["of"]) for p in ev.PROTOCOLS}
            for condition, r in summary["conditions"].items()
        }
    # Per recognizer, P1 as saved when the cloak never saw it (leave-one-out, or external and not a
    # duplicate of a member, nor a helper that steered every cloak): with every recognizer scoring,
    # ensembles of different sizes compare on the same held-out models.
    unseen: dict[str, list[int]] = {}
    steered = {h.name for h in helpers}
    for row in mode["scores"]:
        if row["evaluator"] in steered:
            continue
        if row["kind"] == "leave-one-out" or (row["kind"] == "external" and row["independent"]):
            p1 = row["conditions"]["as_saved"]["p1"]
            unseen[row["evaluator"]] = [p1["protected"], p1["of"]]
    out["unseen_p1"] = unseen
    out["unseen_p1_pooled"] = [sum(v[0] for v in unseen.values()), sum(v[1] for v in unseen.values())]
    white = mode["quality"][0]["visibility"]
    out["face_flip"] = white["flip"]
    out["face_ciede2000_mean"] = white["ciede2000_mean"]
    out["face_over_jnd"] = white["over_jnd"]
    out["seconds_per_photo"] = [q["seconds_per_photo"] for q in mode["quality"]]
    out["wall"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


def groups(
    args: argparse.Namespace,
    settings: c.CloakSettings,
    sessions: list[AttackSession],
    names: list[str],
    detector: c.Detector,
    start: float,
) -> dict[str, Any]:
    """``uncnn-rt eval``'s group-photo report of one recipe: white-box, as saved, every face cloaked."""
    folder = ev.group_photos_folder(args.dataset)
    if folder is None:
        raise SystemExit(f"{args.dataset}: no photos/ folder of group photos")
    photos, warnings = ev.load_group_photos(folder)
    by_name = {s.name: s for s in sessions}
    report = ev.evaluate_group_photos(
        photos,
        cloak=ev.cloak_function(by_name, settings, detector=detector, seed=args.seed),
        embedders=[e for e in ev.shipped_embedders(sessions) if e.name in names],
        ensemble=names,
        finder=ev.detected_faces(detector),
        transfer=False,
        conditions=(ev.as_saved_condition(),),
    ).to_dict()
    q75 = report["jpeg_ladder"]["q75"]["flip"]["median"]
    white = report["quality"][0]["visibility"]["flip"]
    past = {
        row["evaluator"]: [row["conditions"]["as_saved"]["protected"][k] for k in ("protected", "of")]
        for row in report["scores"]
    }
    return {
        "label": args.label,
        "overrides": args.overrides,
        "seed": args.seed,
        "groups": {"photos": report["photos"], "faces": report["faces"], "warnings": warnings},
        "white-box": past,
        "white-box_pooled": [sum(v[0] for v in past.values()), sum(v[1] for v in past.values())],
        "face_flip": white,
        "q75_flip": q75,
        "face_flip_over_q75": round(white["median"] / q75, 4),
        "wall": round(time.perf_counter() - start, 1),
    }


if __name__ == "__main__":
    main()
