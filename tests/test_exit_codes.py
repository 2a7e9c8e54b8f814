"""The exit codes the README promises, as literal numbers: 2 bad input, 3 a model that breaks the
contract, 4 ``cloak`` wrote its output but some face is NOT PROTECTED, 1 ``models verify`` found a file
that differs. Scripts test these numbers, so a renumbering must fail here, not only where the constants
are compared with themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import LinearGraph
from PIL import Image
from typer.testing import CliRunner

from uncnn_rt.cli import exit_codes
from uncnn_rt.cli.app import app


def test_the_codes_are_the_documented_numbers() -> None:
    assert exit_codes.EXIT_OK == 0
    assert exit_codes.EXIT_FAILED == 1
    assert exit_codes.EXIT_INPUT == 2
    assert exit_codes.EXIT_MODEL == 3
    assert exit_codes.EXIT_NOT_PROTECTED == 4
    # With several inputs the worst wins: a broken model, then bad input, then a failure, then NOT
    # PROTECTED (a result, not a failure).
    assert exit_codes.worst_exit_code([4, 2, None, 3]) == 3
    assert exit_codes.worst_exit_code([4, 1, 2]) == 2
    assert exit_codes.worst_exit_code([4, 1]) == 1
    assert exit_codes.worst_exit_code([4, None]) == 4
    assert exit_codes.worst_exit_code([None]) == 0


def _chip(folder: Path) -> Path:
    source = folder / "chip.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(40, 215, (48, 48, 3), dtype=np.uint8)).save(source)
    return source


def _cloak(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["-q", "cloak", *args, "--no-align", "--seed", "0"])
    return result.exit_code, result.output


def test_cloak_exits_2_on_a_corrupt_photo(tmp_path: Path, linear_face_graph: LinearGraph) -> None:
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    code, output = _cloak(str(corrupt), "--models", str(linear_face_graph.path))
    assert code == 2, output
    assert not (tmp_path / "broken.cloaked.jpg").exists()


def test_cloak_exits_3_on_a_model_that_breaks_the_contract(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    code, output = _cloak(str(_chip(tmp_path)), "--models", str(broken))
    assert code == 3, output
    assert not (tmp_path / "chip.cloaked.png").exists()


def test_cloak_exits_4_when_it_wrote_a_cloak_that_does_not_protect(
    tmp_path: Path, linear_face_graph: LinearGraph
) -> None:
    """One step of at most 1 grey level cannot take the linear graph's similarity (1 when clean) below
    its threshold 0.5; the file is written all the same."""
    code, output = _cloak(
        str(_chip(tmp_path)), "--models", str(linear_face_graph.path),
        "--eps", "1", "--steps", "1", "--ssim-min", "0", "--cap", "none",
    )  # fmt: skip
    assert code == 4, output
    assert "NOT PROTECTED" in output
    assert (tmp_path / "chip.cloaked.png").is_file()
