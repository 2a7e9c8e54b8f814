"""``uncnn-rt demo``: the README's first command, end to end on the shipped models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from uncnn_rt.cli.app import app
from uncnn_rt.runtime import zoo
from uncnn_rt.runtime.cloak import MODES


@pytest.mark.slow
def test_demo_cloaks_the_sample_portrait_and_verifies_it(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    if not any(e.in_default_ensemble for e in zoo.load_manifest()):
        pytest.skip("no shipped recognizers")
    result = CliRunner().invoke(app, ["demo", "--folder", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "PROTECTED" in result.output and "NOT PROTECTED" not in result.output
    original = np.asarray(Image.open(tmp_path / "astronaut.png"))
    cloaked = np.asarray(Image.open(tmp_path / "astronaut.cloaked.png"))
    assert cloaked.shape == original.shape
    assert 0 < np.abs(cloaked.astype(int) - original.astype(int)).max() <= MODES["high"].eps
