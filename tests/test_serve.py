"""``uncnn-rt serve``: every endpoint through FastAPI's TestClient; a live uvicorn for load and shutdown.

The server runs the shipped models on real faces (the scikit-image astronaut, and the dev chips when
``../shared`` is there); cloaks use the ``low`` mode with a few steps, mostly on a face crop with
``no_align`` (no detection, no refinement), to keep the file to some tens of seconds.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------------------
# read-only endpoints and the page


def test_healthz_reports_the_queue(client: TestClient) -> None:
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert (body["running"], body["waiting"], body["max_concurrency"], body["queue"]) == (0, 0, 1, 4)


def test_models_lists_the_manifest_modes_and_limits(client: TestClient, models: server.Models) -> None:
    body = client.get("/v1/models").json()
    assert [m["name"] for m in body["models"]] == [e.name for e in catalog.load_manifest()]
    in_use = {m["name"] for m in body["models"] if m["cloaks_by_default"]}
    assert in_use == {r.name for r in models.recognizers}
    assert set(body["modes"]) == set(cloak.MODES)
    assert body["modes"]["low"]["eps"] == cloak.MODES["low"].eps
    assert body["limits"] == {"max_upload_mb": 20.0, "max_megapixels": 24.0, "timeout_s": 120.0}


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
    ("bad eps", upload(encode(FACE)), {"eps": "300"}, 422, "eps must be in 0..255"),
    ("bad coarse", upload(encode(FACE)), {"coarse": "0.5"}, 422, "coarse must be in 1..64"),
    ("unknown field", upload(encode(FACE)), {"colour": "red"}, 422, "unknown field.* colour"),
    ("bad format", upload(encode(FACE)), {**CHEAP, "format": "gif"}, 422, "cannot write format 'gif'"),
    ("unknown model", upload(encode(FACE)), {**CHEAP, "models": "nope"}, 422, "unknown recognizer.* nope"),
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
    assert client.get("/healthz").json()["waiting"] == 0  # the rejected request gave its slot back


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
        assert (health["running"], health["waiting"], health["served"]) == (0, 0, 1)


def test_concurrent_requests_get_an_image_or_a_503(models: server.Models) -> None:
    app = server.create_app(server.ServeConfig(device="cpu", max_concurrency=1, queue=1), models=models)
    with live_server(app) as (url, _), httpx.Client(base_url=url, timeout=120) as http:

        def one(_: int) -> httpx.Response:
            return http.post("/v1/cloak", files=upload(encode(FACE)), data=CHEAP)

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(one, range(6)))
        assert {r.status_code for r in responses} <= {200, 503}
        served = [r for r in responses if r.status_code == 200]
        assert served
        for r in served:
            assert decode(r.content).shape == FACE.shape
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1
        assert http.get("/healthz").json()["served"] == len(served)


def test_shutdown_lets_the_request_in_flight_finish(models: server.Models) -> None:
    app = server.create_app(server.ServeConfig(device="cpu"), models=models)
    outcome: list[httpx.Response] = []
    form = {**CHEAP, "steps": "8"}
    with live_server(app) as (url, uvicorn_server), httpx.Client(base_url=url, timeout=120) as http:

        def cloak_one() -> None:
            outcome.append(http.post("/v1/cloak", files=upload(encode(FACE)), data=form))

        request = threading.Thread(target=cloak_one)
        request.start()
        for _ in range(600):
            if http.get("/healthz").json()["running"] == 1:
                break
            time.sleep(0.05)
        uvicorn_server.should_exit = True  # what SIGTERM does
        request.join(120)
    assert len(outcome) == 1
    assert outcome[0].status_code == 200, outcome[0].text
    assert decode(outcome[0].content).shape == FACE.shape


# ---------------------------------------------------------------------------------------------------
# the command


def test_serve_help_and_the_command_list() -> None:
    runner = CliRunner()
    assert "serve" in runner.invoke(cli_app, ["--help"]).output
    result = runner.invoke(cli_app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--workers", "--max-concurrency", "--queue", "--max-upload-mb"):
        assert option in result.output
    for option in ("--max-megapixels", "--timeout", "--grace", "--device", "--access-log"):
        assert option in result.output


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
