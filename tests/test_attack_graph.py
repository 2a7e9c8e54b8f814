"""Attack-graph assembly: folded preprocessing, heads, metadata, batch handling and CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from uncnn_rt.cli.app import app
from uncnn_rt.converters.attack_graph import build_attack_graph, crop_resize_matrix
from uncnn_rt.converters.calibrate import preprocess
from uncnn_rt.converters.validate import sample_image, validate_attack_graph
from uncnn_rt.runtime import contract as C
from uncnn_rt.runtime.errors import ModelError


def tiny_cnn(
    layout: str = "NCHW", size: int = 16, out_dim: int = 8, fixed_batch_reshape: bool = False, seed: int = 0
) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, in either layout, with seeded weights."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (6,)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (6, out_dim)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.array([1, 6], dtype=np.int64), "shape_1x6"),
    ]
    nodes = []
    x = "input"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["input"], ["x_nchw"], perm=[0, 3, 1, 2]))
        x = "x_nchw"
    nodes += [
        helper.make_node("Conv", [x, "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
    ]
    if fixed_batch_reshape:
        nodes.append(helper.make_node("Reshape", ["p", "shape_1x6"], ["f"]))
    else:
        nodes.append(helper.make_node("Flatten", ["p"], ["f"], axis=1))
    nodes.append(helper.make_node("Gemm", ["f", "fc"], ["out"]))
    shape = [1, 3, size, size] if layout == "NCHW" else [1, size, size, 3]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, out_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


FACE_PRE = C.Preprocessing(
    native_size=(16, 16),
    layout="NCHW",
    channel_order="BGR",
    mean=(127.5, 127.5, 127.5),
    std=(128.0, 128.0, 128.0),
    crop=(0.1, 0.05, 0.9, 0.95),
)


def test_crop_resize_matrix_rows_are_convex_weights() -> None:
    for method in ("bilinear", "area"):
        m = crop_resize_matrix(224, 112, 0.0, 224.0, method)  # type: ignore[arg-type]
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
        assert (m >= 0).all()


def test_crop_resize_matrix_matches_onnx_resize_linear_half_pixel() -> None:
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(0).uniform(0, 255, (1, 1, 20, 20)).astype(np.float32)
    node = helper.make_node(
        "Resize", ["x", "", "", "sizes"], ["y"], mode="linear", coordinate_transformation_mode="half_pixel"
    )
    graph = helper.make_graph(
        [node],
        "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 13, 7], dtype=np.int64), "sizes")],
    )
    ref = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    expected = ref.run(None, {"x": x})[0]
    rows, cols = crop_resize_matrix(20, 13, 0.0, 20.0), crop_resize_matrix(20, 7, 0.0, 20.0)
    np.testing.assert_allclose(rows @ x[0, 0] @ cols.T, expected[0, 0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_face_attack_graph_matches_source_and_finite_differences(layout: str) -> None:
    source = tiny_cnn(layout)
    pre = C.Preprocessing(**{**FACE_PRE.__dict__, "layout": layout})
    attack = build_attack_graph(
        source, kind="face", preprocessing=pre, canonical_size=24, name="tiny", threshold=0.4
    )
    report = validate_attack_graph(attack, source)
    assert report.features_max_abs_error < 1e-5, report.describe()
    assert report.grad_relative_error < 1e-3, report.describe()


def test_contract_inputs_outputs_and_metadata() -> None:
    attack = build_attack_graph(
        tiny_cnn(), kind="face", preprocessing=FACE_PRE, canonical_size=24, name="tiny", threshold=0.4
    )
    sess = ort.InferenceSession(attack.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [C.INPUT_IMAGE, C.INPUT_REFERENCE]
    assert [o.name for o in sess.get_outputs()] == [C.OUTPUT_FEATURES, C.OUTPUT_OBJECTIVE, C.OUTPUT_GRAD]
    assert sess.get_inputs()[0].shape == ["N", 24, 24, 3]
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta[C.META_KIND] == "face"
    assert meta[C.META_CANONICAL_SIZE] == "24"
    assert meta[C.META_EMBEDDING_DIM] == "8"
    assert float(meta[C.META_THRESHOLD]) == pytest.approx(0.4)
    assert C.Preprocessing.from_json(meta[C.META_PREPROCESSING]) == FACE_PRE
    # Only standard ops, so any execution provider can run it.
    assert {n.domain for n in attack.graph.node} <= {"", "ai.onnx"}

    images = np.stack([sample_image(24, s) for s in range(3)])
    feats, objective, grad = sess.run(
        None, {C.INPUT_IMAGE: images, C.INPUT_REFERENCE: np.zeros((3, 8), np.float32)}
    )
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    ref = feats[::-1].copy()
    _, objective, grad = sess.run(None, {C.INPUT_IMAGE: images, C.INPUT_REFERENCE: ref})
    np.testing.assert_allclose(objective, (feats * ref).sum(axis=1), rtol=1e-5)
    assert grad.shape == images.shape


def test_classifier_head_is_log_softmax_with_labels() -> None:
    labels = [f"class {i}" for i in range(8)]
    pre = C.Preprocessing(native_size=(16, 16))
    source = tiny_cnn("NHWC")
    attack = build_attack_graph(
        source, kind="classifier", preprocessing=pre, canonical_size=16, name="cls", labels=labels
    )
    sess = ort.InferenceSession(attack.SerializeToString(), providers=["CPUExecutionProvider"])
    image = sample_image(16)[None]
    logp = sess.run(
        [C.OUTPUT_FEATURES], {C.INPUT_IMAGE: image, C.INPUT_REFERENCE: np.zeros((1, 8), np.float32)}
    )[0]
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)
    raw = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": preprocess(image, pre)}
    )[0]
    assert int(np.argmax(raw)) == int(np.argmax(logp))
    assert json.loads(sess.get_modelmeta().custom_metadata_map[C.META_LABELS]) == labels
    assert validate_attack_graph(attack, source).ok


def test_fixed_batch_source_falls_back_to_batch_one() -> None:
    attack = build_attack_graph(
        tiny_cnn(fixed_batch_reshape=True),
        kind="face",
        preprocessing=FACE_PRE,
        canonical_size=24,
        name="fixed",
    )
    assert attack.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_dynamic_batch_gives_per_sample_gradients() -> None:
    attack = build_attack_graph(tiny_cnn(), kind="face", preprocessing=FACE_PRE, canonical_size=24, name="t")
    sess = ort.InferenceSession(attack.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.stack([sample_image(24, s) for s in range(2)])
    ref = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    _, _, both = sess.run(None, {C.INPUT_IMAGE: images, C.INPUT_REFERENCE: ref})
    for i in range(2):
        _, _, one = sess.run(None, {C.INPUT_IMAGE: images[i : i + 1], C.INPUT_REFERENCE: ref[i : i + 1]})
        np.testing.assert_allclose(both[i], one[0], rtol=1e-4, atol=1e-7)


def test_wrong_input_shape_is_a_specific_error() -> None:
    with pytest.raises(ModelError, match=r"expects \['N', 3, 32, 32\]"):
        build_attack_graph(
            tiny_cnn(),
            kind="face",
            preprocessing=C.Preprocessing(native_size=(32, 32), layout="NCHW"),
            canonical_size=32,
            name="x",
        )


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ModelError, match="kind must be one of"):
        build_attack_graph(
            tiny_cnn(),
            kind="detector",
            preprocessing=FACE_PRE,  # type: ignore[arg-type]
            canonical_size=24,
            name="x",
        )


def test_cli_convert_grad_writes_a_validated_attack_graph(tmp_path) -> None:
    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(src))
    before = src.read_bytes()
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "grad",
            str(src),
            "--kind",
            "face",
            "--mean",
            "127.5",
            "--std",
            "128",
            "--canonical-size",
            "24",
            "--threshold",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "validation:" in result.output
    out = tmp_path / "tiny.attack.onnx"
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == [C.OUTPUT_FEATURES, C.OUTPUT_OBJECTIVE, C.OUTPUT_GRAD]
    assert src.read_bytes() == before


def test_cli_convert_grad_rejects_a_non_onnx_file(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = CliRunner().invoke(app, ["convert", "grad", str(bad)])
    assert result.exit_code == 2
    assert "not a readable ONNX model" in result.output
    assert not (tmp_path / "bad.attack.onnx").exists()
