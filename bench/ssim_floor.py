"""What the SSIM floor's search costs inside real cloaks: SSIM evaluations per hold and the slack left.

Cloaks the 1080p one-face photo of ``bench/cloak_latency.py`` (default mode, seeds 0..N-1) with every
evaluation of the attack's float32 SSIM counted. Per hold that had to shrink the perturbation it
reports how many evaluations the search took and how far the kept image's SSIM ended above the floor
(the unused share of the budget); holds that found the iterate feasible cost one evaluation and are
counted apart. Prints figures; asserts nothing.

Usage::

    .venv/bin/python bench/ssim_min.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cloaks (seeds 0..runs-1)")
    parser.add_argument("--mode", default="mid")
    args = parser.parse_args()

    from uncnn_rt.runtime import cloak
    from uncnn_rt.runtime.attacks import base
    from uncnn_rt.runtime.imageio import load_image

    sys.path.insert(0, str(Path(__file__).parent))
    from cloak_latency import make_photo

    calls = [0]
    fast = base._SsimTo.fast

    def counted(self: base._SsimTo, s: np.ndarray, idx: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return fast(self, s, idx)

    holds: list[tuple[int, float]] = []
    hold = base._Budget._hold

    def measured(
        self: base._Budget, delta: np.ndarray, error: object, target: float, exponent: float
    ) -> np.ndarray:
        before = calls[0]
        out = hold(self, delta, error, target, exponent)  # type: ignore[arg-type]
        if calls[0] == before or self._ssim is None or self.ssim_min is None:
            return out  # the exact check, or a hold of another constraint
        final = fast(self._ssim, self.shown(out), np.arange(out.shape[0]))
        holds.append((calls[0] - before, float(final.min() - self.ssim_min)))
        return out

    base._SsimTo.fast = counted  # type: ignore[method-assign]
    base._Budget._hold = measured  # type: ignore[method-assign]
    photo = load_image(make_photo("1080p", Path(tempfile.mkdtemp(prefix="ssim_bench_"))))
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    for seed in range(args.runs):
        cloak.cloak_image(photo, recognizers=recognizers, detector=detector, mode=args.mode, seed=seed)

    shrunk = [h for h in holds if h[0] > 1]
    evaluations = [h[0] for h in shrunk]
    slack = [h[1] for h in shrunk]
    print(f"SSIM floor, mode {args.mode}, {args.runs} cloaks of the 1080p photo")
    print(f"holds: {len(holds)} ({len(holds) - len(shrunk)} already feasible: 1 evaluation each)")
    if shrunk:
        print(
            f"holds that shrank: {len(shrunk)}; evaluations mean {statistics.mean(evaluations):.1f}, "
            f"max {max(evaluations)}; SSIM above the floor: median {statistics.median(slack):.4f}, "
            f"max {max(slack):.4f}"
        )


if __name__ == "__main__":
    main()
