"""Source converters (ONNX, TF.js, TFLite, Keras, PyTorch) and the calibration helpers.

Every conversion is checked the same way: the source framework and onnxruntime run the same input and
must agree. Tests needing tensorflow / torch skip without them (the [convert] extra); the TF.js test
needs the human-models package in the zoo cache (``UNCNN_ZOO_CACHE``) and skips without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters import calibrate, onnx_source, zoo
from uncnn_rt.runtime.contract import Preprocessing
from uncnn_rt.runtime.errors import InputError, ModelError

ort = pytest.importorskip("onnxruntime")
CACHE = Path(os.environ.get("UNCNN_ZOO_CACHE", zoo.DEFAULT_CACHE))
RNG = np.random.default_rng(0)


def run_onnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def batch_dim(model: onnx.ModelProto) -> str | int:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


# ----------------------------------------------------------------------------------------------- ONNX


def _conv_relu_model(
    opset: int, *, batch: int | str = "N", reshape_to_batch: bool = False
) -> onnx.ModelProto:
    w = np.random.default_rng(7).normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    inits = [numpy_helper.from_array(w, "w")]
    if reshape_to_batch:
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["output"]))
        inits.append(numpy_helper.from_array(np.array([batch, -1], np.int64), "shape"))
        out_shape: list[int | str] = [batch, 4 * 8 * 8]
    else:
        nodes[-1].output[0] = "output"
        out_shape = [batch, 4, 8, 8]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_onnx_passthrough_upgrades_opset_and_keeps_outputs(tmp_path: Path) -> None:
    source = _conv_relu_model(9)
    path = tmp_path / "m.onnx"
    onnx.save(source, str(path))
    converted = onnx_source.convert(path)
    assert onnx_source.ai_onnx_opset(converted) == onnx_source.TARGET_OPSET
    assert converted.producer_name == onnx_source.PRODUCER_NAME
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(converted, x), run_onnx(source, x), atol=1e-6)


def test_onnx_passthrough_makes_a_fixed_batch_of_one_dynamic() -> None:
    converted = onnx_source.convert(_conv_relu_model(13, batch=1, reshape_to_batch=True))
    assert batch_dim(converted) == onnx_source.BATCH_DIM
    x = RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)
    rows = np.concatenate([run_onnx(converted, x[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(run_onnx(converted, x), rows, atol=1e-6)


def test_onnx_passthrough_errors_name_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such ONNX file"):
        onnx_source.convert(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        onnx_source.convert(tmp_path / "junk.onnx")
    custom = _conv_relu_model(17)
    custom.graph.node[1].domain = "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelError, match="non-standard domains"):
        onnx_source.convert(custom)


def test_canonical_names_do_not_depend_on_the_converters_counter() -> None:
    def named(counter: int) -> onnx.ModelProto:
        model = _conv_relu_model(17)
        model.graph.node[0].output[0] = f"Conv__{counter}:0"
        model.graph.node[1].input[0] = f"Conv__{counter}:0"
        model.graph.node[0].name = f"Conv__{counter + 1}"
        return model

    a, b = onnx_source.canonical_names(named(17)), onnx_source.canonical_names(named(912))
    assert a.SerializeToString() == b.SerializeToString()


# ---------------------------------------------------------------------------------------------- TF.js


def test_fill_fused_targs_adds_one_dtype_per_fused_argument() -> None:
    topology = {
        "node": [
            {"name": "c", "op": "_FusedConv2D", "attr": {"T": {"type": "DT_FLOAT"}, "num_args": {"i": "2"}}},
            {"name": "m", "op": "_FusedMatMul", "attr": {"T": {"type": "DT_FLOAT"}, "num_args": {"i": "1"}}},
        ]
    }
    from uncnn_rt.converters import tfjs

    assert tfjs.fill_fused_targs(topology) == 1
    assert topology["node"][0]["attr"]["TArgs"] == {"list": {"type": ["DT_FLOAT", "DT_FLOAT"]}}
    assert "TArgs" not in topology["node"][1]["attr"]


def test_unfuse_shared_relu_gives_the_prelu_its_raw_input_back() -> None:
    import base64

    from uncnn_rt.converters import tfjs

    enc = [base64.b64encode(s).decode() for s in (b"BiasAdd", b"Relu")]
    topology = {
        "node": [
            {"name": "x", "op": "Placeholder"},
            {
                "name": "dw",
                "op": "FusedDepthwiseConv2dNative",
                "input": ["x", "w", "b"],
                "attr": {"T": {"type": "DT_FLOAT"}, "fused_ops": {"list": {"s": list(enc)}}},
            },
            {"name": "abs", "op": "Abs", "input": ["dw"]},
            {"name": "sub", "op": "Sub", "input": ["dw", "abs"]},
            {"name": "mul", "op": "Mul", "input": ["sub", "alpha"]},
            {"name": "add", "op": "Add", "input": ["dw", "mul"]},
        ]
    }
    assert tfjs.unfuse_shared_relu(topology) == 1
    nodes = {n["name"]: n for n in topology["node"]}
    assert nodes["dw"]["attr"]["fused_ops"]["list"]["s"] == enc[:1]
    assert nodes["dw/unfused_relu"]["op"] == "Relu"
    assert nodes["abs"]["input"] == ["dw"] and nodes["sub"]["input"] == ["dw", "abs"]
    assert nodes["add"]["input"] == ["dw/unfused_relu", "mul"]
    order = [n["name"] for n in topology["node"]]
    assert order.index("dw/unfused_relu") == order.index("dw") + 1


def test_tfjs_rejects_layers_models(tmp_path: Path) -> None:
    from uncnn_rt.converters import tfjs

    path = tmp_path / "model.json"
    path.write_text(
        json.dumps({"format": "layers-model", "modelTopology": {"keras_version": "2"}, "weightsManifest": []})
    )
    with pytest.raises(InputError, match="graph model"):
        tfjs.convert(path)
    with pytest.raises(InputError, match=r"no such TF\.js model\.json"):
        tfjs.convert(tmp_path / "absent.json")


@pytest.mark.convert
def test_tfjs_conversion_equals_tensorflow_on_a_real_face() -> None:
    """mobileface.json through tf2onnx vs TensorFlow executing the same graph, at a dynamic batch."""
    pytest.importorskip("tensorflow")
    from skimage import data

    from uncnn_rt.converters import tfjs

    if not (CACHE / zoo.HUMAN_MODELS.archive).is_file():
        pytest.skip(f"{zoo.HUMAN_MODELS.archive} not in the zoo cache {CACHE}")
    path = zoo.package_file(zoo.HUMAN_MODELS, "models/mobileface.json", CACHE)
    model = tfjs.convert(path)
    assert batch_dim(model) == onnx_source.BATCH_DIM
    face = np.asarray(data.astronaut()[75:195, 165:285], np.float32)
    crops = np.stack([face, face[:, ::-1], 255 - face])
    from PIL import Image

    crops = np.stack(
        [np.asarray(Image.fromarray(c.astype(np.uint8)).resize((112, 112)), np.float32) for c in crops]
    )
    want = tfjs.tf_reference(path, ["batchnorm0/add_1"])(crops)[0]
    np.testing.assert_allclose(run_onnx(model, crops), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- TFLite


@pytest.mark.convert
def test_tflite_conversion_equals_the_interpreter(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    from uncnn_rt.converters import tflite

    inputs = tf.keras.Input((16, 16, 3), batch_size=2)
    x = tf.keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = tf.keras.layers.Flatten()(x)
    outputs = tf.keras.layers.Dense(5)(x)
    keras_model = tf.keras.Model(inputs, outputs)
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras_model).convert())

    model = tflite.convert(path)
    assert batch_dim(model) == onnx_source.BATCH_DIM  # the fixed TFLite batch of 2 became dynamic
    batch = RNG.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], batch)
    interpreter.invoke()
    want = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(run_onnx(model, batch), want, atol=1e-5)
    np.testing.assert_allclose(run_onnx(model, batch[:1]), want[:1], atol=1e-5)


def test_tflite_rejects_other_files(tmp_path: Path) -> None:
    from uncnn_rt.converters import tflite

    (tmp_path / "x.tflite").write_bytes(b"PK\x03\x04 a zip, not a flatbuffer")
    with pytest.raises(InputError, match="TFL3"):
        tflite.convert(tmp_path / "x.tflite")


# ---------------------------------------------------------------------------------------------- Keras


def inception_resnet_v1(keras: object, input_shape: tuple[int, int, int] = (96, 96, 3)) -> object:
    """FaceNet's Inception-ResNet-v1 (Szegedy et al. 2016, as in FaceNet implementations), random weights.

    Stem, 5x Block35 (scale 0.17), Reduction-A, 10x Block17 (0.10), Reduction-B, 5x Block8 (0.20, the
    last without activation), average pooling, a 128-d bottleneck with batch norm, and L2 normalisation.
    Residual scaling and the normalisation are Lambda layers, as in published FaceNet Keras files.
    """
    layers = keras.layers  # type: ignore[attr-defined]

    def conv(x, filters, kernel, strides=1, padding="same", activation=True):
        x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.995, epsilon=0.001, scale=False)(x)
        return layers.Activation("relu")(x) if activation else x

    def residual(x, branches, scale, activation=True):
        mixed = layers.Concatenate()(branches)
        up = layers.Conv2D(x.shape[-1], 1, use_bias=True)(mixed)
        x = layers.Lambda(lambda t, s: t[0] + t[1] * s, arguments={"s": scale})([x, up])
        return layers.Activation("relu")(x) if activation else x

    inputs = keras.Input(input_shape)  # type: ignore[attr-defined]
    x = conv(inputs, 32, 3, 2, "valid")
    x = conv(x, 32, 3, padding="valid")
    x = conv(x, 64, 3)
    x = layers.MaxPooling2D(3, 2)(x)
    x = conv(x, 80, 1, padding="valid")
    x = conv(x, 192, 3, padding="valid")
    x = conv(x, 256, 3, 2, "valid")
    for _ in range(5):
        x = residual(
            x, [conv(x, 32, 1), conv(conv(x, 32, 1), 32, 3), conv(conv(conv(x, 32, 1), 32, 3), 32, 3)], 0.17
        )
    x = layers.Concatenate()(
        [
            conv(x, 384, 3, 2, "valid"),
            conv(conv(conv(x, 192, 1), 192, 3), 256, 3, 2, "valid"),
            layers.MaxPooling2D(3, 2)(x),
        ]
    )
    for _ in range(10):
        x = residual(x, [conv(x, 128, 1), conv(conv(conv(x, 128, 1), 128, (1, 7)), 128, (7, 1))], 0.10)
    x = layers.Concatenate()(
        [
            conv(conv(x, 256, 1), 384, 3, 2, "valid"),
            conv(conv(x, 256, 1), 256, 3, 2, "valid"),
            conv(conv(conv(x, 256, 1), 256, 3), 256, 3, 2, "valid"),
            layers.MaxPooling2D(3, 2)(x),
        ]
    )
    for i in range(5):
        x = residual(
            x,
            [conv(x, 192, 1), conv(conv(conv(x, 192, 1), 192, (1, 3)), 192, (3, 1))],
            0.20,
            activation=i < 4,
        )
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Dense(128, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.995, epsilon=0.001, scale=False)(x)
    outputs = layers.Lambda(
        lambda t: t / keras.ops.sqrt(keras.ops.sum(t * t, axis=1, keepdims=True) + 1e-10)
    )(x)  # type: ignore[attr-defined]
    return keras.Model(inputs, outputs, name="inception_resnet_v1")  # type: ignore[attr-defined]


def _randomise_batchnorm(model: object) -> None:
    """Non-trivial batch-norm parameters and moving statistics, so inference-mode BN is exercised."""
    rng = np.random.default_rng(1)
    draw = {
        "gamma": lambda n: rng.uniform(0.8, 1.2, n),
        "beta": lambda n: rng.normal(0, 0.1, n),
        "moving_mean": lambda n: rng.normal(0, 0.1, n),
        "moving_variance": lambda n: rng.uniform(0.5, 1.5, n),
    }
    for layer in model.layers:  # type: ignore[attr-defined]
        if type(layer).__name__ == "BatchNormalization":
            names = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
            layer.set_weights(
                [draw[n](w.shape).astype(np.float32) for n, w in zip(names, layer.get_weights(), strict=True)]
            )


@pytest.mark.convert
@pytest.mark.slow
def test_keras_inception_v3_file_converts(tmp_path: Path) -> None:
    """The seed's Inception-v3 architecture, random weights, through a saved .keras file."""
    keras = pytest.importorskip("keras")
    from uncnn_rt.converters import keras as keras_converter

    keras.utils.set_random_seed(0)
    model = keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3), classes=10)
    _randomise_batchnorm(model)
    path = tmp_path / "inception_v3.keras"
    model.save(path)
    converted = keras_converter.convert(path)
    assert [i.name for i in converted.graph.input] == ["input"]
    assert batch_dim(converted) == onnx_source.BATCH_DIM
    x = RNG.uniform(-1, 1, size=(2, 75, 75, 3)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(converted, x), model(x, training=False).numpy(), atol=1e-5)


@pytest.mark.convert
@pytest.mark.slow
def test_keras_facenet_inception_resnet_v1_converts() -> None:
    """The seed's FaceNet architecture (Inception-ResNet-v1 with Lambda layers), random weights."""
    keras = pytest.importorskip("keras")
    from uncnn_rt.converters import keras as keras_converter

    keras.utils.set_random_seed(0)
    model = inception_resnet_v1(keras)
    _randomise_batchnorm(model)
    converted = keras_converter.convert(model)
    x = RNG.uniform(-1, 1, size=(2, 96, 96, 3)).astype(np.float32)
    got = run_onnx(converted, x)
    assert got.shape == (2, 128)
    np.testing.assert_allclose(got, model(x, training=False).numpy(), atol=1e-5)


def test_keras_rejects_unknown_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    from uncnn_rt.converters import keras as keras_converter

    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"\.keras or \.h5"):
        keras_converter.convert(tmp_path / "model.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="SavedModel"):
        keras_converter.convert(tmp_path / "empty")


# -------------------------------------------------------------------------------------------- PyTorch


@pytest.mark.convert
def test_pytorch_module_and_torchscript_file_convert(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from uncnn_rt.converters import pytorch

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.BatchNorm2d(8),
        torch.nn.PReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).eval()
    x = RNG.normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    from_module = pytorch.convert(module, input_shape=(1, 3, 32, 32))
    assert batch_dim(from_module) == onnx_source.BATCH_DIM
    np.testing.assert_allclose(run_onnx(from_module, x), want, atol=1e-5)
    script = tmp_path / "m.pt"
    torch.jit.trace(module, torch.zeros(1, 3, 32, 32)).save(str(script))
    np.testing.assert_allclose(
        run_onnx(pytorch.convert(script, input_shape=(1, 3, 32, 32)), x), want, atol=1e-5
    )
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(InputError, match="TorchScript"):
        pytorch.convert(tmp_path / "bad.pt", input_shape=(1, 3, 32, 32))


@pytest.mark.convert
def test_efficientnet_lite0_architecture_exports_exactly() -> None:
    torch = pytest.importorskip("torch")
    from uncnn_rt.converters import pytorch

    torch.manual_seed(0)
    module = pytorch.efficientnet_lite0()
    assert sum(p.numel() for p in module.parameters()) == 4_652_008  # EfficientNet-Lite0's 4.65M parameters
    x = RNG.normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        run_onnx(pytorch.convert(module, input_shape=(1, 3, 224, 224)), x), want, atol=1e-4
    )


def test_same_padding_matches_tensorflow_rule() -> None:
    from uncnn_rt.converters.pytorch import _same_pad

    assert _same_pad(224, 3, 2) == (0, 1)
    assert _same_pad(112, 5, 2) == (1, 2)
    assert _same_pad(56, 3, 1) == (1, 1)


# ---------------------------------------------------------------------------------------- calibration


def test_rank1_and_threshold_on_known_features() -> None:
    labels = ["a", "a", "b", "b", "c", "c"]
    feats = np.array(
        [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.1, 0.9, 0], [0, 0, 1], [0.8, 0, 0.6]], np.float32
    )
    assert calibrate.rank1(feats, labels) == pytest.approx(5 / 6)  # the last one's nearest is an "a"
    # By hand (unit rows; a2 = b2 mirrored = (0.9939, 0.1104, 0)): the genuine pairs a1.a2 = b1.b2 =
    # 0.9939 and c1.c2 = 0.6; the 12 impostor pairs, highest first: a1.c2 = 0.8, a2.c2 = 0.7951,
    # a2.b2 = 0.2195, a1.b2 = a2.b1 = 0.1104, b2.c2 = 0.0883, then six zeros.
    genuine, impostor = calibrate.pair_similarities(feats, labels)
    np.testing.assert_allclose(np.sort(genuine), [0.6, 0.99388373, 0.99388373], atol=1e-6)
    np.testing.assert_allclose(
        np.sort(impostor)[::-1][:6],
        [0.8, 0.79510698, 0.2195122, 0.11043153, 0.11043153, 0.08834522],
        atol=1e-6,
    )
    assert (np.sort(impostor)[:6] == 0).all()
    # FMR 0: just above the highest impostor (0.8); the genuine pairs at 0.9939 match, c1.c2 (0.6) not.
    figures = calibrate.calibrate(feats, labels, fmr=0.0)
    assert figures.threshold == pytest.approx(0.8, abs=1e-6) and figures.threshold > impostor.max()
    assert (figures.tmr, figures.fmr) == (pytest.approx(2 / 3), 0.0)
    assert (figures.n_genuine_pairs, figures.n_impostor_pairs, figures.n_chips, figures.n_identities) == (
        3, 12, 6, 3,
    )  # fmt: skip
    # FMR 1/12 allows one impostor: just above the second highest (0.7951); still 2 of 3 genuine pairs.
    one = calibrate.calibrate(feats, labels, fmr=1 / 12)
    assert one.threshold == pytest.approx(0.79510698, abs=1e-6)
    assert (one.tmr, one.fmr) == (pytest.approx(2 / 3), pytest.approx(1 / 12))
    # FMR 3/12: just above the fourth highest (0.1104); c1.c2 (0.6) now matches too: TMR 3 of 3, and
    # three impostors (0.8, 0.7951, 0.2195) reach the threshold.
    three = calibrate.calibrate(feats, labels, fmr=0.25)
    assert three.threshold == pytest.approx(0.11043153, abs=1e-6)
    assert (three.tmr, three.fmr) == (pytest.approx(1.0), pytest.approx(3 / 12))


def test_threshold_allows_the_stated_false_match_rate() -> None:
    impostor = np.linspace(-1, 1, 200)
    thr = calibrate.threshold_at_fmr(impostor, 0.01)
    assert np.mean(impostor >= thr) <= 0.01
    assert np.mean(impostor >= np.nextafter(impostor[impostor < thr].max(), -np.inf)) > 0.01


def test_preprocess_crops_resizes_reorders_and_normalises() -> None:
    crops = RNG.uniform(0, 255, size=(2, 8, 8, 3)).astype(np.float32)
    prep = Preprocessing(
        native_size=(4, 4),
        layout="NCHW",
        channel_order="BGR",
        crop=(0.0, 0.0, 1.0, 1.0),
        mean=(1.0, 2.0, 3.0),
        std=(2.0, 2.0, 2.0),
        resize="area",
    )
    got = calibrate.preprocess(crops, prep)
    pooled = crops.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))[..., ::-1]
    want = ((pooled - np.array([1.0, 2.0, 3.0])) / 2.0).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)
    window = calibrate.preprocess(crops, Preprocessing(native_size=(4, 4), crop=(0.0, 0.0, 0.5, 0.5)))
    np.testing.assert_allclose(window, crops[:, :4, :4], atol=1e-4)  # a 4x4 window at 4x4 is the identity


def test_tf2onnx_passes_are_collected_and_everything_is_restored() -> None:
    """Each optimizer pass is followed by a collection that sees only the conversion's objects; after
    the conversion, tf2onnx and the collector are as they were."""
    import gc

    pytest.importorskip("tf2onnx")
    from uncnn_rt.converters import tfjs

    tf2onnx = tfjs.import_tf2onnx()
    from tf2onnx.optimizer import optimizer_base

    original = optimizer_base.GraphOptimizerBase.optimize
    frozen = gc.get_freeze_count()
    with tfjs.collect_between_passes(tf2onnx):
        assert optimizer_base.GraphOptimizerBase.optimize is not original
        assert gc.get_freeze_count() > frozen
    assert optimizer_base.GraphOptimizerBase.optimize is original
    assert gc.get_freeze_count() == 0
