"""The one model resolver: shipped names and the paths of attack graphs a user made, in every command."""

from __future__ import annotations

import json
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
