"""The one model resolver: shipped names and the paths of attack graphs a user made, in every command."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from conftest import LinearGraph
from PIL import Image
from typer.testing import CliRunner

from uncnn_rt.cli.app import app
from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.errors import InputError, ModelError


def test_a_face_attack_graph_path_opens_beside_shipped_names(linear_face_graph: LinearGraph) -> None:
    sessions = catalog.load_recognizers([str(linear_face_graph.path)], device="cpu")
    assert [s.name for s in sessions] == ["linear_face"]
    assert sessions[0].info.kind == "face"
    shipped = catalog.default_recognizer_names()
    if shipped:  # on a checkout with the shipped zoo: a name and a path together, in the order given
        mixed = catalog.load_recognizers([shipped[0], str(linear_face_graph.path)], device="cpu")
        assert [s.name for s in mixed] == [shipped[0], "linear_face"]


def test_what_is_not_a_face_recognizer_is_refused(
    linear_classifier_graph: LinearGraph, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="not a face recognizer"):
        catalog.load_recognizers([str(linear_classifier_graph.path)], device="cpu")
    with pytest.raises(InputError, match=r"unknown recognizer\(s\) nonesuch.*convert grad"):
        catalog.load_recognizers(["nonesuch"], device="cpu")
    with pytest.raises(InputError, match="at least one"):
        catalog.load_recognizers([], device="cpu")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(ModelError):
        catalog.load_recognizers([str(broken)], device="cpu")


def test_resolve_model_takes_a_file_or_a_shipped_name(linear_face_graph: LinearGraph) -> None:
    assert catalog.resolve_model(linear_face_graph.path) == linear_face_graph.path.resolve()
    with pytest.raises(ModelError, match="no such model file"):
        catalog.resolve_model("missing/model.onnx")


def test_cloak_runs_on_the_users_own_attack_graph(linear_face_graph: LinearGraph, tmp_path: Path) -> None:
    """``cloak --models PATH``: the attack graph a user made is the white-box model (no shipped one)."""
    rng = np.random.default_rng(0)
    source = tmp_path / "chip.png"
    Image.fromarray(rng.integers(40, 215, (48, 48, 3), dtype=np.uint8)).save(source)
    result = CliRunner().invoke(
        app,
        ["-q", "cloak", str(source), "--no-align", "--models", str(linear_face_graph.path), "--json",
         "--eps", "32", "--steps", "20", "--ssim-min", "0", "--coarse", "1", "--cap", "none", "--seed", "0"],
    )  # fmt: skip
    assert result.exit_code in (0, 4), result.output
    report = json.loads(result.stdout)
    models = report["files"][0]["faces"][0]["models"]
    assert [m["name"] for m in models] == ["linear_face"]
    assert (tmp_path / "chip.cloaked.png").is_file()


# --- uncnn-rt models verify -------------------------------------------------------------------------


def _models_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, tampered: str | None = None) -> Path:
    """A models folder the catalog reads instead of the shipped one: the shipped manifest, each model a
    link to the shipped file (only read), except ``tampered``: a fresh file, the shipped bytes with one
    byte changed. The shipped folder is never written."""
    shipped = catalog.models_dir()
    entries = catalog.load_manifest()
    if not entries:
        pytest.skip("this checkout ships no models (models/manifest.json)")
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / catalog.MANIFEST_NAME).write_bytes((shipped / catalog.MANIFEST_NAME).read_bytes())
    for e in entries:
        if e.file == tampered:
            data = bytearray((shipped / e.file).read_bytes())
            data[len(data) // 2] ^= 0x01
            (folder / e.file).write_bytes(bytes(data))
        else:
            (folder / e.file).symlink_to(shipped / e.file)
    monkeypatch.setattr(catalog, "models_dir", lambda: folder)
    return folder


def _verify() -> tuple[int, str]:
    result = CliRunner().invoke(app, ["models", "verify"])
    return result.exit_code, result.output


def test_models_verify_passes_on_an_intact_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _models_copy(tmp_path, monkeypatch)
    code, output = _verify()
    assert code == 0, output
    assert f"{len(catalog.load_manifest())} model file(s) verified" in output


def test_models_verify_exits_1_on_a_tampered_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README: ``models verify`` re-hashes the shipped files, and a file that differs from the
    manifest fails it with exit code 1, naming the file."""
    entries = catalog.load_manifest()
    if len(entries) < 2:
        pytest.skip("this checkout ships fewer than two models (models/manifest.json)")
    first, last = entries[0].file, entries[-1].file
    _models_copy(tmp_path, monkeypatch, tampered=last)
    code, output = _verify()
    assert code == 1, output
    assert f"FAIL {last}: sha256" in output and "does not match the manifest" in output
    assert f"ok   {first}" in output  # the intact files are still listed as such
    assert "verified" not in output


def test_models_verify_exits_1_on_a_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _models_copy(tmp_path, monkeypatch)
    gone = catalog.load_manifest()[0].file
    (folder / gone).unlink()  # removes the link, not the shipped file
    code, output = _verify()
    assert code == 1, output
    assert f"FAIL {gone}: missing" in output
    assert (Path(str(resources.files("uncnn_rt.models"))) / gone).is_file()
