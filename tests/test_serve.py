"""``uncnn-rt serve``: every endpoint through FastAPI's TestClient; a live uvicorn for load and shutdown.

The server runs the shipped models on real faces (the scikit-image astronaut, and the dev chips when
``../shared`` is there); cloaks use the ``low`` mode with a few steps, mostly on a face crop with
``no_align`` (no detection, no refinement), to keep the file to some tens of seconds.
"""

from __future__ import annotations

import base64
import builtins
import io
import json
import logging
import math
import os
import re
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from skimage import data
from test_imageio import png_bytes
from typer.testing import CliRunner

pytest.importorskip(
    "fastapi", reason="the [serve] extra (fastapi, uvicorn, python-multipart) is not installed"
)
import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from uncnn_rt import serve as server
from uncnn_rt.cli.app import app as cli_app
from uncnn_rt.runtime import catalog, cloak

SHARED_CHIPS = Path(__file__).resolve().parents[2] / "shared" / "faces" / "dev" / "identities"
CHEAP = {"mode": "low", "steps": "3", "no_align": "true"}


# ---------------------------------------------------------------------------------------------------
# images and servers


def encode(array: NDArray[np.uint8], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def decode(blob: bytes) -> NDArray[np.uint8]:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


ASTRONAUT = data.astronaut()
FACE = np.ascontiguousarray(ASTRONAUT[40:220, 135:315])  # the astronaut's face, 180 x 180


@pytest.fixture(scope="module")
def models() -> server.Models:
    names = {e.name for e in catalog.load_manifest() if e.path.is_file()}
    if "blazeface" not in names or not cloak.default_recognizer_names():
        pytest.skip("the model zoo does not ship the detector and the default recognizers")
    return server.load_models(server.ServeConfig(device="cpu"))


def client_for(models: server.Models, **config: Any) -> TestClient:
    return TestClient(server.create_app(server.ServeConfig(device="cpu", **config), models=models))


@pytest.fixture(scope="module")
def client(models: server.Models) -> Iterator[TestClient]:
    with client_for(models) as c:
        yield c


@contextmanager
def live_server(app: FastAPI, *, grace: int = 60) -> Iterator[tuple[str, uvicorn.Server]]:
    """The app under a real uvicorn on a free loopback port, in a thread; stopped (gracefully) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace, access_log=False)
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if instance.started or not thread.is_alive():
            break
        time.sleep(0.1)
    assert instance.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", instance
    finally:
        instance.should_exit = True
        thread.join(120)
        sock.close()


def upload(blob: bytes, name: str = "face.png", field: str = "image") -> dict[str, tuple[str, bytes, str]]:
    return {field: (name, blob, "application/octet-stream")}


def multipart(files: dict[str, Any], form: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart body and its Content-Type, as httpx would send them."""
    request = httpx.Request("POST", "http://x/", files=files, data=form or {})
    return request.read(), request.headers["content-type"]


def raw_socket(url: str, head: dict[str, str], body: bytes = b"", path: str = "/v1/cloak") -> socket.socket:
    """A connection to the live server that sent ``head`` and ``body`` (perhaps only part of its
    Content-Length): to stall an upload or leave without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in head.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the answer on ``sock`` (read until the server closes it or the JSON
    body is complete)."""
    data = b""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        if body:
            try:
                return int(head.split()[1]), json.loads(body)
            except ValueError:
                pass
        chunk = sock.recv(65536)
        if not chunk:
            return int(head.split()[1]), json.loads(body)
        data += chunk


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether ``condition()`` came true within ``seconds`` (polled every 0.1 s)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def group_photo(rows: int = 2, columns: int = 3) -> NDArray[np.uint8]:
    """The astronaut at 256 x 256, tiled: a group photo of ``rows * columns`` faces."""
    small = np.asarray(Image.fromarray(ASTRONAUT).resize((256, 256), Image.Resampling.LANCZOS))
    return np.concatenate([np.concatenate([small] * columns, axis=1)] * rows, axis=0)


# ---------------------------------------------------------------------------------------------------
# read-only endpoints and the page


def test_healthz_reports_the_queue(client: TestClient) -> None:
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert (body["running"], body["waiting"], body["max_concurrency"], body["queue"]) == (0, 0, 1, 4)
    assert (body["uploading"], body["uploads"]) == (0, 10)  # 2 x (max_concurrency + queue)


def test_healthz_counts_results_and_errors_apart(models: server.Models) -> None:
    """``served`` counted every job, errors included: a photo without a face was one more "served"."""
    with client_for(models) as fresh:
        assert fresh.post("/v1/classify", files=upload(encode(FACE))).status_code == 200
        blank = encode(np.full((200, 200, 3), 128, np.uint8))
        no_face = fresh.post("/v1/cloak", files=upload(blank), data={"mode": "low"})
        assert no_face.status_code == 422  # a job that found no face
        assert fresh.post("/v1/cloak", files=upload(encode(FACE)), data={"mode": "x"}).status_code == 422
        health = fresh.get("/healthz").json()
        assert (health["served"], health["failed"]) == (1, 1)  # the bad form never became a job


def test_models_lists_the_manifest_modes_and_limits(client: TestClient, models: server.Models) -> None:
    body = client.get("/v1/models").json()
    assert [m["name"] for m in body["models"]] == [e.name for e in catalog.load_manifest()]
    in_use = {m["name"] for m in body["models"] if m["cloaks_by_default"]}
    assert in_use == {r.name for r in models.recognizers}
    assert set(body["modes"]) == set(cloak.MODES)
    assert body["modes"]["low"]["eps"] == cloak.MODES["low"].eps
    assert body["limits"] == {
        "max_upload_mb": 20.0,
        "max_megapixels": 24.0,
        "timeout_s": 120.0,
        "read_timeout_s": 10.0,
        "max_faces": 20,
    }
    shipped_faces = {e.name for e in catalog.load_manifest() if e.kind == "face" and e.path.is_file()}
    assert set(body["recognizers"]) == shipped_faces


def test_the_modes_are_described_in_words_with_the_recipe_apart(client: TestClient) -> None:
    """The page's mode caption was the recipe ("eps 16, 18 steps, visible at most as JPEG q75, CIEDE2000
    <= 1.3"); it now says what a mode gives and costs, and the recipe sits under "Advanced"."""
    modes = client.get("/v1/models").json()["modes"]
    for name, mode in modes.items():
        words = mode["summary"]
        assert len(words) > 40, name
        assert not re.search(r"eps|CIEDE|SSIM|\bq\d|steps|<=", words), (name, words)
        assert mode["description"] == cloak.MODES[name].describe()  # the recipe is still there
    page = client.get("/").text
    advanced = page[page.index("<details") : page.index("</details>")]
    assert 'id="mode-tech"' in advanced and 'id="mode-tech"' not in page.replace(advanced, "")
    script = page[page.index("<script>") :]
    assert "m.summary" in script and "m.description" in script


def test_page_docs_and_openapi_need_nothing_outside_the_server(client: TestClient) -> None:
    for path in ("/", "/docs"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        external = re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?(?:https?:)?//""", response.text)
        assert external == [], f"{path} loads something from another origin"
    page = client.get("/").text
    assert 'type="file"' in page and "/v1/cloak" in page and "application/x-ndjson" in page
    spec = client.get("/openapi.json").json()
    assert {"/v1/cloak", "/v1/compare", "/v1/classify", "/v1/models", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/cloak"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["image"] and {"mode", "steps", "no_align", "format"} <= set(
        body["properties"]
    )
    assert server.REPORT_HEADER in spec["info"]["description"]


# ---------------------------------------------------------------------------------------------------
# cloak


def test_cloak_finds_the_face_cloaks_it_and_reports_the_verification(
    client: TestClient, models: server.Models
) -> None:
    response = client.post(
        "/v1/cloak", files=upload(encode(ASTRONAUT), "astronaut.png"), data={"mode": "low", "steps": "2"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["content-disposition"] == 'attachment; filename="astronaut.cloaked.png"'
    cloaked = decode(response.content)
    assert cloaked.shape == ASTRONAUT.shape
    change = np.abs(cloaked.astype(int) - ASTRONAUT)
    assert 0 < change.max() <= cloak.MODES["low"].eps
    report = json.loads(response.headers[server.REPORT_HEADER])
    assert report["input"] == "astronaut.png" and report["output"] == "astronaut.cloaked.png"
    assert report["models"] == [r.name for r in models.recognizers]
    assert len(report["faces"]) == 1 and report["faces"][0]["redetected"]
    for check in report["faces"][0]["models"]:
        assert check["after"] < check["before"], check  # every recognizer was moved away from the face
        assert check["protected"] == (check["after"] < check["threshold"])
    verdict = "PROTECTED" if report["status"] == "protected" else "NOT PROTECTED"
    assert response.headers[server.VERDICT_HEADER] == verdict
    assert report["protected"] == all(f["protected"] for f in report["faces"])


def test_cloak_answers_image_json_and_ndjson_with_the_same_pixels(client: TestClient) -> None:
    form = {**CHEAP, "seed": "5"}
    plain = client.post("/v1/cloak", files=upload(encode(FACE)), data=form)
    as_json = client.post(
        "/v1/cloak", files=upload(encode(FACE)), data=form, headers={"Accept": "application/json"}
    )
    stream = client.post(
        "/v1/cloak", files=upload(encode(FACE)), data=form, headers={"Accept": server.NDJSON}
    )
    assert (plain.status_code, as_json.status_code, stream.status_code) == (200, 200, 200)
    assert stream.headers["content-type"] == server.NDJSON
    body = as_json.json()
    assert body["filename"] == "face.cloaked.png" and body["media_type"] == "image/png"
    events = [json.loads(line) for line in stream.text.splitlines()]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 3
    assert [e["event"] for e in events[len(steps) :]] == ["stage", "result"]
    result = events[-1]
    blobs = [plain.content, base64.b64decode(body["image"]), base64.b64decode(result["image"])]
    assert blobs[0] == blobs[1] == blobs[2]  # equal seeds, equal cloaks, whichever the answer's form
    assert result["report"]["faces"] == body["report"]["faces"]
    assert result["report"]["steps_run"] == {"face 1": len(steps)}


def test_cloak_keeps_the_format_or_converts_on_request(client: TestClient) -> None:
    jpeg = client.post("/v1/cloak", files=upload(encode(FACE, "JPEG"), "me.jpg"), data=CHEAP)
    assert jpeg.status_code == 200, jpeg.text
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert 'filename="me.cloaked.jpg"' in jpeg.headers["content-disposition"]
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    webp = client.post(
        "/v1/cloak", files=upload(encode(FACE, "JPEG"), "../../etc/me.jpg"), data={**CHEAP, "format": "webp"}
    )
    assert webp.status_code == 200, webp.text
    assert webp.headers["content-type"] == "image/webp"
    assert 'filename="me.cloaked.webp"' in webp.headers["content-disposition"]  # no path from the client
    assert Image.open(io.BytesIO(webp.content)).format == "WEBP"


def bomb() -> bytes:
    """A PNG whose header claims 10000 x 10000 pixels (100 MP) in under 100 bytes."""
    return png_bytes(10000, 10000, 8, 0, b"\x00" * 64)


BAD_CLOAKS = [
    ("not an image", upload(b"this is not an image"), {}, 415, "not an image"),
    ("empty file", upload(b""), {}, 422, "empty file"),
    ("truncated", upload(encode(FACE)[:3000]), {}, 422, "truncated or corrupt"),
    ("decompression bomb", upload(bomb()), {}, 413, r"10000x10000 is 100\.0 megapixels, over the limit"),
    ("no face", upload(encode(np.full((200, 200, 3), 128, np.uint8))), {}, 422, "no face found in image"),
    ("no file", {"mode": (None, b"low")}, {}, 422, "missing the file field 'image'"),
    ("bad mode", upload(encode(FACE)), {"mode": "ultra"}, 422, "unknown mode 'ultra'"),
    ("bad steps", upload(encode(FACE)), {"steps": "many"}, 422, "'steps' must be an integer, got 'many'"),
    ("bad flag", upload(encode(FACE)), {"no_align": "perhaps"}, 422, "'no_align' must be true or false"),
    ("bad eps", upload(encode(FACE)), {"eps": "300"}, 422, "eps must be .*255"),
    ("bad coarse", upload(encode(FACE)), {"coarse": "0.5"}, 422, "coarse must be in 1..64"),
    ("unknown field", upload(encode(FACE)), {"colour": "red"}, 422, "unknown field.* colour"),
    ("bad format", upload(encode(FACE)), {**CHEAP, "format": "gif"}, 422, "cannot write format 'gif'"),
    ("unknown model", upload(encode(FACE)), {**CHEAP, "models": "nope"}, 422, "not a recognizer this server"),
    # seed -1 was a 500 (numpy refused it deep in the first attack), eps 0 answered the photo unchanged
    (
        "seed -1",
        upload(encode(FACE)),
        {**CHEAP, "seed": "-1"},
        422,
        r"seed must be a whole number in 0\.\.4294967295, got -1",
    ),
    ("seed 2^32", upload(encode(FACE)), {**CHEAP, "seed": str(2**32)}, 422, "seed must be a whole number"),
    ("eps 0", upload(encode(FACE)), {**CHEAP, "eps": "0"}, 422, "eps must be above 0"),
    ("eps -1", upload(encode(FACE)), {**CHEAP, "eps": "-1"}, 422, "eps must be above 0"),
]


@pytest.mark.parametrize(
    ("files", "form", "status", "message"), [case[1:] for case in BAD_CLOAKS], ids=[c[0] for c in BAD_CLOAKS]
)
def test_bad_cloak_requests_get_a_4xx_with_a_one_line_reason(
    client: TestClient, files: dict[str, Any], form: dict[str, str], status: int, message: str
) -> None:
    response = client.post("/v1/cloak", files=files or None, data=form)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert re.search(message, detail), detail
    assert "\n" not in detail and "Traceback" not in detail
    health = client.get("/healthz").json()
    assert (health["running"], health["waiting"]) == (0, 0)  # the rejected request gave its slot back


@pytest.fixture(scope="module")
def model_copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of a shipped recognizer and a symlink to one, outside the models folder."""
    folder = tmp_path_factory.mktemp("client-models")
    shipped = catalog.get_model(cloak.default_recognizer_names()[0]).path
    copy = folder / "copy.onnx"
    shutil.copyfile(shipped, copy)
    link = folder / "link.onnx"
    link.symlink_to(shipped)
    return {"copy": copy, "link": link, "shipped": shipped}


HOSTILE_MODELS = {
    "etc passwd": "/etc/passwd",
    "proc environ": "/proc/self/environ",
    "missing file": "/no-such-folder-uncnn/x.onnx",
    "dot dot": "../models/faceres.onnx",
    "dot dot name": "../faceres",
    "relative shipped file": "models/faceres.onnx",
    "url-encoded": "%2Fetc%2Fpasswd",
    "url-encoded dots": "..%2F..%2Fetc%2Fpasswd",
    "a name and a path": "faceres,/etc/passwd",
    "copy": "{copy}",
    "symlink": "{link}",
    "shipped file's absolute path": "{shipped}",
}


@pytest.mark.parametrize("value", list(HOSTILE_MODELS.values()), ids=list(HOSTILE_MODELS))
@pytest.mark.parametrize("endpoint", ["/v1/cloak", "/v1/compare"])
def test_models_takes_only_the_names_this_server_offers(
    client: TestClient,
    model_copies: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
    value: str,
) -> None:
    """``models=/etc/passwd`` was a 500 naming the file, a missing path a 422 (an oracle of which files
    exist), a copy of a model under a new name 200 and one more model kept in memory. Now anything but
    a name the server offers is a 422 listing those names, and the text is never echoed nor touched."""
    value = value.format(**{k: str(v) for k, v in model_copies.items()})
    touched: list[str] = []

    def spy(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, os.PathLike)):
                touched.append(os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    for module, name in ((os, "stat"), (os, "lstat"), (os, "open"), (builtins, "open")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    files = (
        upload(encode(FACE))
        if endpoint == "/v1/cloak"
        else {**upload(encode(FACE), field="a"), **upload(encode(FACE), field="b")}
    )
    form = {**CHEAP, "models": value} if endpoint == "/v1/cloak" else {"no_align": "true", "models": value}
    response = client.post(endpoint, files=files, data=form)
    monkeypatch.undo()
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert re.search(r"allowed: .*faceres", detail), detail
    for part in re.split(r"[,/]", value):
        if part not in ("", "faceres", "models", ".."):
            assert part not in detail, detail  # never echoed
    hostile = [p for p in value.split(",") if p != "faceres"]
    assert not [t for t in touched if t in hostile or str(model_copies["copy"].parent) in t], touched


def test_models_takes_the_attack_graphs_the_operator_gave(model_copies: dict[str, Path]) -> None:
    """A graph given to ``serve --models`` is offered by the text the operator gave and by its name."""
    given = str(model_copies["copy"])
    config = server.ServeConfig(device="cpu", models=(given,))
    with TestClient(server.create_app(config, models=server.load_models(config))) as own:
        offered = own.get("/v1/models").json()["recognizers"]
        assert given not in offered and "faceres" in offered  # names only: no server path is listed
        for value in (given, "faceres"):
            response = own.post("/v1/cloak", files=upload(encode(FACE)), data={**CHEAP, "models": value})
            assert response.status_code == 200, response.text
            assert json.loads(response.headers[server.REPORT_HEADER])["models"] == ["faceres"]
        refused = own.post("/v1/cloak", files=upload(encode(FACE)), data={**CHEAP, "models": "/etc/passwd"})
        assert refused.status_code == 422


UNICODE_NAMES = [
    ("Zoë Ünal.png", "Zoe_Unal.cloaked.png", "Zoë Ünal.cloaked.png"),
    ("東京の写真.png", "photo.cloaked.png", "東京の写真.cloaked.png"),
    ("../x/evil\u202egnp.png", "evilgnp.cloaked.png", "evil_gnp.cloaked.png"),  # no path, no bidi mark
]


@pytest.mark.parametrize(
    ("sent", "ascii_name", "name"), UNICODE_NAMES, ids=["accents", "kanji", "path and bidi"]
)
def test_non_ascii_upload_names_keep_a_sensible_download_name(
    client: TestClient, sent: str, ascii_name: str, name: str
) -> None:
    """A non-ASCII name came back as ``_.cloaked.png``: now folded to ASCII in ``filename`` and kept
    as sent in RFC 5987's ``filename*`` (and the JSON answer)."""
    response = client.post("/v1/cloak", files=upload(encode(FACE), sent), data={**CHEAP, "seed": "1"})
    assert response.status_code == 200, response.text
    disposition = response.headers["content-disposition"]
    assert disposition.startswith(f'attachment; filename="{ascii_name}"'), disposition
    if name != ascii_name:
        assert disposition.endswith("; filename*=UTF-8''" + quote(name, safe="")), disposition
    else:
        assert "filename*" not in disposition
    as_json = client.post(
        "/v1/cloak",
        files=upload(encode(FACE), sent),
        data={**CHEAP, "seed": "1"},
        headers={"Accept": "application/json"},
    ).json()
    assert as_json["filename"] == name and as_json["report"]["output"] == name


def test_a_group_photo_keeps_the_report_header_small(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header held the whole report, about 800 bytes a face (28 KB for 36 faces): over 4 KB it is
    now a summary, and the JSON answer has the report whole. Faces are attacked one at a time."""
    batches: list[int | None] = []
    real = cloak.cloak_image

    def spy(*args: Any, **kwargs: Any) -> Any:
        batches.append(kwargs.get("faces_per_batch"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cloak, "cloak_image", spy)
    photo = encode(group_photo(2, 3))
    form = {"mode": "low", "steps": "1", "seed": "3"}
    response = client.post("/v1/cloak", files=upload(photo, "group.png"), data=form)
    assert response.status_code == 200, response.text
    header = response.headers[server.REPORT_HEADER]
    assert len(header) <= 4096
    summary = json.loads(header)
    assert summary["truncated"] is True and summary["faces"] == 6
    full = client.post(
        "/v1/cloak", files=upload(photo, "group.png"), data=form, headers={"Accept": "application/json"}
    ).json()["report"]
    assert len(json.dumps(full, separators=(",", ":"))) > 4096  # what the header used to carry
    assert len(full["faces"]) == 6 and "truncated" not in full
    assert summary["status"] == full["status"] and summary["seed"] == full["seed"] == 3
    assert summary["faces_protected"] == sum(f["protected"] for f in full["faces"])
    assert response.headers[server.VERDICT_HEADER] in ("PROTECTED", "NOT PROTECTED")
    assert batches == [1, 1]  # one face per batched attack: the peak stays near a one-face cloak's


def test_a_photo_with_more_faces_than_the_limit_is_422(models: server.Models) -> None:
    """A cloak's memory grows with its faces (a 36-face photo peaked at 1.8 GB): beyond ``max_faces``
    the answer is 422 before any attack step, unless face= or largest= picks one."""
    photo = encode(group_photo(2, 2))
    with client_for(models, max_faces=3) as strict:
        refused = strict.post("/v1/cloak", files=upload(photo), data={"mode": "low", "steps": "1"})
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].startswith(
            "4 faces found in image; this server cloaks at most 3 in one request: send face=N"
        )
        one = strict.post("/v1/cloak", files=upload(photo), data={"mode": "low", "steps": "1", "face": "2"})
        assert one.status_code == 200, one.text
        assert len(json.loads(one.headers[server.REPORT_HEADER])["faces"]) == 1
        assert strict.get("/v1/models").json()["limits"]["max_faces"] == 3


def test_a_finished_job_hands_its_memory_back(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heap a cloak freed stayed with the process (1.4 GB after a 14-face photo, idle 270 MB): each
    job now ends with ``malloc_trim``, whatever its outcome."""
    calls: list[int] = []
    real = server.queue.release_memory
    monkeypatch.setattr(server.queue, "release_memory", lambda: (calls.append(1), real())[1])
    assert client.post("/v1/classify", files=upload(encode(FACE))).status_code == 200
    assert client.post("/v1/cloak", files=upload(encode(FACE)), data=CHEAP).status_code == 200
    blank = encode(np.full((200, 200, 3), 128, np.uint8))
    assert client.post("/v1/cloak", files=upload(blank), data={"mode": "low"}).status_code == 422
    assert len(calls) == 3


def test_a_body_that_is_not_multipart_is_415(client: TestClient) -> None:
    response = client.post("/v1/cloak", json={"image": "aGVsbG8="})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_size_and_pixel_limits_are_413(models: server.Models) -> None:
    photo = encode(ASTRONAUT)  # about 0.5 MB, 0.26 MP
    with client_for(models, max_upload_mb=0.1, max_megapixels=0.1) as small:
        too_big = small.post("/v1/classify", files=upload(photo))
        assert too_big.status_code == 413
        assert too_big.json()["detail"] == "upload too large: the limit is 0.1 MB per image"
        many_pixels = small.post("/v1/classify", files=upload(encode(ASTRONAUT[::2, ::2], "JPEG")))
        assert many_pixels.status_code == 200  # 256 x 256 is 0.066 MP
        jpeg = encode(ASTRONAUT, "JPEG")
        assert len(jpeg) < 100_000
        over = small.post("/v1/classify", files=upload(jpeg))
        assert over.status_code == 413
        assert "512x512 is 0.3 megapixels, over the limit of 0.1 megapixels" in over.json()["detail"]


def test_the_size_limit_holds_while_streaming_and_per_file(models: server.Models) -> None:
    """413 came only from a declared Content-Length: a chunked body and one file over its own limit
    (within the form's total) were never exercised."""
    photo = encode(ASTRONAUT)  # about 0.5 MB
    app = server.create_app(server.ServeConfig(device="cpu", max_upload_mb=0.1), models=models)
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        # A chunked body (no Content-Length) that would go on for 20 MB: the server answers 413 once it
        # has read past the limit, not at the end of the body.
        body, content_type = multipart(upload(photo))
        total = 20_000_000
        head = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
        sock = raw_socket(url, head, path="/v1/classify")
        sent = 0
        with sock:
            sock.settimeout(10)
            filler = b"\0" * 65536
            while sent < total:
                chunk = body[sent : sent + 65536] if sent < len(body) else filler
                try:
                    sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                except OSError:  # the server answered and closed, or stopped reading
                    break
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break  # the answer came before the body ended
            else:
                sock.sendall(b"0\r\n\r\n")  # the end of the chunked body
            status, answer = read_answer(sock)
        assert status == 413, answer
        assert answer["detail"] == "upload too large: the limit is 0.1 MB per image"
        assert sent < total // 2, sent
        # compare reads two files: 0.15 MB and a tiny one fit the form's 0.2 MB, not the 0.1 MB per file
        big = encode(np.random.default_rng(0).integers(0, 256, (230, 230, 3), dtype=np.uint8))
        assert 100_000 < len(big) < 190_000
        one_over = http.post(
            "/v1/compare", files={**upload(big, field="a"), **upload(encode(FACE[:40, :40]), field="b")}
        )
        assert one_over.status_code == 413, one_over.text
        assert one_over.json()["detail"] == "upload too large: the limit is 0.1 MB per image"
        health = http.get("/healthz").json()
        assert (health["uploading"], health["running"], health["waiting"]) == (0, 0, 0)


MALFORMED = [
    ("no boundary", "multipart/form-data", b"garbage", "Missing boundary"),
    (
        "part without a name",
        "multipart/form-data; boundary=xyz",
        b"--xyz\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--xyz--\r\n",
        'field "name" must be provided',
    ),
]


@pytest.mark.parametrize(
    ("content_type", "body", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_a_malformed_multipart_body_is_400(
    client: TestClient, content_type: str, body: bytes, message: str
) -> None:
    response = client.post("/v1/cloak", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.startswith("malformed multipart body: ") and message in detail


def test_uploads_stay_in_memory_and_out_of_the_logs(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    rng = np.random.default_rng(0)
    large = np.clip(
        np.asarray(Image.fromarray(ASTRONAUT).resize((1024, 1024))) + rng.integers(-8, 9, (1024, 1024, 3)),
        0,
        255,
    ).astype(np.uint8)
    blob = encode(large)
    assert len(blob) > 1_500_000  # past Starlette's 1 MB spooling threshold
    caplog.set_level(logging.DEBUG)
    response = client.post("/v1/classify", files=upload(blob, "private-holiday.png"))
    assert response.status_code == 200, response.text
    cloaked = client.post("/v1/cloak", files=upload(encode(FACE), "private-holiday.png"), data=CHEAP)
    assert cloaked.status_code == 200, cloaked.text
    assert not [r for r in caplog.records if "private-holiday" in r.getMessage()]


# ---------------------------------------------------------------------------------------------------
# compare and classify


def test_compare_says_same_person_for_one_face_at_two_sizes(client: TestClient) -> None:
    smaller = np.asarray(Image.fromarray(ASTRONAUT).resize((384, 384), Image.Resampling.LANCZOS))
    response = client.post(
        "/v1/compare", files={**upload(encode(ASTRONAUT), field="a"), **upload(encode(smaller), field="b")}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["same_person"] and body["matches"] == len(body["models"])
    for m in body["models"]:
        assert m["similarity"] >= m["threshold"] and m["match"]


@pytest.mark.shared
def test_compare_tells_dev_identities_apart(client: TestClient) -> None:
    if not SHARED_CHIPS.is_dir():
        pytest.skip(f"{SHARED_CHIPS} is absent (the shared dev set)")

    def same(a: str, b: str) -> bool:
        files = {
            **upload((SHARED_CHIPS / a).read_bytes(), field="a"),
            **upload((SHARED_CHIPS / b).read_bytes(), field="b"),
        }
        response = client.post("/v1/compare", files=files)
        assert response.status_code == 200, response.text
        return bool(response.json()["same_person"])

    assert same("amy/amy1.png", "amy/amy2.png")
    assert not same("amy/amy1.png", "penny/penny1.png")


def test_compare_names_the_photo_without_a_face(client: TestClient) -> None:
    blank = encode(np.full((160, 160, 3), 200, np.uint8))
    response = client.post(
        "/v1/compare", files={**upload(encode(FACE), field="a"), **upload(blank, field="b")}
    )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("no face found in b")
    missing = client.post("/v1/compare", files=upload(encode(FACE), field="a"))
    assert missing.status_code == 422 and "'b'" in missing.json()["detail"]


def test_classify_ranks_imagenet_classes(client: TestClient, models: server.Models) -> None:
    response = client.post("/v1/classify", files=upload(encode(ASTRONAUT)), data={"top": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "efficientnet_lite0"
    probabilities = [t["probability"] for t in body["top"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1
    assert models.classifier is not None and models.classifier.info.labels is not None
    assert {t["label"] for t in body["top"]} <= set(models.classifier.info.labels)
    bad = client.post("/v1/classify", files=upload(encode(ASTRONAUT)), data={"top": "0"})
    assert bad.status_code == 422 and "'top' must be in 1..50" in bad.json()["detail"]


# ---------------------------------------------------------------------------------------------------
# under load


def test_a_full_queue_is_503_with_retry_after(models: server.Models) -> None:
    with client_for(models, max_concurrency=1, queue=1) as small:
        work: server.WorkQueue = small.app.state.work  # type: ignore[attr-defined]
        held = [work.admit(), work.admit()]  # one computing and one waiting: every slot taken
        assert small.get("/healthz").json()["waiting"] == 2
        refused = small.post("/v1/classify", files=upload(encode(FACE)))
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["detail"].startswith("server busy")
        for job in held:
            work.release(job)
        assert small.post("/v1/classify", files=upload(encode(FACE))).status_code == 200


def test_retry_after_is_the_time_until_one_slot_frees(models: server.Models) -> None:
    """It was the whole queue at a first guess of 5 s per job: 11-15 s for jobs of about 1.5 s."""
    with client_for(models, max_concurrency=1, queue=4) as small:
        work: server.WorkQueue = small.app.state.work  # type: ignore[attr-defined]
        start = time.monotonic()
        assert small.post("/v1/classify", files=upload(encode(FACE))).status_code == 200
        job_seconds = time.monotonic() - start
        held = [work.admit() for _ in range(5)]  # every slot taken, none computing yet
        refused = small.post("/v1/classify", files=upload(encode(FACE)))
        assert refused.status_code == 503
        assert 1 <= int(refused.headers["retry-after"]) <= math.ceil(job_seconds) + 1
        held[0].started = time.monotonic() - 60  # one has run far past the mean: it ends any moment
        assert work.retry_after() == 1
        for job in held:
            work.release(job)


def test_a_request_over_the_time_limit_is_stopped_and_frees_its_slot(models: server.Models) -> None:
    with client_for(models, timeout=1.0) as strict:
        response = strict.post("/v1/cloak", files=upload(encode(FACE)), data={**CHEAP, "steps": "100000"})
        assert response.status_code == 503
        assert response.json()["detail"] == "the request took longer than this server's limit of 1 s"
        assert int(response.headers["retry-after"]) >= 1
        for _ in range(300):  # the thread stops at its next attack step
            health = strict.get("/healthz").json()
            if health["running"] == 0:
                break
            time.sleep(0.1)
        assert (health["running"], health["waiting"], health["served"], health["failed"]) == (0, 0, 0, 1)


def test_a_client_that_leaves_stops_its_job(models: server.Models) -> None:
    """A client that asked for the image (not NDJSON) and left was not noticed while the job's steps
    came faster than the 0.5 s poll: its cloak ran to the time limit and held the only slot."""
    app = server.create_app(server.ServeConfig(device="cpu", timeout=600), models=models)
    body, content_type = multipart(upload(encode(FACE)), {**CHEAP, "steps": "100000"})
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        sock = raw_socket(url, {"Content-Type": content_type, "Content-Length": str(len(body))}, body)
        assert wait_for(lambda: http.get("/healthz").json()["running"] == 1, 60)
        time.sleep(2)  # some steps taken
        sock.close()
        assert wait_for(lambda: http.get("/healthz").json()["running"] == 0, 30), "the job kept running"
        health = http.get("/healthz").json()
        assert (health["running"], health["waiting"], health["served"], health["failed"]) == (0, 0, 0, 1)


def test_stalled_uploads_hold_no_computing_slot(models: server.Models) -> None:
    """Three uploads that sent their headers and 200 bytes, then nothing, took every slot until the time
    limit: other clients got 503. The body is now read before the request takes a slot."""
    config = server.ServeConfig(device="cpu", max_concurrency=1, queue=1, read_timeout=60)
    head = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": "100000"}
    with (
        live_server(server.create_app(config, models=models)) as (url, _),
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        stalled = [raw_socket(url, head, b"--xyz\r\n" + b"x" * 193) for _ in range(3)]
        try:
            assert wait_for(lambda: http.get("/healthz").json().get("uploading") == 3, 30)
            response = http.post("/v1/cloak", files=upload(encode(FACE)), data=CHEAP)
            assert response.status_code == 200, response.text
            health = http.get("/healthz").json()
            assert (health["uploading"], health["served"]) == (3, 1)  # still stalled, still unanswered
        finally:
            for sock in stalled:
                sock.close()


def test_a_stalled_upload_is_408_after_the_read_timeout(models: server.Models) -> None:
    config = server.ServeConfig(device="cpu", read_timeout=1)
    head = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": "100000"}
    with (
        live_server(server.create_app(config, models=models)) as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        sock = raw_socket(url, head, b"--xyz\r\n" + b"x" * 193)
        start = time.monotonic()
        with sock:
            status, body = read_answer(sock)
        assert (status, body) == (408, {"detail": "the upload stalled: nothing arrived for 1 s"})
        assert time.monotonic() - start < 30
        health = http.get("/healthz").json()
        assert (health["uploading"], health["running"], health["waiting"]) == (0, 0, 0)


def test_concurrent_requests_get_an_image_or_a_503(models: server.Models) -> None:
    app = server.create_app(server.ServeConfig(device="cpu", max_concurrency=1, queue=1), models=models)
    blob = encode(FACE)
    # Each cloak takes some seconds (40 steps), the six arrive within a fraction of one: two are admitted,
    # the other four find every slot taken (the test passed before even if no 503 ever came).
    form = {**CHEAP, "steps": "40"}
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=300) as http:
        start = threading.Barrier(6)

        def one(_: int) -> httpx.Response:
            start.wait()
            return http.post("/v1/cloak", files=upload(blob), data=form)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(one, range(6)))
        assert {r.status_code for r in responses} <= {200, 503}
        served = [r for r in responses if r.status_code == 200]
        assert 1 <= len(served) <= 4 and len(served) < len(responses)  # some got an image, some a 503
        for r in served:
            assert decode(r.content).shape == FACE.shape
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
        assert http.get("/healthz").json()["served"] == len(served)


def test_shutdown_lets_the_request_in_flight_finish(models: server.Models) -> None:
    """The request must be running when shutdown begins (a fast job passed this trivially before), and
    its answer must come after: the server waited for it."""
    app = server.create_app(server.ServeConfig(device="cpu"), models=models)
    outcome: list[tuple[httpx.Response, float]] = []
    form = {**CHEAP, "steps": "40"}
    with live_server(app) as (url, uvicorn_server), httpx.Client(base_url=url, timeout=120) as http:

        def cloak_one() -> None:
            response = http.post("/v1/cloak", files=upload(encode(FACE)), data=form)
            outcome.append((response, time.monotonic()))

        request = threading.Thread(target=cloak_one)
        request.start()
        assert wait_for(lambda: http.get("/healthz").json()["running"] == 1, 60)
        exiting = time.monotonic()
        uvicorn_server.should_exit = True  # what SIGTERM does
        work: server.WorkQueue = app.state.work  # type: ignore[attr-defined]
        assert work.stats()["running"] == 1 and not outcome  # still computing when shutdown began
        request.join(120)
    assert len(outcome) == 1
    response, answered = outcome[0]
    assert response.status_code == 200, response.text
    assert answered > exiting
    assert decode(response.content).shape == FACE.shape


# ---------------------------------------------------------------------------------------------------
# the command


def test_serve_help_and_the_command_list() -> None:
    runner = CliRunner()
    assert "serve" in runner.invoke(cli_app, ["--help"]).output
    result = runner.invoke(cli_app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--workers", "--max-concurrency", "--queue", "--max-upload-mb"):
        assert option in result.output
    for option in ("--max-megapixels", "--timeout", "--grace", "--device", "--access-log", "--read-timeout"):
        assert option in result.output
    assert "--max-faces" in result.output


def test_serve_has_no_access_log_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README promises no access log by default, but the test server passed ``access_log=False``
    itself: here the command's own options run a real uvicorn, and a request leaves no access record."""
    ran: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: ran.append((app, options)))
    runner = CliRunner()
    for args in (["serve", "--device", "cpu"], ["serve", "--device", "cpu", "--access-log"]):
        result = runner.invoke(cli_app, args)
        assert result.exit_code == 0, result.output
    (app, options), (_, logged) = ran
    assert options["access_log"] is False and logged["access_log"] is True
    assert options["timeout_graceful_shutdown"] == 120 and options["limit_concurrency"] > 6

    records: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:  # sees each access record uvicorn writes, shows none
        records.append(record)
        return False

    access = logging.getLogger("uvicorn.access")
    for chosen, expected in ((options, 0), (logged, 1)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        settings = {k: v for k, v in chosen.items() if k not in ("host", "port")}
        instance = uvicorn.Server(uvicorn.Config(app, log_level="warning", **settings))
        thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: instance.started, 60)  # noqa: B023
            access.addFilter(keep)
            access.setLevel(logging.INFO)  # what --access-log writes at
            before = len(records)
            port = sock.getsockname()[1]
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
            time.sleep(0.5)
            assert len(records) - before == expected
        finally:
            access.removeFilter(keep)
            instance.should_exit = True
            thread.join(60)
            sock.close()


def test_serve_without_the_extra_is_one_clean_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what `import uvicorn` finds when it is absent
    result = CliRunner().invoke(cli_app, ["serve"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'uncnn-rt[serve]'" in lines[0], result.output


def test_bad_serve_settings_are_refused() -> None:
    result = CliRunner().invoke(cli_app, ["serve", "--max-concurrency", "0"])
    assert result.exit_code == 2
    unknown = CliRunner().invoke(cli_app, ["serve", "--models", "nope", "--port", "1"])
    assert unknown.exit_code == 2
    assert "error: unknown recognizer(s) nope" in unknown.output


def test_worker_processes_read_their_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = server.ServeConfig(device="cpu", models=("faceres",), max_concurrency=2, queue=3, timeout=9.0)
    assert server.ServeConfig.from_json(config.to_json()) == config
    monkeypatch.setenv(server.CONFIG_ENV, config.to_json())
    with TestClient(server.app_from_environment()) as worker:
        health = worker.get("/healthz").json()
        assert (health["max_concurrency"], health["queue"]) == (2, 3)
        listed = worker.get("/v1/models").json()
        assert [m["name"] for m in listed["models"] if m["cloaks_by_default"]] == ["faceres"]
        assert listed["limits"]["timeout_s"] == 9.0
