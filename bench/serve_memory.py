"""Resident memory of a real ``uncnn-rt serve`` process around one cloak of a photo (issue 25, item 6).

Starts ``uncnn-rt serve --device cpu`` on a free loopback port, reads its RSS idle, samples it every
50 ms while one ``POST /v1/cloak`` (mode low, 2 steps) runs, and reads it again 2 s after the answer;
prints the figures, the faces and the size of the ``X-Uncnn-Report`` header. Extra arguments go to
``uncnn-rt serve`` (e.g. ``--max-faces 60``).

    .venv/bin/python bench/serve_memory.py ../shared/faces/colour/photos/human_stock-group-1.jpg
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from serve_load import free_port, rss_mb


def main(photo: Path, extra: list[str]) -> None:
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("uncnn-rt")),
        "serve",
        "--device",
        "cpu",
        "--port",
        str(port),
    ]
    server = subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def rss() -> float:
        return rss_mb(server.pid)

    try:
        for _ in range(600):
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        time.sleep(1)
        idle = rss()
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.monotonic()
        response = httpx.post(
            url + "/v1/cloak",
            files={"image": (photo.name, photo.read_bytes())},
            data={"mode": "low", "steps": "2"},
            timeout=900,
        )
        seconds = time.monotonic() - start
        done.set()
        sampler.join()
        time.sleep(2)
        after = rss()
        header = response.headers.get("x-uncnn-report", "")
        faces = None
        if header:
            report = json.loads(header)
            faces = report["faces"] if report.get("truncated") else len(report.get("faces", []))
        print(
            f"status {response.status_code} in {seconds:.1f} s; faces {faces}; X-Uncnn-Report {len(header)} "
            f"bytes; RSS idle {idle:.0f} MB, peak {peak[0]:.0f} MB, 2 s after {after:.0f} MB"
        )
        if response.status_code != 200:
            print(response.text[:300])
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    if len(sys.argv) < 2 or not os.path.isfile(sys.argv[1]):
        sys.exit("usage: serve_memory.py PHOTO [serve options]")
    main(Path(sys.argv[1]), sys.argv[2:])
