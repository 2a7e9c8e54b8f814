"""Shared fixtures: small attack graphs built by hand with onnx.helper, independent of the gradient builder.

``linear_face_graph``: ``features = normalize((flatten(image) / 255 - 0.5) @ W)``,
``objective = features . reference``, and the gradient written out in ONNX ops::

    grad_z = (reference - features * (features . reference)) / |z|
    grad   = reshape(grad_z @ W^T / 255)

``linear_classifier_graph``: ``features = log_softmax((flatten(image) / 255 - 0.5) @ W + b)``, with
``grad_logits = reference - softmax * sum(reference)``.

Both carry the contract's metadata, so :class:`uncnn_rt.runtime.sessions.AttackSession` loads them like
a shipped model. ``tests/test_sessions.py`` checks their gradients against finite differences.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.runtime import contract
from uncnn_rt.runtime.imageio import LoadedImage
from uncnn_rt.runtime.sessions import CACHE_ENV, AttackSession, clear_session_cache


def pytest_configure(config: pytest.Config) -> None:
    """The derived-graph cache of this test run lives in a fresh folder (the CLI's subprocesses inherit
    it), so tests neither read a user's ``~/.cache`` nor leave graphs of temporary models in it."""
    if CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="uncnn-rt-test-cache-")


@dataclass(frozen=True)
class LinearGraph:
    """A hand-built attack graph and the weights it holds, for independent numpy references."""

    path: Path
    size: int
    weights: NDArray[np.float32]  # [S * S * 3, D]
    bias: NDArray[np.float32] | None  # [D] for classifiers


def _metadata(model: onnx.ModelProto, items: dict[str, str]) -> None:
    for key, value in items.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _graph_io(
    size: int, dim: int, batch: int | str = "N"
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    inputs = [
        helper.make_tensor_value_info(contract.INPUT_IMAGE, TensorProto.FLOAT, [batch, size, size, 3]),
        helper.make_tensor_value_info(contract.INPUT_REFERENCE, TensorProto.FLOAT, [batch, dim]),
    ]
    outputs = [
        helper.make_tensor_value_info(contract.OUTPUT_FEATURES, TensorProto.FLOAT, [batch, dim]),
        helper.make_tensor_value_info(contract.OUTPUT_OBJECTIVE, TensorProto.FLOAT, [batch]),
        helper.make_tensor_value_info(contract.OUTPUT_GRAD, TensorProto.FLOAT, [batch, size, size, 3]),
    ]
    return inputs, outputs


def _constants(size: int, weights: NDArray[np.float32]) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(np.ascontiguousarray(weights.T), "WT"),
        numpy_helper.from_array(np.array([-1, size * size * 3], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([-1, size, size, 3], np.int64), "image_shape"),
        numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), "inv255"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]


def _save(model: onnx.ModelProto, path: Path, meta: dict[str, str]) -> Path:
    _metadata(model, meta)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _common_meta(name: str, kind: str, size: int, dim: int) -> dict[str, str]:
    return {
        contract.META_NAME: name,
        contract.META_KIND: kind,
        contract.META_CANONICAL_SIZE: str(size),
        contract.META_NATIVE_SIZE: json.dumps([size, size]),
        contract.META_EMBEDDING_DIM: str(dim),
        contract.META_PREPROCESSING: contract.Preprocessing(native_size=(size, size)).to_json(),
        contract.META_CONTRACT_VERSION: contract.CONTRACT_VERSION,
    }


def build_linear_face(
    path: Path,
    *,
    size: int = 16,
    dim: int = 8,
    seed: int = 0,
    name: str = "linear_face",
    threshold: float = 0.5,
    batch: int | str = "N",
) -> LinearGraph:
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((size * size * 3, dim)) / np.sqrt(size * size * 3)).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("Reshape", ["image", "flat_shape"], ["flat"]),
        n("Mul", ["flat", "inv255"], ["unit"]),
        n("Sub", ["unit", "half"], ["x"]),
        n("MatMul", ["x", "W"], ["z"]),
        n("Mul", ["z", "z"], ["z2"]),
        n("ReduceSum", ["z2", "axis1"], ["z2_sum"], keepdims=1),
        n("Sqrt", ["z2_sum"], ["z_norm"]),
        n("Div", ["z", "z_norm"], [contract.OUTPUT_FEATURES]),
        n("Mul", [contract.OUTPUT_FEATURES, contract.INPUT_REFERENCE], ["fr"]),
        n("ReduceSum", ["fr", "axis1"], [contract.OUTPUT_OBJECTIVE], keepdims=0),
        # d objective / d z = (r - f (f . r)) / |z|
        n("ReduceSum", ["fr", "axis1"], ["fr_sum"], keepdims=1),
        n("Mul", [contract.OUTPUT_FEATURES, "fr_sum"], ["f_fr"]),
        n("Sub", [contract.INPUT_REFERENCE, "f_fr"], ["tangent"]),
        n("Div", ["tangent", "z_norm"], ["grad_z"]),
        n("MatMul", ["grad_z", "WT"], ["grad_x"]),
        n("Mul", ["grad_x", "inv255"], ["grad_flat"]),
        n("Reshape", ["grad_flat", "image_shape"], [contract.OUTPUT_GRAD]),
    ]
    inputs, outputs = _graph_io(size, dim, batch)
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=_constants(size, weights))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = _common_meta(name, "face", size, dim) | {contract.META_THRESHOLD: str(threshold)}
    return LinearGraph(_save(model, path, meta), size, weights, None)


def build_linear_classifier(
    path: Path, *, size: int = 16, classes: int = 10, seed: int = 1, name: str = "linear_classifier"
) -> LinearGraph:
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((size * size * 3, classes)) / np.sqrt(size * size * 3) * 4).astype(
        np.float32
    )
    bias = (rng.standard_normal(classes) * 0.1).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("Reshape", ["image", "flat_shape"], ["flat"]),
        n("Mul", ["flat", "inv255"], ["unit"]),
        n("Sub", ["unit", "half"], ["x"]),
        n("MatMul", ["x", "W"], ["xw"]),
        n("Add", ["xw", "b"], ["logits"]),
        n("LogSoftmax", ["logits"], [contract.OUTPUT_FEATURES], axis=1),
        n("Mul", [contract.OUTPUT_FEATURES, contract.INPUT_REFERENCE], ["fr"]),
        n("ReduceSum", ["fr", "axis1"], [contract.OUTPUT_OBJECTIVE], keepdims=0),
        # d objective / d logits = r - softmax * sum(r)
        n("Softmax", ["logits"], ["p"], axis=1),
        n("ReduceSum", [contract.INPUT_REFERENCE, "axis1"], ["r_sum"], keepdims=1),
        n("Mul", ["p", "r_sum"], ["p_r"]),
        n("Sub", [contract.INPUT_REFERENCE, "p_r"], ["grad_logits"]),
        n("MatMul", ["grad_logits", "WT"], ["grad_x"]),
        n("Mul", ["grad_x", "inv255"], ["grad_flat"]),
        n("Reshape", ["grad_flat", "image_shape"], [contract.OUTPUT_GRAD]),
    ]
    inputs, outputs = _graph_io(size, classes)
    initializers = [*_constants(size, weights), numpy_helper.from_array(bias, "b")]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    labels = [f"class_{i}" for i in range(classes)]
    meta = _common_meta(name, "classifier", size, classes) | {contract.META_LABELS: json.dumps(labels)}
    return LinearGraph(_save(model, path, meta), size, weights, bias)


@pytest.fixture(autouse=True, scope="module")
def _release_models_after_each_module() -> Iterator[None]:
    """Free what a test module loaded before the next one starts.

    ``open_session`` keeps every session it opened for the life of the process (each shipped model at
    each thread setting, and every graph a test wrote to its temporary folder), and Keras keeps its
    models' graphs in a global state: over the whole suite that held gigabytes that no later test used.
    """
    yield
    clear_session_cache()
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.backend.clear_session()
    gc.collect()


@pytest.fixture(scope="session")
def linear_face_graph(tmp_path_factory: pytest.TempPathFactory) -> LinearGraph:
    return build_linear_face(tmp_path_factory.mktemp("graphs") / "linear_face.onnx")


@pytest.fixture(scope="session")
def linear_face_graph_24(tmp_path_factory: pytest.TempPathFactory) -> LinearGraph:
    """A second face model at another canonical size, for ensembles."""
    path = tmp_path_factory.mktemp("graphs") / "linear_face_24.onnx"
    return build_linear_face(path, size=24, dim=6, seed=7, name="linear_face_24", threshold=0.4)


@pytest.fixture(scope="session")
def linear_classifier_graph(tmp_path_factory: pytest.TempPathFactory) -> LinearGraph:
    return build_linear_classifier(tmp_path_factory.mktemp("graphs") / "linear_classifier.onnx")


@pytest.fixture(scope="module")
def mobileface_alone() -> list[AttackSession]:
    """The shipped ``mobileface`` on the CPU, alone: a real recognizer every clone has."""
    from uncnn_rt.runtime.catalog import load_recognizers

    return load_recognizers(["mobileface"], device="cpu")


@pytest.fixture(scope="module")
def astronaut_photo() -> LoadedImage:
    """scikit-image's astronaut as a decoded PNG: a real face every clone has."""
    import io

    from PIL import Image
    from skimage import data

    from uncnn_rt.runtime.imageio import load_image

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    return load_image(buffer.getvalue(), name="astronaut.png")
