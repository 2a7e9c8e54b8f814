"""A corpus of bad and awkward inputs against the real CLI and the real service, one row per case.

Every case runs the installed ``uncnn-rt`` (a subprocess, as a user runs it) or sends a request to a
real ``uncnn-rt serve`` on a free loopback port. Each row says what came back (exit code or HTTP
status), whether a traceback was printed (by the command, or in the server's log or answer), whether
every input file is byte for byte what it was, and what was left behind (a temporary file, a partial
output, or any file a failed command wrote). The run ends with the totals and exits 1 when there was a
traceback, an exit code above 4, a changed input, a leftover, or an answer other than the one expected.

The inputs are made on the spot from scikit-image's astronaut (nothing is read from ../shared):
truncated, corrupt, empty and mislabelled files, a decompression bomb, a photo without a face, CMYK,
16-bit, EXIF-rotated, grey, RGBA, an animated GIF (refused: one frame is cloaked, the others would be
lost), 1x1, a binary CSV, a CSV with an unknown label, a text file named ``.onnx``.

Usage::

    .venv/bin/python bench/bad_inputs.py                 # CLI and service, about 3 minutes on 2 cores
    .venv/bin/python bench/bad_inputs.py --only cli      # or: --only serve
    .venv/bin/python bench/bad_inputs.py --markdown      # the table as Markdown (for a note)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLI = [sys.executable, "-m", "uncnn_rt", "--device", "cpu", "-q"]
TEMPORARY = re.compile(r"(^\.|\.tmp|tmp\w*$|~$|\.part$)")
FAST = ["--mode", "low", "--steps", "3", "--seed", "0"]


@dataclass
class Row:
    case: str
    target: str
    got: str
    expected: str
    traceback: bool = False
    inputs_intact: bool = True
    leftovers: list[str] = field(default_factory=list)
    said: str = ""
    """The first line of the command's error output, or the service's ``detail``."""

    @property
    def ok(self) -> bool:
        return (
            re.fullmatch(self.expected, self.got) is not None
            and not self.traceback
            and self.inputs_intact
            and not self.leftovers
        )


# ---------------------------------------------------------------------------------------------------
# the inputs


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **params)
    return buffer.getvalue()


def make_inputs(folder: Path) -> None:
    from skimage import data

    folder.mkdir(parents=True)
    astronaut = data.astronaut()
    photo = Image.fromarray(astronaut)
    good_png, good_jpg = _png(astronaut), _jpeg(photo, quality=90)
    files: dict[str, bytes] = {
        "astronaut.png": good_png,
        "second.png": _png(astronaut[:, ::-1].copy()),
        "astronaut.jpg": good_jpg,
        "truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "truncated.png": good_png[: len(good_png) // 2],
        "corrupt.jpg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty.png": b"",
        "text.png": b"this is not an image\n",
        "flat.png": _png(np.full((256, 256, 3), 128, np.uint8)),
        "cmyk.jpg": _jpeg(photo.convert("CMYK"), quality=90),
        "grey.png": _png(astronaut, "L"),
        "rgba.png": _png(astronaut, "RGBA"),
        "tiny.png": _png(np.zeros((1, 1, 3), np.uint8)),
        "fake.onnx": b"not a model\n",
        "binary.csv": np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes(),
        "header_only.csv": b"path,label\n",
    }
    sixteen = Image.fromarray(astronaut[..., 0].astype(np.uint16) * 257)  # mode I;16
    buffer = io.BytesIO()
    sixteen.save(buffer, format="PNG")
    files["sixteen.png"] = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    files["exif_rotated.jpg"] = _jpeg(photo, quality=90, exif=exif)
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = buffer.getvalue()
    # A decompression bomb: 20000 x 20000 pixels declared (400 MP), a few hundred kB on disk.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    files["bomb.png"] = buffer.getvalue()
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    (folder / "unknown_label.csv").write_text(f"path,label\n{folder / 'astronaut.png'},not_a_class\n")
    (folder / "malformed.csv").write_text(f"path,label\n{folder / 'astronaut.png'}\n,,,\n")
    (folder / "good.csv").write_text(f"path,label\n{folder / 'astronaut.png'},0\n")
    for person, flip in (("ann", False), ("bob", True)):  # a tiny aligned data set for eval
        (folder / "eval" / person).mkdir(parents=True)
        face = astronaut[30:230, 125:325]
        for k in (1, 2):
            crop = face[:, ::-1] if flip else face
            (folder / "eval" / person / f"{k}.png").write_bytes(_png(np.ascontiguousarray(crop[k:, k:])))
    (folder / "link.onnx").symlink_to(Path(__file__).resolve().parents[1] / "models" / "faceres.onnx")


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    }


# ---------------------------------------------------------------------------------------------------
# the CLI


def cli_cases(inputs: Path, out: Path) -> list[tuple[str, list[str], str]]:
    """(case, arguments, expected exit code as a regular expression)."""
    i = inputs
    bad = [
        "truncated.jpg", "truncated.png", "corrupt.jpg", "empty.png", "text.png", "bomb.png", "flat.png",
        "tiny.png", "missing.png", "animated.gif",
    ]  # fmt: skip
    awkward = ["cmyk.jpg", "sixteen.png", "exif_rotated.jpg", "grey.png", "rgba.png"]  # cloaked as RGB
    cases: list[tuple[str, list[str], str]] = [
        ("cloak a good photo", ["cloak", str(i / "astronaut.png"), "-o", f"{out}/", *FAST], "0|4")
    ]
    cases += [(f"cloak {name}", ["cloak", str(i / name), "-o", f"{out}/", *FAST], "2") for name in bad]
    cases += [(f"cloak {name}", ["cloak", str(i / name), "-o", f"{out}/", *FAST], "0|4") for name in awkward]
    good = str(i / "astronaut.png")
    second = str(i / "second.png")

    def cloak(*args: str | Path) -> list[str]:
        return ["cloak", good, *map(str, args)]

    def augment(csv: str, to: str | Path) -> list[str]:
        return ["augment", "efficientnet_lite0", str(i / csv), "-o", str(to)]

    def convert(model: str, to: str | Path) -> list[str]:
        return ["convert", "grad", str(i / model), "-o", str(to)]

    robustness = ["robustness", "efficientnet_lite0", str(i / "good.csv"), "--eps", "1"]
    cases += [
        ("cloak -o /proc/x.png", cloak("-o", "/proc/x.png", *FAST), "2"),
        ("cloak -o under a file", cloak("-o", i / "astronaut.png" / "x.png", *FAST), "2"),
        ("cloak -o missing/x.png", cloak("-o", out / "missing" / "x.png", *FAST), "2"),
        ("cloak -o the input itself", cloak("-o", good, *FAST), "2"),
        ("cloak two inputs -o one.png", cloak(second, "-o", out / "one.png", *FAST), "2"),
        ("cloak a.png -o a.png/", cloak("-o", f"{good}/", *FAST), "2"),
        ("cloak -o x.txt", cloak("-o", out / "x.txt", *FAST), "2"),
        ("cloak --seed -1", cloak("-o", f"{out}/", "--mode", "low", "--seed", "-1"), "2"),
        ("cloak --eps 0", cloak("-o", f"{out}/", "--eps", "0"), "2"),
        ("cloak --steps 0", cloak("-o", f"{out}/", "--steps", "0"), "2"),
        ("cloak --mode nope", cloak("-o", f"{out}/", "--mode", "nope"), "2"),
        ("cloak --cap nope", cloak("-o", f"{out}/", "--cap", "nope"), "2"),
        ("cloak --models /etc/passwd", cloak("-o", f"{out}/", "--models", "/etc/passwd"), "2|3"),
        ("compare truncated.jpg", ["compare", str(i / "truncated.jpg"), good], "2"),
        ("compare flat.png (no face)", ["compare", str(i / "flat.png"), good], "2"),
        ("classify corrupt.jpg", ["classify", str(i / "corrupt.jpg")], "2"),
        ("convert grad missing.onnx", convert("missing.onnx", out / "m.onnx"), "2"),
        ("convert grad fake.onnx", convert("fake.onnx", out / "f.onnx"), "2|3"),
        ("convert grad -o /proc/x.onnx", convert("tiny_model.onnx", "/proc/x.onnx"), "2"),
        ("convert grad -o missing/x.onnx", convert("tiny_model.onnx", out / "missing" / "x.onnx"), "2"),
        ("augment binary.csv", augment("binary.csv", out / "a"), "2"),
        ("augment unknown label", augment("unknown_label.csv", out / "a"), "2"),
        ("augment malformed.csv", augment("malformed.csv", out / "a"), "2"),
        ("augment header-only csv", augment("header_only.csv", out / "a"), "2"),
        ("augment -o /proc/aug", augment("good.csv", "/proc/aug"), "2"),
        ("robustness --json /proc/r.json", [*robustness, "--json", "/proc/r.json"], "2"),
        ("eval --json /proc/r.json", ["eval", str(i / "eval"), "--aligned", "--json", "/proc/r.json"], "2"),
        ("eval --plots under a file", ["eval", str(i / "eval"), "--aligned", "--plots", f"{good}/p"], "2"),
        ("eval --seed -1", ["eval", str(i / "eval"), "--aligned", "--seed", "-1"], "2"),
        ("models verify", ["models", "verify"], "0"),
    ]  # fmt: skip
    return cases


def tiny_model(path: Path) -> None:
    """A 16-pixel, 3x3-convolution image model with 4 features: a valid source for ``convert grad``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["g"]),
            helper.make_node("Flatten", ["g"], ["out"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weights, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def first_line(text: str) -> str:
    """The first line that is not a note or progress, shortened for the table."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("note:")]
    said = lines[0] if lines else ""
    return said if len(said) <= 90 else said[:87] + "..."


def run_cli(work: Path) -> list[Row]:
    inputs, out = work / "in", work / "out"
    tiny_model(inputs / "tiny_model.onnx")
    before = snapshot(inputs)
    rows = []
    for case, args, expected in cli_cases(inputs, out):
        out.mkdir(exist_ok=True)
        seen_in = set(snapshot(inputs))
        proc = subprocess.run(
            [*CLI, *args], capture_output=True, text=True, cwd=work, timeout=600, stdin=subprocess.DEVNULL
        )
        code = proc.returncode
        written = [p for p in out.rglob("*")] + [inputs / p for p in set(snapshot(inputs)) - seen_in]
        failed = code not in (0, 4)
        leftovers = [str(p.relative_to(work)) for p in written if failed or TEMPORARY.search(p.name)]
        rows.append(
            Row(
                case,
                "cli",
                str(code),
                expected,
                traceback="Traceback" in proc.stderr + proc.stdout,
                inputs_intact=all(snapshot(inputs).get(k) == v for k, v in before.items()),
                leftovers=leftovers,
                said=first_line(proc.stderr),
            )
        )
        for p in [inputs / p for p in set(snapshot(inputs)) - seen_in]:  # a cloak written beside its input
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        shutil.rmtree(out)
    # The same truncated JPEG and PNG, ten times each: the process must end with exit 2 every time
    # (it once aborted with SIGABRT while the background model loading met interpreter shutdown).
    for name in ("truncated.jpg", "truncated.png"):
        codes = [
            subprocess.run(
                [*CLI, "cloak", str(inputs / name), *(["--json"] if run % 2 else [])],
                capture_output=True,
                text=True,
                timeout=300,
            ).returncode
            for run in range(10)
        ]
        got = ",".join(sorted({str(c) for c in codes}))
        rows.append(Row(f"cloak {name} x10 (5 with --json)", "cli", got, "2"))
    return rows


# ---------------------------------------------------------------------------------------------------
# the service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``uncnn-rt serve`` on loopback, its log collected, so that a case can ask what it printed."""

    def __init__(self, extra: list[str]) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [*CLI, "serve", "--port", str(self.port), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("uncnn-rt serve exited: " + "".join(self.log)) from None
                time.sleep(0.3)
        raise RuntimeError("uncnn-rt serve did not start in 120 s")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def raw_request(port: int, head: bytes, body: bytes, *, wait: float = 30.0) -> str:
    """Send bytes as they are (for bodies no client library would send) and return the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head + body)
        answer = sock.recv(65536).decode("latin-1")
    return answer.split(" ", 2)[1] if answer.startswith("HTTP/") else "no answer"


def run_serve(work: Path) -> list[Row]:
    import httpx

    inputs = work / "in"
    photo = (inputs / "astronaut.png").read_bytes()
    server = Server(["--max-concurrency", "1", "--timeout", "120"])
    rows: list[Row] = []
    try:
        http = httpx.Client(base_url=server.base, timeout=180)

        details: list[str] = []

        def case(name: str, expected: str, send: Callable[[], str]) -> None:
            mark, said = len(server.log), len(details)
            try:
                got = send()
            except httpx.HTTPError as exc:
                got = f"error: {type(exc).__name__}"
            printed = "".join(server.log[mark:])
            detail = first_line(details[-1]) if len(details) > said else ""
            rows.append(Row(name, "serve", got, expected, traceback="Traceback" in printed, said=detail))

        def answered(answer: httpx.Response, *, never_echo: str = "") -> str:
            """The status, with what is wrong with the answer besides (a traceback, an echoed value)."""
            try:
                detail = answer.json().get("detail", "") if answer.status_code != 200 else ""
            except ValueError:
                detail = answer.text[:200] if answer.status_code != 200 else ""
            details.append(str(detail))
            got = str(answer.status_code)
            if "Traceback" in answer.text:
                got += " (traceback)"
            if never_echo and never_echo in answer.text:
                got += " (echoed)"
            return got

        def cloak(files: dict[str, tuple[str, bytes, str]], data: dict[str, str]) -> str:
            return answered(http.post("/v1/cloak", files=files, data=data), never_echo=data.get("models", ""))

        def cloak_with(
            data: dict[str, str], payload: bytes = photo, name: str = "a.png"
        ) -> Callable[[], str]:
            return lambda: cloak(
                {"image": (name, payload, "image/png")}, {"mode": "low", "steps": "3", **data}
            )

        for name in ("truncated.jpg", "truncated.png", "corrupt.jpg", "empty.png", "text.png", "flat.png"):
            case(f"/v1/cloak {name}", "4\\d\\d", cloak_with({}, (inputs / name).read_bytes(), name))
        case("/v1/cloak bomb.png", "413", cloak_with({}, (inputs / "bomb.png").read_bytes(), "bomb.png"))
        case("/v1/cloak a good photo", "200", cloak_with({"seed": "0"}))
        for models in (
            "/etc/passwd",
            "/proc/self/environ",
            "../models/faceres.onnx",
            "%2Fetc%2Fpasswd",
            str(inputs / "link.onnx"),
            str(inputs / "missing.onnx"),
        ):
            case(f"/v1/cloak models={models}", "422", cloak_with({"models": models}))
        case(
            "/v1/compare models=/etc/passwd",
            "422",
            lambda: answered(
                http.post(
                    "/v1/compare",
                    files={"a": ("a.png", photo, "image/png"), "b": ("b.png", photo, "image/png")},
                    data={"models": "/etc/passwd"},
                ),
                never_echo="/etc/passwd",
            ),
        )
        for field_, value in (("seed", "-1"), ("eps", "0"), ("steps", "0"), ("mode", "nope"), ("cap", "x")):
            case(f"/v1/cloak {field_}={value}", "422", cloak_with({field_: value}))
        case(
            "/v1/cloak, a plain form, no upload",
            "415",
            lambda: answered(http.post("/v1/cloak", data={"mode": "low"})),
        )
        case(
            "/v1/cloak multipart without an image",
            "422",
            lambda: answered(http.post("/v1/cloak", files={"mode": (None, "low")})),
        )
        case(
            "/v1/cloak malformed multipart",
            "400",
            lambda: answered(
                http.post(
                    "/v1/cloak",
                    content=b"--x\r\nnot a part",
                    headers={"content-type": "multipart/form-data; boundary=x"},
                )
            ),
        )
        case(
            "/v1/cloak Content-Length 10 GB",
            "413",
            lambda: raw_request(
                server.port,
                b"POST /v1/cloak HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                b"Content-Length: 10000000000\r\n\r\n",
                b"--x\r\n",
            ),
        )

        def stalled_uploads() -> str:
            """Three uploads that stop after 200 bytes, then a good request: it must be computed."""
            head = (
                b"POST /v1/cloak HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                b"Content-Length: 100000\r\n\r\n"
            )
            stalled = []
            for _ in range(3):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(head + b"-" * 200)
                stalled.append(sock)
            time.sleep(1)
            try:
                return cloak_with({"seed": "0"})()
            finally:
                for sock in stalled:
                    sock.close()

        case("3 stalled uploads, then a good one", "200", stalled_uploads)

        def disconnected_job() -> str:
            """A client asks for 100000 steps and leaves after 3 s: the slot must come back quickly."""
            body = httpx.Request(
                "POST",
                f"{server.base}/v1/cloak",
                files={"image": ("a.png", photo, "image/png")},
                data={"mode": "low", "steps": "100000", "cap": "none"},
            )
            body.read()
            head = f"POST /v1/cloak HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body.content)}\r\n"
            head += f"Content-Type: {body.headers['content-type']}\r\n\r\n"
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(head.encode() + body.content)
            time.sleep(3)
            sock.close()
            start = time.monotonic()
            got = cloak_with({"seed": "0"})()
            return got if time.monotonic() - start < 60 else f"{got} after {time.monotonic() - start:.0f} s"

        case("client leaves a 100000-step job", "200", disconnected_job)
        case("/healthz", "200", lambda: str(http.get("/healthz").status_code))
        if server.process.poll() is not None:
            rows.append(Row("the server is still running", "serve", "exited", "running"))
    finally:
        server.stop()
    return rows


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=("cli", "serve"))
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uncnn-bad-inputs-"))
    try:
        make_inputs(work / "in")
        rows = []
        if args.only in (None, "cli"):
            rows += run_cli(work)
        if args.only in (None, "serve"):
            rows += run_serve(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(r.case) for r in rows)
    if args.markdown:
        print("| case | target | got | expected | traceback | inputs intact | leftovers | said |")
        print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            r.case.replace("|", "\\|") if args.markdown else r.case.ljust(width),
            r.target,
            r.got,
            r.expected.replace("|", " or "),
            "yes" if r.traceback else "no",
            "yes" if r.inputs_intact else "NO",
            ", ".join(r.leftovers) or "none",
            r.said.replace("|", "\\|") if args.markdown else r.said,
        ]
        line = "| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells)
        print(line + ("" if r.ok else "   <-- unexpected"))
    codes = [int(c) for r in rows if r.target == "cli" for c in r.got.split(",")]
    totals = {
        "cases": len(rows),
        "tracebacks": sum(r.traceback for r in rows),
        "exit codes above 4": sum(c > 4 for c in codes),
        "inputs changed": sum(not r.inputs_intact for r in rows),
        "leftovers": sum(bool(r.leftovers) for r in rows),
        "unexpected answers": sum(not r.ok for r in rows),
    }
    print(", ".join(f"{k}: {v}" for k, v in totals.items()))
    return 0 if totals["unexpected answers"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
