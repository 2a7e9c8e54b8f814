"""Latency and peak memory of ``cloak`` on this machine: a 1-face 1080p photo and a 12 MP photo.

Targets (DESIGN.md, "Performance targets"): at most 3 s median for the 1080p photo in the default mode on
2 CPU cores, and at most 1 GB peak memory for the 12 MP photo. This prints the figures; it asserts
nothing.

Each case runs in its own subprocess, so its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
is its own. The photos are skimage's astronaut (one face) scaled up and padded onto a 1920 x 1080 and a
4000 x 3000 canvas, saved as JPEG (quality 92). Per case it reports:

- ``cold``: the whole ``uncnn-rt cloak`` command in a fresh process (interpreter start, model loading,
  detection, attack, JPEG encode, verify), once;
- ``cloak``: :func:`uncnn_rt.runtime.cloak.cloak_image` alone with the models loaded (median of
  ``--runs``), i.e. what a server that keeps its sessions pays per photo;
- ``verify``: re-decode, re-detect, re-embed (median);
- the steps each run took (early stop), whether the white-box models were all past their thresholds,
  and CPU seconds next to wall seconds (CPU / wall near 2 means both cores were ours; far below 2, the
  machine was busy with other work and the wall figures overstate the cost).

Usage::

    .venv/bin/python bench/cloak_latency.py              # both cases, default mode, 3 runs
    .venv/bin/python bench/cloak_latency.py --mode high --runs 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"1080p": (1920, 1080, 1080), "12mp": (4000, 3000, 3000)}


def make_photo(case: str, folder: Path) -> Path:
    """The astronaut (512 x 512, one face) scaled to the canvas height and centred on a dark canvas."""
    from PIL import Image
    from skimage import data

    width, height, side = CASES[case]
    face = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (width, height), (40, 40, 48))
    canvas.paste(face, ((width - side) // 2, (height - side) // 2))
    path = folder / f"astronaut_{case}.jpg"
    canvas.save(path, quality=92)
    return path


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(case: str, mode: str, runs: int, device: str) -> dict[str, object]:
    """Run in a child process: cloak and verify ``runs`` times with the models loaded once."""
    from uncnn_rt.runtime import cloak
    from uncnn_rt.runtime.imageio import load_image, lossy_round_trip, save_image
    from uncnn_rt.runtime.verify import verify

    folder = Path(tempfile.mkdtemp(prefix="cloak_bench_"))
    path = make_photo(case, folder)
    start = time.perf_counter()
    recognizers = cloak.load_recognizers(device=device)
    detector = cloak.load_detector(device=device)
    load_seconds = time.perf_counter() - start
    cloak_wall, cloak_cpu, verify_wall, steps, protected = [], [], [], [], []
    for run in range(runs):
        loaded = load_image(path)
        wall, cpu = time.perf_counter(), time.process_time()
        saved = lossy_round_trip(loaded, fmt="JPEG")  # the cap holds on the JPEG as written, as in the CLI
        result = cloak.cloak_image(
            loaded, recognizers=recognizers, detector=detector, mode=mode, seed=run, saved=saved
        )
        out = save_image(result.image, loaded, folder / f"out_{run}.jpg")
        cloak_wall.append(time.perf_counter() - wall)
        cloak_cpu.append(time.process_time() - cpu)
        wall = time.perf_counter()
        report = verify(loaded, out, result, recognizers=recognizers, detector=detector)
        verify_wall.append(time.perf_counter() - wall)
        steps.append([f.steps for f in result.faces])
        protected.append(report.protected)
    return {
        "case": case,
        "size": f"{loaded.width}x{loaded.height}",
        "faces": len(result.faces),
        "load_s": round(load_seconds, 2),
        "cloak_s": round(statistics.median(cloak_wall), 2),
        "cloak_cpu_s": round(statistics.median(cloak_cpu), 2),
        "verify_s": round(statistics.median(verify_wall), 2),
        "steps": steps,
        "protected": protected,
        "ssim": round(report.ssim, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "photo": str(path),
    }


_RUN_CLI = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run([sys.executable, "-c", "from uncnn_rt.cli.app import main; main()", *sys.argv[1:]],
                      capture_output=True, text=True, check=False)
seconds = time.perf_counter() - start
print(done.returncode, seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
print(done.stderr[-2000:], file=sys.stderr)
"""


def cold_cli(photo: str, mode: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one ``uncnn-rt cloak`` command in a fresh process (measured by a
    wrapper process whose only child is the command, so no other process's peak is counted)."""
    out = Path(photo).with_name("cold.cloaked.jpg")
    args = ["--quiet", "cloak", photo, "--mode", mode, "-o", str(out), "--json"]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *args], capture_output=True, text=True, check=False
    )
    code, seconds, rss = done.stdout.split()
    if int(code) not in (0, 4):
        raise SystemExit(f"uncnn-rt cloak failed ({code}): {done.stderr.strip()}")
    return float(seconds), float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="mid")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="pin to this many CPU cores (taskset-like)")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.mode, args.runs, args.device)))
        return
    if args.threads:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    from uncnn_rt.runtime import zoo

    if not any(e.kind == "face" and e.in_default_ensemble for e in zoo.load_manifest()):
        raise SystemExit("no face recognizers are shipped; build the model zoo first")
    cores, load = len(os.sched_getaffinity(0)), os.getloadavg()[0]
    print(f"cloak latency, mode {args.mode}, {cores} CPU cores, load average {load:.1f}")
    print("targets: 1080p cloak <= 3 s median; 12 MP peak memory <= 1 GB\n")
    for case in args.cases:
        child = subprocess.run(
            [sys.executable, __file__, "--child", case, "--mode", args.mode, "--runs", str(args.runs),
             "--device", args.device],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if child.returncode != 0:
            print(f"{case}: failed\n{child.stderr.strip()[-2000:]}")
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        cold_s, cold_rss = cold_cli(str(row["photo"]), args.mode)
        print(
            f"{case:6s} {row['size']:>9s}  faces {row['faces']}  cloak {row['cloak_s']:.2f} s median "
            f"(cpu {row['cloak_cpu_s']:.2f} s)  verify {row['verify_s']:.2f} s  "
            f"model load {row['load_s']:.2f} s  "
            f"cold CLI {cold_s:.2f} s  peak RSS {row['peak_rss_mb']:.0f} MB (CLI {cold_rss:.0f} MB)  "
            f"steps {row['steps']}  protected {row['protected']}  SSIM {row['ssim']}"
        )


if __name__ == "__main__":
    main()
