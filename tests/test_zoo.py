"""The shipped model zoo: manifest, files, attack-graph contract, and dev-set figures.

Tests marked ``shared`` need ``../shared/faces/dev``; those marked ``convert`` need the source packages
in the zoo cache (``UNCNN_ZOO_CACHE``, default ``~/.cache/uncnn-rt-zoo``; filled by
``python -m uncnn_rt.converters.zoo build``) and the [convert] extra. Nothing here downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray

from uncnn_rt.converters import calibrate, zoo
from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import contract as C
from uncnn_rt.runtime.contract import Preprocessing
from uncnn_rt.runtime.errors import InputError

ort = pytest.importorskip("onnxruntime")

SHARED = Path(__file__).parents[2] / "shared"
DEV = SHARED / "faces" / "dev" / "identities"
CACHE = Path(os.environ.get("UNCNN_ZOO_CACHE", zoo.DEFAULT_CACHE))
MODELS_DIR = catalog.models_dir()
MANIFEST = (
    json.loads((MODELS_DIR / "manifest.json").read_text())
    if (MODELS_DIR / "manifest.json").is_file()
    else None
)
ENTRIES = {e["name"]: e for e in (MANIFEST or {"models": []})["models"]}
ATTACK = [n for n, e in ENTRIES.items() if e["kind"] in ("face", "classifier")]
FACES = [n for n, e in ENTRIES.items() if e["kind"] == "face"]
SPECS = {m.name: m for m in zoo.MODELS}

needs_manifest = pytest.mark.skipif(MANIFEST is None, reason="models/manifest.json is not built")
needs_dev = pytest.mark.skipif(not DEV.is_dir(), reason=f"dev set {DEV} not present (../shared/faces/dev)")


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS_DIR / ENTRIES[name]["file"]), providers=["CPUExecutionProvider"])


def astronaut_face() -> NDArray[np.float32]:
    """A real face as a canonical crop: the astronaut's head, framed about like a dev chip, at 224."""
    from PIL import Image
    from skimage import data

    head = Image.fromarray(data.astronaut()[75:195, 165:285])
    return calibrate.canonical_crop(head, C.CANONICAL_SIZE)[None]


def _features(name: str, crops: NDArray[np.float32]) -> NDArray[np.float32]:
    return calibrate.onnx_embedder(MODELS_DIR / ENTRIES[name]["file"])(crops)


def _source_file(name: str) -> Path:
    spec = SPECS[name]
    archive = CACHE / spec.source.archive
    if not archive.is_file():
        pytest.skip(f"source package {spec.source.archive} not in the zoo cache {CACHE}")
    return zoo.package_file(spec.source, spec.path, CACHE)


# ---------------------------------------------------------------------------------------------- manifest


@needs_manifest
def test_manifest_schema_and_hashes() -> None:
    assert MANIFEST["format"] == 1
    required = {
        "name",
        "file",
        "sha256",
        "bytes",
        "kind",
        "role",
        "source",
        "canonical_size",
        "native_size",
        "preprocessing",
        "embedding_dim",
        "threshold",
        "threshold_fmr",
        "default_ensemble",
        "dev",
        "notes",
    }
    for entry in MANIFEST["models"]:
        assert required <= set(entry), entry["name"]
        assert {"package", "version", "path", "archive_sha256", "upstream", "license"} <= set(entry["source"])
        assert entry["kind"] in ("face", "classifier", "detector")
        path = MODELS_DIR / entry["file"]
        assert path.stat().st_size == entry["bytes"]
        assert catalog.sha256_file(path) == entry["sha256"]
        Preprocessing.from_json(json.dumps(entry["preprocessing"]))
    for e in catalog.load_manifest():
        assert catalog.verify(e) is None


@needs_manifest
def test_models_dir_under_size_budget() -> None:
    total = sum(p.stat().st_size for p in MODELS_DIR.iterdir() if p.is_file())
    assert total < 120e6


@needs_manifest
def test_every_manifest_entry_is_a_pinned_zoo_model() -> None:
    for name, entry in ENTRIES.items():
        spec = SPECS[name]
        assert entry["source"]["version"] == spec.source.version
        assert entry["source"]["archive_sha256"] == spec.source.archive_sha256


@needs_manifest
def test_default_ensemble_only_holds_recognizers_that_separate_identities() -> None:
    for entry in MANIFEST["models"]:
        if entry["default_ensemble"]:
            assert entry["kind"] == "face"
            assert entry["dev"]["rank1"] >= zoo.MIN_DEFAULT_RANK1
        elif entry["kind"] == "face":
            assert entry["notes"]


@needs_manifest
def test_imagenet_labels_ship_with_the_classifier() -> None:
    labels = (MODELS_DIR / zoo.LABELS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(labels) == 1000
    assert labels[281] == "tabby" and labels[967] == "espresso"


# ------------------------------------------------------------------------------------- attack graphs


@needs_manifest
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_shipped_model_loads_in_plain_cpu_session(name: str) -> None:
    sess = _session(name)
    model = onnx.load(str(MODELS_DIR / ENTRIES[name]["file"]))
    assert {imp.domain for imp in model.opset_import} <= {"", "ai.onnx"}
    if name in ATTACK:
        assert [i.name for i in sess.get_inputs()] == [C.INPUT_IMAGE, C.INPUT_REFERENCE]
        assert [o.name for o in sess.get_outputs()] == [C.OUTPUT_FEATURES, C.OUTPUT_OBJECTIVE, C.OUTPUT_GRAD]
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta[C.META_KIND] == ENTRIES[name]["kind"]
        assert int(meta[C.META_CANONICAL_SIZE]) == ENTRIES[name]["canonical_size"]
        assert int(meta[C.META_EMBEDDING_DIM]) == ENTRIES[name]["embedding_dim"]


@needs_manifest
@pytest.mark.parametrize("name", ATTACK)
def test_grad_matches_finite_difference(name: str) -> None:
    """d objective / d image along the FGSM direction sign(grad), against a central difference.

    Along sign(grad) the directional derivative is sum |grad|, large enough that float32 rounding of
    the objective does not swamp the difference quotient (a random direction's derivative nearly
    cancels).
    """
    sess = _session(name)
    x = astronaut_face()
    dim = ENTRIES[name]["embedding_dim"]
    rng = np.random.default_rng(0)
    if ENTRIES[name]["kind"] == "face":
        ref = rng.normal(size=(1, dim)).astype(np.float32)
        ref /= np.linalg.norm(ref)
    else:  # a one-hot target class, as the classifier attacks use
        ref = np.zeros((1, dim), np.float32)
        ref[0, 281] = 1.0
    _, _, grad = sess.run(None, {"image": x, "reference": ref})
    assert grad.shape == x.shape and np.isfinite(grad).all()
    direction = np.sign(grad).astype(np.float32)
    analytic = float(np.sum(grad * direction))
    h = min(0.1, 0.02 / analytic)  # pixel units (0..255); a step that moves the objective by <= 0.02
    plus = sess.run(["objective"], {"image": x + h * direction, "reference": ref})[0]
    minus = sess.run(["objective"], {"image": x - h * direction, "reference": ref})[0]
    numeric = float((plus - minus)[0] / (2 * h))
    assert analytic > 0
    assert numeric == pytest.approx(analytic, rel=0.1)


@needs_manifest
@needs_dev
@pytest.mark.shared
@pytest.mark.parametrize("name", FACES)
def test_face_model_reaches_its_manifest_dev_figures(name: str) -> None:
    entry = ENTRIES[name]
    figures, _, _ = calibrate.calibrate_folder(
        calibrate.onnx_embedder(MODELS_DIR / entry["file"]),
        DEV,
        canonical_size=entry["canonical_size"],
        fmr=entry["threshold_fmr"],
    )
    assert figures.rank1 >= entry["dev"]["rank1"] - 1e-9
    assert figures.n_chips == entry["dev"]["n_chips"]
    assert figures.threshold == pytest.approx(entry["threshold"], abs=1e-3)
    assert figures.tmr == pytest.approx(entry["dev"]["tmr"], abs=1.5 / figures.n_genuine_pairs)
    # The cloak's default aim divides the threshold by this figure (runtime/cloak/photo.py aim_for).
    assert figures.genuine_p95 == pytest.approx(entry["dev"]["genuine_p95"], abs=1e-3)


@needs_manifest
def test_classifier_calls_chelsea_a_cat_and_coffee_espresso() -> None:
    labels = (MODELS_DIR / zoo.LABELS_FILE).read_text(encoding="utf-8").splitlines()
    dev = zoo.classifier_dev(_features_embedder("efficientnet_lite0"), labels)
    cats = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert dev["chelsea"][0][0] in cats
    assert dev["coffee"][0][0] == "espresso"
    assert [c[0] for c in dev["chelsea"]] == [c[0] for c in ENTRIES["efficientnet_lite0"]["dev"]["chelsea"]]


def _features_embedder(name: str) -> calibrate.EmbedFn:
    return calibrate.onnx_embedder(MODELS_DIR / ENTRIES[name]["file"])


@needs_manifest
def test_blazeface_finds_the_astronauts_face() -> None:
    dev = zoo.detector_dev(onnx.load(str(MODELS_DIR / ENTRIES["blazeface"]["file"])))
    assert dev["astronaut_best_score"] > 0.7
    x0, y0, x1, y1 = dev["astronaut_best_box_xyxy_fraction"]
    # The astronaut's face spans about x 0.33..0.55, y 0.15..0.36 of the photo.
    assert 0.3 < (x0 + x1) / 2 < 0.55 and 0.15 < (y0 + y1) / 2 < 0.35


@needs_manifest
def test_both_mobilefacenet_files_compute_the_same_embedding() -> None:
    """human-models' repaired mobilefacenet and expo's MobileFaceNet.tflite: one network, two publishers."""
    x = astronaut_face()
    a = _features("mobilefacenet", x)
    b = _features("expo_mobilefacenet", x)
    np.testing.assert_allclose(a, b, atol=1e-4)


# ------------------------------------------------------------------ shipped features vs source framework


def _normalised(v: NDArray[np.floating]) -> NDArray[np.float32]:
    return calibrate.l2_normalise(np.asarray(v))


@needs_manifest
@pytest.mark.convert
@pytest.mark.parametrize("name", ["faceres", "mobileface"])
def test_tfjs_features_equal_tensorflow_running_the_source_graph(name: str) -> None:
    pytest.importorskip("tensorflow")
    from uncnn_rt.converters import tfjs

    spec = SPECS[name]
    output = {"faceres": "global_pooling/Mean", "mobileface": "batchnorm0/add_1"}[name]
    run = tfjs.tf_reference(_source_file(name), [output])
    x = astronaut_face()
    want = _normalised(run(calibrate.preprocess(x, spec.preprocessing))[0])
    np.testing.assert_allclose(_features(name, x), want, atol=1e-4)


@needs_manifest
@pytest.mark.convert
@pytest.mark.parametrize("name", ["expo_mobilefacenet", "mobilefacenet"])
def test_mobilefacenet_features_equal_the_tflite_interpreter(name: str) -> None:
    tf = pytest.importorskip("tensorflow")
    path = _source_file("expo_mobilefacenet")
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    x = astronaut_face()
    native = calibrate.preprocess(x, SPECS["expo_mobilefacenet"].preprocessing)
    interpreter.set_tensor(inp["index"], np.repeat(native, inp["shape"][0], axis=0))
    interpreter.invoke()
    want = _normalised(interpreter.get_tensor(out["index"])[:1])
    np.testing.assert_allclose(_features(name, x), want, atol=1e-4)


@needs_manifest
@pytest.mark.convert
def test_fr_feature_features_equal_the_published_onnx() -> None:
    path = _source_file("fr_feature")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = astronaut_face()
    want = _normalised(
        sess.run(None, {"input": calibrate.preprocess(x, SPECS["fr_feature"].preprocessing)})[0]
    )
    np.testing.assert_allclose(_features("fr_feature", x), want, atol=1e-4)


@needs_manifest
@pytest.mark.convert
def test_efficientnet_log_softmax_equals_torch() -> None:
    torch = pytest.importorskip("torch")
    from uncnn_rt.converters import pytorch

    module = pytorch.efficientnet_lite0(_source_file("efficientnet_lite0"))
    x = astronaut_face()
    native = calibrate.preprocess(x, SPECS["efficientnet_lite0"].preprocessing)
    with torch.no_grad():
        want = torch.log_softmax(module(torch.from_numpy(native)), dim=1).numpy()
    np.testing.assert_allclose(_features("efficientnet_lite0", x), want, atol=1e-3)


# --------------------------------------------------------------------------------------- build pieces


def test_fetch_rejects_an_archive_whose_hash_differs(tmp_path: Path) -> None:
    source = zoo.Source(
        "npm:example", "1.0.0", "example-1.0.0.tgz", "0" * 64, "https://example.invalid", "MIT"
    )
    (tmp_path / source.archive).write_bytes(b"not the pinned bytes")
    with pytest.raises(InputError, match="does not match the pinned"):
        zoo.fetch(source, tmp_path)


def _prelu_model(slope: NDArray[np.float32]) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Relu", ["x"], ["pos"]),
        helper.make_node("Abs", ["x"], ["abs"]),
        helper.make_node("Sub", ["x", "abs"], ["neg2"]),
        helper.make_node("Mul", ["neg2", "slope"], ["neg"]),
        helper.make_node("Add", ["pos", "neg"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "prelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(slope, "slope")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_negate_prelu_slopes_flips_only_the_prelu_pattern() -> None:
    from onnx import numpy_helper

    model = _prelu_model(np.array([0.5, -0.25, 0.0, 1.0], np.float32))
    assert zoo.negate_prelu_slopes(model) == 1
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), [-0.5, 0.25, -0.0, -1.0])
    plain = _prelu_model(np.ones(4, np.float32))
    plain.graph.node[2].input[:] = ["abs", "x"]  # |x| - x is not the PReLU's negative branch
    assert zoo.negate_prelu_slopes(plain) == 0


def test_window_past_the_crop_equals_numpy_preprocessing() -> None:
    """An ArcFace-style window reaching past the canonical crop samples the crop's edge pixels there,
    in the attack graph exactly as in the numpy preprocessing the calibration uses."""
    from onnx import TensorProto, helper

    from uncnn_rt.converters.attack_graph import build_attack_graph

    prep = Preprocessing(
        native_size=(12, 12), layout="NCHW", crop=(-0.25, -0.1, 0.9, 1.1), mean=(127.5,) * 3, std=(128.0,) * 3
    )
    ident = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "id",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 12, 12])],
    )
    model = helper.make_model(ident, opset_imports=[helper.make_opsetid("", 17)])
    attack = build_attack_graph(model, kind="face", preprocessing=prep, canonical_size=32, name="window")
    crops = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    sess = ort.InferenceSession(attack.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(["features"], {"image": crops, "reference": np.zeros((2, 432), np.float32)})[0]
    expected = calibrate.preprocess(crops, prep).reshape(2, -1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("columns", [80, 200])
def test_models_list_keeps_each_source_whole(columns: int) -> None:
    """At 80 columns the source column broke a package name over 5 lines."""
    from typer.testing import CliRunner

    from uncnn_rt.cli.app import app

    entries = catalog.load_manifest()
    if not entries:
        pytest.skip("no shipped models")
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= columns
    for e in entries:
        source = f"{e.source.get('package')}@{e.source.get('version')}"
        assert any(source in line for line in lines), (source, result.output)
        assert sum(line.startswith(e.name + " ") for line in lines) == 1  # one row per model


@pytest.mark.parametrize("fixed", [1, 2, None])
def test_onnx_embedder_runs_fixed_batch_models_in_chunks(tmp_path: Path, fixed: int | None) -> None:
    """A forward model exported with a fixed batch (TFLite's 1, or 2) embeds 5 crops as a dynamic one
    does: chunks of its batch, the last padded with copies and trimmed (``sessions.run_chunked``)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [fixed or "N", 4, 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [fixed or "N", 48])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 48])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "flat", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "flat.onnx"
    onnx.save(model, path)
    crops = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 3)).astype(np.float32)
    prep = Preprocessing(native_size=(4, 4), mean=(127.5,) * 3, std=(127.5,) * 3)
    got = calibrate.onnx_embedder(path, prep, batch=3)(crops)
    np.testing.assert_array_equal(got, calibrate.preprocess(crops, prep).reshape(5, -1))
