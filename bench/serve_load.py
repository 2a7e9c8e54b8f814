"""A bounded load test of ``uncnn-rt serve`` on loopback: more clients than the server takes at once.

It starts the real command (``uncnn-rt serve``, uvicorn, one worker process) on a free loopback port,
then ``--clients`` threads send ``--requests`` cloak requests in all, each thread sending its next request
as soon as its last one is answered (no back-off: the queue stays full, so the 503 path is exercised as
hard as the cloak path). Every answer is checked:

- 200: a decodable image of the input's size, changed by at most eps, with a verification report header
  naming every recognizer;
- 503: a JSON ``detail`` and a ``Retry-After``;
- anything else, a connection error, or no answer within ``--request-timeout`` counts as lost.

Meanwhile the server's resident memory is sampled (``/proc/PID/status``, the process and its children).
It prints the counts, throughput, p50/p95 latency per outcome and peak RSS, and exits 1 when a request
was lost or wrong, or the peak RSS passed ``--max-rss-mb``. Latency figures are the machine's: run it on a
quiet machine, and compare runs made on the same one.

Usage::

    .venv/bin/python bench/serve_load.py                                  # 200 requests, 16 clients
    .venv/bin/python bench/serve_load.py --requests 400 --clients 32 --max-concurrency 2 --queue 4
    .venv/bin/python bench/serve_load.py --mode mid --steps 0             # the mode's own step count
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Answer:
    outcome: str  # "image", "busy" or "lost"
    seconds: float
    why: str = ""


def face_photo() -> bytes:
    """The scikit-image astronaut's face, 180 x 180 PNG (sent with no_align: one face, no detection)."""
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(data.astronaut()[40:220, 135:315])).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its direct children (uvicorn worker processes), in MB."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.is_file():
        pids += [int(p) for p in children.read_text().split()]
    total = 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            continue
    return total


def check_image(response: httpx.Response, original: np.ndarray, eps: float, models: int) -> str:
    """Why a 200 is wrong, or '' when it is a proper cloak."""
    try:
        cloaked = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=int)
        report = json.loads(response.headers["x-uncnn-report"])
    except Exception as exc:  # a broken answer is a finding, not a crash of the bench
        return f"unreadable answer ({type(exc).__name__}: {exc})"
    if cloaked.shape != original.shape:
        return f"image of shape {cloaked.shape}, sent {original.shape}"
    change = int(np.abs(cloaked - original).max())
    if change > eps:
        return f"a pixel changed by {change} > eps {eps}"
    checks = report["faces"][0]["models"]
    if len(checks) != models:
        return f"report names {len(checks)} models, expected {models}"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--queue", type=int, default=None, help="server queue (default: its own, 4 x)")
    parser.add_argument("--mode", default="low")
    parser.add_argument("--steps", type=int, default=4, help="attack steps per cloak (0: the mode's)")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--max-rss-mb", type=float, default=1024.0)
    args = parser.parse_args()

    photo = face_photo()
    original = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"), dtype=int)
    form = {"mode": args.mode, "no_align": "true", "seed": "0"}
    if args.steps:
        form["steps"] = str(args.steps)
    port = free_port()
    command = [
        sys.executable, "-m", "uncnn_rt", "--device", "cpu", "serve", "--port", str(port),
        "--max-concurrency", str(args.max_concurrency), "--timeout", str(args.request_timeout / 2),
    ]  # fmt: skip
    if args.queue is not None:
        command += ["--queue", str(args.queue)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(process.pid))
            time.sleep(0.1)

    try:
        with httpx.Client(base_url=base, timeout=args.request_timeout) as http:
            for _ in range(600):
                try:
                    health = http.get("/healthz").json()
                    break
                except httpx.TransportError:
                    if process.poll() is not None:
                        print(process.stderr.read() if process.stderr else "", file=sys.stderr)
                        return 1
                    time.sleep(0.1)
            else:
                print("the server did not start within 60 s", file=sys.stderr)
                return 1
            info = http.get("/v1/models").json()
            eps = info["modes"][args.mode]["eps"]
            models = sum(m["cloaks_by_default"] for m in info["models"])
            idle_rss = rss_mb(process.pid)
            threading.Thread(target=sample, daemon=True).start()

            def one(_: int) -> Answer:
                start = time.perf_counter()
                try:
                    r = http.post("/v1/cloak", files={"image": ("face.png", photo, "image/png")}, data=form)
                except httpx.HTTPError as exc:
                    return Answer("lost", time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
                seconds = time.perf_counter() - start
                if r.status_code == 200:
                    why = check_image(r, original, eps, models)
                    return Answer("lost" if why else "image", seconds, why)
                if r.status_code == 503 and r.headers.get("retry-after", "").isdigit() and r.json()["detail"]:
                    return Answer("busy", seconds)
                return Answer("lost", seconds, f"status {r.status_code}: {r.text[:200]}")

            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                answers = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
            done.set()
            served = http.get("/healthz").json()["served"]
    finally:
        done.set()
        process.terminate()
        process.wait(60)

    by = {kind: [a.seconds for a in answers if a.outcome == kind] for kind in ("image", "busy", "lost")}
    print(
        f"uncnn-rt serve --max-concurrency {args.max_concurrency} --queue {health['queue']}: "
        f"{args.requests} cloak requests from {args.clients} clients, mode {args.mode}"
        f"{f', {args.steps} steps' if args.steps else ''}, a 180x180 face (no_align), loopback, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"answered in {wall:.1f} s: {len(by['image'])} images, {len(by['busy'])} 503s, {len(by['lost'])} lost"
    )
    print(f"throughput: {len(by['image']) / wall:.2f} cloaks/s, {len(answers) / wall:.1f} answers/s")
    for kind, label in (("image", "200 image"), ("busy", "503 busy")):
        if by[kind]:
            q = statistics.quantiles(by[kind], n=20) if len(by[kind]) > 1 else [by[kind][0]] * 19
            print(f"latency {label}: p50 {statistics.median(by[kind]):.3f} s, p95 {q[18]:.3f} s")
    print(f"server RSS: {idle_rss:.0f} MB idle, peak {peak[0]:.0f} MB (bound {args.max_rss_mb:.0f} MB)")
    print(f"server counted {served} served jobs")
    failures = [a.why for a in answers if a.outcome == "lost"]
    for why in sorted(set(failures))[:10]:
        print(f"LOST: {why}", file=sys.stderr)
    ok = not failures and peak[0] <= args.max_rss_mb and served == len(by["image"])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
