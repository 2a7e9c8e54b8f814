"""The default cloak's time on the bench's 1080p photo, for comparing two versions of the code in one run.

It times :func:`uncnn_rt.runtime.cloak.cloak_image` as ``bench/cloak_latency.py`` does (models loaded,
two seeds) and prints one line. Run it alternately against this tree and an older checkout, e.g. the
code before the visibility cap (commit 404a53c, whose package sat in ``uncnn_rt/`` at the top level)::

    git worktree add /tmp/old 404a53c
    mkdir -p /tmp/oldpkg/uncnn_rt && cp /tmp/old/uncnn_rt/__init__.py /tmp/oldpkg/uncnn_rt/
    for d in runtime models cli converters; do ln -sfn /tmp/old/$d /tmp/oldpkg/uncnn_rt/$d; done
    for k in 1 2; do
        .venv/bin/python bench/cloak_versus.py new
        PYTHONPATH=/tmp/oldpkg .venv/bin/python bench/cloak_versus.py old
    done

Where the code has a lossy round trip (the visibility cap's), the cap is held on the JPEG as written,
as ``uncnn-rt cloak`` does.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cloak_latency import make_photo

from uncnn_rt.runtime import cloak, imageio


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "this"
    path = make_photo("1080p", Path(tempfile.mkdtemp(prefix="cloak_versus_")))
    recognizers, detector = cloak.load_recognizers(), cloak.load_detector()
    loaded = imageio.load_image(path)
    extra = {}
    if hasattr(imageio, "lossy_round_trip"):
        extra["saved"] = imageio.lossy_round_trip(loaded, fmt="JPEG")
    times = []
    for seed in range(2):
        start = time.perf_counter()
        result = cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, seed=seed, **extra)
        times.append(time.perf_counter() - start)
    print(
        f"{label}: cloak {', '.join(f'{t:.2f}' for t in times)} s, steps {result.faces[0].steps}, "
        f"protected {result.passed}"
    )


if __name__ == "__main__":
    main()
