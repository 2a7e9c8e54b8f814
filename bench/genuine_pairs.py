"""How close one person's photos come to one another, per recognizer: the dev chips against the colour set.

The cloak's ``--aim others`` divides each threshold by the dev set's 95th percentile of same-person
similarities (``dev.genuine_p95`` in the manifest). This prints, per default recognizer, that figure and
the same-person similarities of ``../shared/faces/colour/identities`` (every pair, and each photo's
nearest other photo of the same person, which is what P1 of ``uncnn-rt eval`` holds against a cloak),
so the two sets can be compared (``bench/RESULTS.md``, run 31).

Usage::

    .venv/bin/python bench/genuine_pairs.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import cloak as c
from uncnn_rt.runtime.imageio import load_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "faces"
QUANTILES = (0.5, 0.9, 0.95, 1.0)


def embeddings(root: Path, recognizers: list, detector: c.Detector | None) -> tuple[dict, np.ndarray]:
    """Per recognizer ``[N, D]`` unit embeddings of every photo under ``root/<person>/``, and the labels
    (photos without a face are left out)."""
    feats: dict[str, list[np.ndarray]] = {r.name: [] for r in recognizers}
    labels = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(person.iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            try:
                e = c.target_embeddings(load_image(path), recognizers, detector, no_align=detector is None)
            except c.NoFaceError:
                continue
            for r in recognizers:
                feats[r.name].append(e[r.name])
            labels.append(person.name)
    return {n: np.asarray(v) for n, v in feats.items()}, np.asarray(labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faces", type=Path, default=SHARED, help="the folder holding dev/ and colour/")
    args = parser.parse_args()
    recognizers = catalog.load_recognizers(None, device="cpu")
    sets = {
        "dev": embeddings(args.faces / "dev" / "identities", recognizers, None),
        "colour": embeddings(args.faces / "colour" / "identities", recognizers, c.load_detector()),
    }
    print("quantiles of same-person similarities: " + " / ".join(f"q{q * 100:g}" for q in QUANTILES))
    for r in recognizers:
        rho = catalog.genuine_similarity(r)
        print(f"{r.name}: threshold {r.info.threshold:.3f}, manifest genuine_p95 {rho}")
        for name, (feats, labels) in sets.items():
            sims = feats[r.name] @ feats[r.name].T
            same = labels[:, None] == labels[None, :]
            np.fill_diagonal(same, False)
            nearest = np.where(same, sims, -2.0).max(axis=1)
            pairs = " / ".join(f"{np.quantile(sims[same], q):.3f}" for q in QUANTILES)
            near = " / ".join(f"{np.quantile(nearest, q):.3f}" for q in QUANTILES)
            print(f"  {name:6s} {len(labels):3d} photos  every pair {pairs}  nearest same person {near}")


if __name__ == "__main__":
    main()
