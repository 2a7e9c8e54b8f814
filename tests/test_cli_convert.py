"""``uncnn-rt convert grad`` on source formats other than ONNX, and its errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
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


# ---- models the gradient cannot fully follow ---------------------------------------------------------


def _features_of(x: str = "x") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A 3x3 convolution of x [1, 3, 16, 16] and a global average pool: features f [N, 4]."""
    weights = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Conv", [x, "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Reshape", ["g", "fshape"], ["f"]),
    ]
    inits = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "fshape"),
    ]
    return nodes, inits


def _save(path: Path, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], out_shape: list) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def nms_model(path: Path) -> Path:
    """Features scaled by how many boxes NonMaxSuppression keeps, the boxes scored by the features
    (a constant [1, 1, 4] reshape of the scores: the model works at batch 1 only)."""
    nodes, inits = _features_of()
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, 1.1], [2, 2, 3, 3], [5, 5, 6, 6]]], np.float32)
    inits += [
        numpy_helper.from_array(boxes, "boxes"),
        numpy_helper.from_array(np.array([1, 1, 4], np.int64), "sshape"),
        numpy_helper.from_array(np.array([2], np.int64), "most"),
        numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
    ]
    nodes += [
        helper.make_node("Reshape", ["f", "sshape"], ["scores"]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "most", "iou"], ["kept"], name="nms"),
        helper.make_node("Shape", ["kept"], ["kept_shape"], start=0, end=1),
        helper.make_node("Cast", ["kept_shape"], ["count"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "count"], ["out"]),
    ]
    return _save(path, nodes, inits, [1, 4])


def loop_model(path: Path) -> Path:
    """Features doubled three times by a Loop."""
    nodes, inits = _features_of()
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["acc", "two"], ["acc2"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [None, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc2", TensorProto.FLOAT, [None, 4]),
        ],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    inits += [
        numpy_helper.from_array(np.array(3, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "go"),
    ]
    nodes.append(helper.make_node("Loop", ["trips", "go", "f"], ["out"], body=body, name="doubling"))
    return _save(path, nodes, inits, [None, 4])


def test_nms_is_named_as_passing_no_gradient_and_the_batch_of_1_is_said(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source = nms_model(tmp_path / "nms.onnx")
    result = CliRunner().invoke(
        app, ["convert", "grad", str(source), "-o", str(tmp_path / "nms.attack.onnx")]
    )
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert any("no gradient flows through NonMaxSuppression" in n and "'nms'" in n for n in notes), notes
    assert any("one image at a time (a fixed batch of 1)" in n and "Reshape" in n for n in notes), notes
    written = onnx.load(str(tmp_path / "nms.attack.onnx"))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    native = capfd.readouterr().err  # onnxruntime's own log goes to file descriptor 2
    assert "[E:onnxruntime" not in native and "\x1b[" not in native, native


def test_a_loop_is_named_with_the_reason_in_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source = loop_model(tmp_path / "loop.onnx")
    result = CliRunner().invoke(app, ["convert", "grad", str(source)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Loop node 'doubling'" in lines[0] and "control flow" in lines[0]
    assert "static dimension" not in lines[0]
    native = capfd.readouterr().err
    assert "\x1b[" not in native and "onnxruntime:" not in native, native
    assert not (tmp_path / "loop.attack.onnx").exists()


# ---- issue 25: outputs that cannot be written -----------------------------------------------------------


def conv_model(path: Path) -> Path:
    """A convolution and a pool: a face model the converter takes as it is."""
    nodes, inits = _features_of()
    nodes.append(helper.make_node("Identity", ["f"], ["out"]))
    return _save(path, nodes, inits, [None, 4])


@pytest.mark.parametrize("where", ["file/x.onnx", "missing/x.onnx", "/proc/x.onnx"])
def test_an_output_that_cannot_be_written_is_refused_before_the_conversion(
    tmp_path: Path, where: str
) -> None:
    """One line naming the output's folder (never the converter's temporary file), exit 2, before the
    source is even read: this source is not a model, and that is not what the error says."""
    source = tmp_path / "notes.onnx"
    source.write_bytes(b"not a model at all")
    (tmp_path / "file").write_text("a regular file, which holds no folder (for root too)")
    target = Path(where) if where.startswith("/") else tmp_path / where
    result = CliRunner().invoke(app, ["convert", "grad", str(source), "-o", str(target)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {target.parent}"), result.stderr
    assert ".tmp" not in lines[0] and "Traceback" not in result.output
    if where.startswith("missing"):
        assert lines[0] == f"error: {target.parent}: no such folder for the output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes.onnx"]


def test_a_full_disk_while_writing_the_attack_graph_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uncnn_rt.runtime import fileio

    def half_then_full(fh: object, data: bytes) -> None:
        fh.write(data[: len(data) // 2])  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "_write_all", half_then_full)
    source = conv_model(tmp_path / "conv.onnx")
    target = tmp_path / "conv.attack.onnx"
    result = CliRunner().invoke(app, ["convert", "grad", str(source), "--no-validate", "-o", str(target)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {target}: cannot write (No space left on device)"], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]
