"""The protection-visibility frontier of two versions of the cloak, measured in one run (issue 26).

For each ceiling (the photo's own JPEG q85 and q75 re-encodes, and 1.5, 2 and 3 times the q75 one),
``run`` cloaks the colour probe set (``bench/visibility_probe.py``: the first 12 photos of
``../shared/faces/colour``, 11 probes, 43 face-model pairs, white-box and leave-one-out, as saved and after
JPEG 75) with the default mode of this tree and of an older one (``--old``, a package folder as
``bench/cloak_versus.py`` builds it), each with only its cap changed, as ``--cap`` would, and appends one
JSON line per point to OUT. ``plot`` draws white-box and leave-one-out P1 against the median face FLIP
of each point, with the q85 and q75 re-encodes' FLIP marked.

Usage::

    git worktree add /tmp/oldmain 24eb81b
    mkdir -p /tmp/oldpkg/uncnn_rt && cp /tmp/oldmain/src/uncnn_rt/*.py /tmp/oldpkg/uncnn_rt/
    for d in runtime models cli converters serve; do
        ln -sfn /tmp/oldmain/$d /tmp/oldpkg/uncnn_rt/$d
    done
    .venv/bin/python bench/frontier.py run --old /tmp/oldpkg -o bench/results/frontier_run17.jsonl
    .venv/bin/python bench/frontier.py plot bench/results/frontier_run17.jsonl \
        -o bench/results/frontier_run17.png

Run 19 (pruning) against run 17's default (a123794 in the worktree)::

    .venv/bin/python bench/frontier.py run --old /tmp/old26/pkg -o bench/results/frontier_run19.jsonl
    .venv/bin/python bench/frontier.py plot bench/results/frontier_run19.jsonl \
        -o bench/results/frontier_run19.png --old-label "run 17 (a123794)" --new-label "pruned (run 19)"

Run 20 against the default before issue 26 (24eb81b, whose evaluation API predates this tree's probe,
so it runs its own)::

    .venv/bin/python bench/frontier.py run --old /tmp/old26/pkg \
        --old-probe /tmp/old26/wt/bench/visibility_probe.py -o bench/results/frontier_run20.jsonl
    .venv/bin/python bench/frontier.py plot bench/results/frontier_run20.jsonl \
        -o bench/results/frontier_run20.png --new-label "pruned, short faces too (run 20)"

About 1 minute per point and version on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLOUR = HERE.parents[1] / "shared" / "faces" / "colour"
CEILINGS = ((85, 1.0), (75, 1.0), (75, 1.5), (75, 2.0), (75, 3.0))


def run(old: Path | None, out: Path, old_probe: Path | None = None) -> None:
    versions = [("new", None, HERE / "visibility_probe.py")]
    if old is not None:
        versions.append(("old", old, old_probe or HERE / "visibility_probe.py"))
    for quality, scale in CEILINGS:
        for label, path, probe in versions:
            env = dict(os.environ)
            if path is not None:
                env["PYTHONPATH"] = str(path)
            fields = {"cap_jpeg": quality, "cap_scale": scale, "cap_ciede2000": None}
            done = subprocess.run(
                [sys.executable, str(probe), f"{label} q{quality} x{scale:g}", json.dumps(fields),
                 "--dataset", str(COLOUR)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            line = done.stdout.strip().splitlines()[-1]
            with out.open("a") as f:
                f.write(line + "\n")
            print(line, flush=True)


def plot(source: Path, out: Path, names: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind, title in zip(
        axes, ("white-box", "leave-one-out"), ("white-box P1", "leave-one-out P1"), strict=True
    ):
        for version, style in (("old", "s--"), ("new", "o-")):
            points = sorted(
                (r["face_flip"]["median"], _percent(r[kind]["as_saved"]["p1"]))
                for r in rows
                if r["label"].startswith(version)
            )
            if points:
                ax.plot(*zip(*points, strict=True), style, label=names[version])
        ladder = rows[0]["ladder"]
        for q in ("q85", "q75"):
            ax.axvline(ladder[q][0], color="grey", lw=0.8, ls=":")
            ax.text(ladder[q][0], 2, f" {q} re-encode", rotation=90, va="bottom", color="grey", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("median face FLIP of the saved cloaks")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("face-model pairs protected, % (as saved)")
    axes[0].legend(loc="lower right")
    fig.suptitle(
        "Colour probe set (11 probes, 43 pairs): protection against visibility, ceilings q85 .. 3x q75"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _percent(rate: list[int]) -> float:
    return 100.0 * rate[0] / max(rate[1], 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--old", type=Path, help="package folder of the older version (PYTHONPATH)")
    r.add_argument(
        "--old-probe",
        type=Path,
        help="the older version's own bench/visibility_probe.py, where this tree's no longer runs it "
        "(default: this tree's)",
    )
    r.add_argument("-o", "--out", type=Path, required=True)
    p = sub.add_parser("plot")
    p.add_argument("source", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--old-label", default="before (24eb81b)", help="legend of the older version")
    p.add_argument("--new-label", default="least visible (run 17)", help="legend of this tree's version")
    args = parser.parse_args()
    if args.command == "run":
        run(args.old, args.out, args.old_probe)
    else:
        plot(args.source, args.out, {"old": args.old_label, "new": args.new_label})


if __name__ == "__main__":
    main()
