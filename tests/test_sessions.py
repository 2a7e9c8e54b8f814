"""AttackSession: devices, contract checks, gradients, IO binding, chunking, the cache and threads."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import LinearGraph, build_linear_face
from numpy.typing import NDArray

from uncnn_rt.runtime import contract
from uncnn_rt.runtime.errors import ContractError, DeviceError, InputError, ModelError
from uncnn_rt.runtime.sessions import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    AttackSession,
    clear_session_cache,
    open_session,
    resolve_device,
)


def _images(n: int, size: int, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def _face_reference(
    graph: LinearGraph, images: NDArray[np.float32]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """An independent float64 numpy forward of the linear face graph: features and ``|z|``."""
    x = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0 - 0.5
    z = x @ graph.weights.astype(np.float64)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return z / norm, norm


# --- devices ---------------------------------------------------------------------------------------------


def test_cpu_and_auto_resolve_to_available_providers() -> None:
    assert resolve_device("cpu").providers == (CPU_PROVIDER,)
    assert resolve_device("CPUExecutionProvider").providers == (CPU_PROVIDER,)
    expected = CUDA_PROVIDER if CUDA_PROVIDER in ort.get_available_providers() else CPU_PROVIDER
    assert resolve_device("auto").primary == expected


def test_unknown_device_names_the_available_providers() -> None:
    with pytest.raises(DeviceError) as err:
        resolve_device("tpu")
    assert "'tpu'" in str(err.value)
    for provider in ort.get_available_providers():
        assert provider in str(err.value)


@pytest.mark.skipif(CUDA_PROVIDER in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_without_the_provider_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        resolve_device("cuda")


def test_malformed_cuda_index_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="cuda:N"):
        resolve_device("cuda:first")


def test_negative_thread_count_is_rejected(linear_face_graph: LinearGraph) -> None:
    with pytest.raises(InputError, match="intra_op_threads"):
        AttackSession(linear_face_graph.path, device="cpu", intra_op_threads=-1)


# --- metadata and contract checks -------------------------------------------------------------------------


def test_metadata_is_read(linear_face_graph: LinearGraph, linear_classifier_graph: LinearGraph) -> None:
    face = AttackSession(linear_face_graph.path, device="cpu").info
    assert (face.name, face.kind, face.canonical_size, face.embedding_dim) == ("linear_face", "face", 16, 8)
    assert face.threshold == pytest.approx(0.5)
    assert face.batch_size is None
    assert face.preprocessing == contract.Preprocessing(native_size=(16, 16))
    classifier = AttackSession(linear_classifier_graph.path, device="cpu").info
    assert classifier.kind == "classifier"
    assert classifier.labels is not None and classifier.labels[3] == "class_3"


def _edited(source: Path, target: Path, edit: str) -> Path:
    model = onnx.load(str(source))
    if edit == "drop_kind":
        kept = [p for p in model.metadata_props if p.key != contract.META_KIND]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    elif edit == "bad_kind":
        next(p for p in model.metadata_props if p.key == contract.META_KIND).value = "detector"
    elif edit == "wrong_size":
        next(p for p in model.metadata_props if p.key == contract.META_CANONICAL_SIZE).value = "32"
    elif edit == "rename_input":
        for node in model.graph.node:
            node.input[:] = ["img" if name == contract.INPUT_IMAGE else name for name in node.input]
        model.graph.input[0].name = "img"
    elif edit == "drop_grad":
        kept_outputs = [o for o in model.graph.output if o.name != contract.OUTPUT_GRAD]
        del model.graph.output[:]
        model.graph.output.extend(kept_outputs)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop_kind", "lacks 'uncnn.kind'"),
        ("bad_kind", "'detector'"),
        ("wrong_size", r"'image' must have shape \['N', 32, 32, 3\], got \['N', 16, 16, 3\]"),
        ("rename_input", r"inputs must be \['image', 'reference'\], got \['img', 'reference'\]"),
        ("drop_grad", r"outputs lack \['grad'\]"),
    ],
)
def test_contract_violations_say_what_was_expected(
    linear_face_graph: LinearGraph, tmp_path: Path, edit: str, message: str
) -> None:
    path = _edited(linear_face_graph.path, tmp_path / f"{edit}.onnx", edit)
    with pytest.raises(ContractError, match=message):
        AttackSession(path, device="cpu")


def test_missing_and_corrupt_files_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        AttackSession(tmp_path / "absent.onnx", device="cpu")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="cannot load"):
        AttackSession(corrupt, device="cpu")


def test_batch_shapes_are_checked(linear_face_graph: LinearGraph) -> None:
    session = AttackSession(linear_face_graph.path, device="cpu")
    with pytest.raises(InputError, match=r"images must have shape \[N, 16, 16, 3\], got \[2, 8, 8, 3\]"):
        session.run(np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(InputError, match=r"references must have shape \[2, 8\] for 2 images, got \[3, 8\]"):
        session.run(np.zeros((2, 16, 16, 3), np.float32), np.zeros((3, 8), np.float32))


# --- gradients --------------------------------------------------------------------------------------------


def test_face_graph_matches_numpy_reference(linear_face_graph: LinearGraph) -> None:
    session = AttackSession(linear_face_graph.path, device="cpu")
    x = _images(3, 16)
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 8)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    f, norm = _face_reference(linear_face_graph, x)
    grad_z = (ref - f * (f * ref).sum(axis=1, keepdims=True)) / norm
    grad = (grad_z @ linear_face_graph.weights.T.astype(np.float64) / 255.0).reshape(x.shape)
    out = session.run(x, ref)
    np.testing.assert_allclose(out.features, f, atol=1e-5)
    np.testing.assert_allclose(out.objective, (f * ref).sum(axis=1), atol=1e-5)
    np.testing.assert_allclose(out.grad, grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("graph_name", ["linear_face_graph", "linear_classifier_graph"])
def test_gradient_matches_central_differences(graph_name: str, request: pytest.FixtureRequest) -> None:
    graph: LinearGraph = request.getfixturevalue(graph_name)
    session = AttackSession(graph.path, device="cpu")
    x = _images(2, graph.size, seed=3)
    rng = np.random.default_rng(4)
    ref = np.abs(rng.standard_normal((2, session.info.embedding_dim))).astype(np.float32)
    grad = session.run(x, ref).grad.astype(np.float64)
    h = 2.0  # 0..255 units; the graphs are smooth at this scale and float32 needs a visible change
    for _ in range(3):
        v = rng.standard_normal(x.shape).astype(np.float32)
        plus = session.run(x + h * v, ref).objective.astype(np.float64)
        minus = session.run(x - h * v, ref).objective.astype(np.float64)
        numeric = (plus - minus) / (2 * h)
        analytic = (grad * v).sum(axis=(1, 2, 3))
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4)


def test_features_match_the_forward_of_run(linear_face_graph: LinearGraph) -> None:
    session = AttackSession(linear_face_graph.path, device="cpu")
    x = _images(4, 16)
    f = session.features(x)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(session.run(x, f).features, f)
    stepper = session.stepper(f)
    features, objective = stepper.forward(x)
    np.testing.assert_array_equal(features, f)
    np.testing.assert_allclose(objective, 1.0, atol=1e-5)


# --- IO binding, fixed batches ----------------------------------------------------------------------------


def test_io_binding_path_equals_plain_run(linear_face_graph: LinearGraph) -> None:
    plain = AttackSession(linear_face_graph.path, device="cpu", io_binding=False)
    bound = AttackSession(linear_face_graph.path, device="cpu", io_binding=True)
    x = _images(3, 16)
    ref = plain.features(x[::-1].copy())
    stepper = bound.stepper(ref)
    assert type(stepper).__name__ == "BoundStepper"
    for step in range(3):  # the same device buffers are reused across steps
        xs = np.clip(x + 4 * step, 0, 255)
        a, b = plain.run(xs, ref), stepper(xs)
        for got, want in zip(b, a, strict=True):
            np.testing.assert_array_equal(got, want)


def test_fixed_batch_graph_runs_in_chunks(tmp_path: Path) -> None:
    graph = build_linear_face(tmp_path / "fixed.onnx", batch=2)
    fixed = AttackSession(graph.path, device="cpu")
    assert fixed.info.batch_size == 2
    dynamic = AttackSession(build_linear_face(tmp_path / "dynamic.onnx").path, device="cpu")
    x = _images(5, 16)
    ref = dynamic.features(x[::-1].copy())
    a, b = fixed.run(x, ref), dynamic.run(x, ref)
    for got, want in zip(a, b, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# --- cache and threads ------------------------------------------------------------------------------------


def test_open_session_reuses_one_session_per_file_and_device(tmp_path: Path) -> None:
    clear_session_cache()
    path = build_linear_face(tmp_path / "cached.onnx").path
    first = open_session(path, device="cpu")
    assert open_session(path, device="cpu") is first
    assert open_session(str(path), device="CPUExecutionProvider") is first  # same placement
    assert open_session(path, device="cpu", intra_op_threads=1) is not first
    replaced = tmp_path / "replaced.onnx"
    shutil.copy(build_linear_face(tmp_path / "other.onnx", seed=5).path, replaced)
    os.replace(replaced, path)
    assert open_session(path, device="cpu") is not first  # a replaced file is loaded afresh
    clear_session_cache()


def test_sessions_do_not_spin_unless_asked(linear_face_graph: LinearGraph) -> None:
    """Idle onnxruntime threads spin by default and take the cores from the attack's numpy work."""
    quiet = AttackSession(linear_face_graph.path, device="cpu")
    assert quiet._options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = AttackSession(linear_face_graph.path, device="cpu", spin=True)
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default (spin)
        spinning._options.get_session_config_entry("session.intra_op.allow_spinning")


def test_sessions_keep_no_memory_patterns_and_no_cpu_arena(linear_face_graph: LinearGraph) -> None:
    # a pre-planned block per input shape, about 100 MB of a 1080p cloak's peak; and the arena's blocks of
    # each session's largest run, about 230 MB of a six-model 12 MP cloak's (bench/RESULTS.md, run 22)
    options = AttackSession(linear_face_graph.path, device="cpu")._options
    assert options.enable_mem_pattern is False
    assert options.enable_cpu_mem_arena is False


def test_concurrent_runs_on_one_session_match_serial_runs(linear_face_graph: LinearGraph) -> None:
    session = AttackSession(linear_face_graph.path, device="cpu", io_binding=True)
    batches = [_images(2, 16, seed=s) for s in range(16)]
    references = [session.features(b[::-1].copy()) for b in batches]
    serial = [session.run(b, r).grad for b, r in zip(batches, references, strict=True)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda br: session.run(*br).grad, zip(batches, references, strict=True)))
    for got, want in zip(threaded, serial, strict=True):
        np.testing.assert_array_equal(got, want)


# --- what the gradient-graph builder emits ----------------------------------------------------------------


def test_builder_output_loads_and_its_gradient_matches_differences(tmp_path: Path) -> None:
    """The runtime loads what the builder emits: a conv net with resize and normalisation folded in."""
    grad_builder = pytest.importorskip("uncnn_rt.converters.attack_graph")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["c"], ["t"]),
        helper.make_node("GlobalAveragePool", ["t"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pre = contract.Preprocessing(native_size=(16, 16), layout="NCHW", mean=(127.5,) * 3, std=(64.0,) * 3)
    attack = grad_builder.build_attack_graph(
        source, kind="face", preprocessing=pre, canonical_size=20, name="tiny", threshold=0.5
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(attack, str(path))
    session = AttackSession(path, device="cpu")
    assert (session.info.canonical_size, session.info.embedding_dim, session.info.threshold) == (20, 8, 0.5)
    x = _images(2, 20, seed=1)
    ref = session.features(_images(2, 20, seed=2)[::-1].copy())
    grad = session.run(x, ref).grad.astype(np.float64)
    v = rng.standard_normal(x.shape).astype(np.float32)
    numeric = (session.run(x + v, ref).objective - session.run(x - v, ref).objective).astype(np.float64) / 2
    np.testing.assert_allclose((grad * v).sum(axis=(1, 2, 3)), numeric, rtol=2e-2, atol=1e-5)


def test_forward_only_session_matches_the_full_graph(linear_face_graph: LinearGraph) -> None:
    session = AttackSession(linear_face_graph.path, device="cpu")
    size = session.info.canonical_size
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    refs = np.zeros((2, session.info.embedding_dim), np.float32)
    full = session.run(images, refs).features
    np.testing.assert_allclose(session.features(images), full, rtol=1e-6, atol=1e-7)
    forward = session._forward()
    assert [o.name for o in forward.get_outputs()] == ["features", "objective"]
