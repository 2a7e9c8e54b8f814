"""The page of ``uncnn-rt serve`` in a real browser: headless Chromium (Debian's ``chromium``) via Playwright.

Skips, saying why, when Playwright or the Chromium binary is absent; ``.ci/run`` installs Chromium, so CI
runs it. The browser is started with no network access beyond the loopback server under test, and the
test checks that the page asks nothing of any other origin.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from test_serve import live_server

pytest.importorskip("fastapi", reason="the [serve] extra (fastapi, uvicorn, python-multipart) is absent")
from uncnn_rt import serve as server
from uncnn_rt.runtime import catalog, cloak

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright (Python) is not installed")

DEV_CHIP = (
    Path(__file__).resolve().parents[2] / "shared" / "faces" / "dev" / "identities" / "amy" / "amy1.png"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    found = os.environ.get("UNCNN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    return found


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    names = {e.name for e in catalog.load_manifest() if e.path.is_file()}
    if "blazeface" not in names or not cloak.default_recognizer_names():
        pytest.skip("the model zoo does not ship the detector and the default recognizers")
    models = server.load_models(server.ServeConfig(device="cpu"))
    with live_server(server.create_app(server.ServeConfig(device="cpu"), models=models)) as (url, _):
        yield url


@pytest.fixture
def page(base_url: str) -> Iterator[playwright.Page]:
    executable = chromium_path()
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(accept_downloads=True)
            elsewhere: list[str] = []
            tab.on(
                "request",
                lambda r: None if r.url.startswith((base_url, "blob:", "data:")) else elsewhere.append(r.url),
            )
            tab.goto(base_url + "/")
            tab.wait_for_selector("#mode option", state="attached")  # the modes came from /v1/models
            yield tab
            assert elsewhere == [], f"the page asked other origins for {elsewhere}"
        finally:
            browser.close()


def a_photo(tmp_path: Path) -> Path:
    """A dev chip when ../shared is there, else the scikit-image astronaut: a real face either way."""
    if DEV_CHIP.is_file():
        return DEV_CHIP
    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


SCREENSHOT = os.environ.get("UNCNN_PAGE_SCREENSHOT")
"""Where the page test saves a screenshot of the result, to look at it (unset: none)."""


@pytest.mark.slow
def test_the_page_cloaks_a_photo_and_offers_the_result(page: playwright.Page, tmp_path: Path) -> None:
    photo = a_photo(tmp_path)
    # The mode's caption says in words what it gives and costs; its recipe sits under "Advanced".
    page.select_option("#mode", "mid")
    caption = page.text_content("#mode-info") or ""
    assert "eps" not in caption and "CIEDE2000" not in caption and "default" in caption
    assert page.is_hidden("#mode-tech")  # "Advanced" is closed
    page.set_input_files("#file", str(photo))
    assert page.get_attribute("#before", "src", timeout=10_000).startswith("blob:")
    page.select_option("#mode", "low")
    page.click("details summary")  # "Advanced"
    tech = page.text_content("#mode-tech") or ""
    assert tech.startswith("Mode low: eps 32, 24 steps, visible at most as JPEG q75")
    page.fill("#steps", "2")
    page.click("#go")
    page.wait_for_selector("#result:not([hidden])", timeout=300_000)

    verdict = page.text_content("#verdict")
    per_model = page.locator("#models tbody td:last-child").all_text_contents()
    assert per_model and set(per_model) <= {"PROTECTED", "NOT PROTECTED"}
    assert len(per_model) % len(cloak.default_recognizer_names()) == 0  # every model, for each face
    assert verdict == ("PROTECTED" if set(per_model) == {"PROTECTED"} else "NOT PROTECTED")
    assert "SSIM" in page.text_content("#quality")
    assert page.text_content("#status").startswith("Done in")
    assert page.get_attribute("#after", "src").startswith("blob:")
    # Each face's visibility against its cap, the loupe over both photos, the 1:1 view.
    faces = page.locator("#visibility tbody tr").all_text_contents()
    assert faces and all("JPEG q75" in row for row in faces)
    page.locator("#after").hover()  # scrolled into view, the pointer over its centre
    drawn = page.evaluate(
        "() => ['loupe-before', 'loupe-after'].map((id) => { const c = document.getElementById(id);"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = 0;"
        " for (let i = 3; i < d.length; i += 4) s += d[i]; return s; })"
    )
    assert all(alpha > 0 for alpha in drawn)  # both loupes show pixels of their photo
    page.check("#actual")
    assert "actual" in (page.get_attribute("#pair", "class") or "")
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)

    with page.expect_download() as pending:
        page.click("#download")
    download = pending.value
    assert download.suggested_filename == f"{photo.stem}.cloaked.png"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    with Image.open(saved) as cloaked, Image.open(photo) as original:
        assert cloaked.size == original.size
        difference = np.abs(
            np.asarray(cloaked.convert("RGB"), int) - np.asarray(original.convert("RGB"), int)
        )
    assert 0 < difference.max() <= cloak.MODES["low"].eps


def test_the_page_shows_why_a_photo_was_refused(page: playwright.Page, tmp_path: Path) -> None:
    blank = tmp_path / "wall.png"
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), (120, 120, 120)).save(buffer, format="PNG")
    blank.write_bytes(buffer.getvalue())
    page.set_input_files("#file", str(blank))
    page.click("#go")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "422: no face found in image" in page.text_content("#status")
    assert page.is_hidden("#result")
