"""``uncnn-rt convert grad`` on source formats other than ONNX, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from uncnn_rt.cli.app import app
from uncnn_rt.runtime import contract as C


def test_keras_source_becomes_a_validated_attack_graph(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(16),
        ]
    )
    src = tmp_path / "tiny.keras"
    model.save(src)
    result = CliRunner().invoke(app, ["convert", "grad", str(src), "--kind", "face", "--std", "255"])
    assert result.exit_code == 0, result.output
    assert "validation:" in result.output
    attack = onnx.load(str(tmp_path / "tiny.attack.onnx"))
    meta = {p.key: p.value for p in attack.metadata_props}
    assert meta[C.META_EMBEDDING_DIM] == "16"
    assert C.Preprocessing.from_json(meta[C.META_PREPROCESSING]).layout == "NHWC"


def test_unsupported_source_format_is_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(np.zeros(16, np.uint8).tobytes())
    result = CliRunner().invoke(app, ["convert", "grad", str(src)])
    assert result.exit_code == 2
    assert "unsupported model format '.bin'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_torchscript_needs_an_input_shape(tmp_path: Path) -> None:
    src = tmp_path / "net.pt"
    src.write_bytes(b"not really torchscript")
    result = CliRunner().invoke(app, ["convert", "grad", str(src)])
    assert result.exit_code == 2
    assert "--input-shape" in result.output
