"""The CPU lowering of PRelu: which nodes it rewrites, and that results stay equal bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters.attack_graph import build_attack_graph
from uncnn_rt.runtime import contract as C
from uncnn_rt.runtime.lowering import lower_for_cpu
from uncnn_rt.runtime.sessions import AttackSession

CHANNELS = 16


def _prelu_model(slope: np.ndarray, x_shape: list[int | str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        "prelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
        [numpy_helper.from_array(slope.astype(np.float32), "slope")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# Slopes: positive, negative, above 1, zero; per channel in both spellings, and one shared scalar.
SLOPES = np.array([0.25, -0.5, 1.5, 0.0, 0.1, 0.01, 2.0, -1.0] * 2, np.float32)


@pytest.mark.parametrize(
    "slope", [SLOPES.reshape(-1, 1, 1), SLOPES.reshape(1, -1, 1, 1), np.array(0.2), np.array([0.2])]
)
def test_prelu_is_rewritten_and_equal_bit_for_bit_at_the_edges(slope: np.ndarray) -> None:
    model = _prelu_model(slope, ["N", CHANNELS, 4, 5])
    values = np.array(
        [0.0, -0.0, 1e-38, -1e-38, 1e-45, -1e-45, 3.5, -3.5, 3e38, -3e38, np.inf, -np.inf], np.float32
    )
    x = np.resize(values, (3, CHANNELS, 4, 5)).astype(np.float32)
    x[1] = np.random.default_rng(0).standard_normal((CHANNELS, 4, 5)).astype(np.float32) * 10
    expected = _run(model, {"x": x})[0]
    lowered, count = lower_for_cpu(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1
    assert not any(n.op_type == "PRelu" for n in lowered.graph.node)
    onnx.checker.check_model(lowered, full_check=True)
    np.testing.assert_array_equal(_run(lowered, {"x": x})[0], expected)


@pytest.mark.parametrize(
    ("slope", "x_shape", "why"),
    [
        (np.full((5,), 0.2), ["N", CHANNELS, 4, 5], "a 1-D slope broadcasts along W, not channels"),
        (np.full((CHANNELS,), 0.2), ["N", CHANNELS], "a 2-D input has no map to convolve"),
        (np.full((CHANNELS, 4, 1), 0.2), ["N", CHANNELS, 4, 5], "the slope varies along H"),
    ],
)
def test_prelus_that_are_not_per_channel_on_a_map_stay(slope: np.ndarray, x_shape: list, why: str) -> None:
    model = _prelu_model(slope, x_shape)
    lowered, count = lower_for_cpu(model)
    assert count == 0, why
    assert [n.op_type for n in lowered.graph.node] == ["PRelu"]


def _prelu_cnn() -> onnx.ModelProto:
    """Conv -> PRelu -> depthwise Conv -> PRelu -> GlobalAveragePool -> Flatten -> Gemm, 16 channels."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (CHANNELS, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (CHANNELS, 1, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(SLOPES.reshape(-1, 1, 1), "a1"),
        numpy_helper.from_array(rng.uniform(0.05, 0.5, (1, CHANNELS, 1, 1)).astype(np.float32), "a2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (CHANNELS, 8)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "a1"], ["p1"]),
        helper.make_node(
            "Conv", ["p1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=CHANNELS
        ),
        helper.make_node("PRelu", ["c2", "a2"], ["p2"]),
        helper.make_node("GlobalAveragePool", ["p2"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "prelu_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def prelu_attack_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pre = C.Preprocessing(native_size=(16, 16), layout="NCHW", mean=(127.5,) * 3, std=(128.0,) * 3)
    attack = build_attack_graph(_prelu_cnn(), kind="face", preprocessing=pre, canonical_size=24, name="p")
    path = tmp_path_factory.mktemp("lowering") / "prelu.onnx"
    onnx.save(attack, str(path))
    return path


def test_cpu_sessions_run_the_lowered_graph_with_the_files_results(prelu_attack_graph: Path) -> None:
    # Equal to float32 rounding, not bit for bit: the depthwise Conv between the PRelus now runs in
    # onnxruntime's blocked layout, which sums in another order.
    session = AttackSession(prelu_attack_graph, device="cpu")
    assert session.lowered == 2
    plain = ort.InferenceSession(str(prelu_attack_graph), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 24, 24, 3)).astype(np.float32)
    references = rng.standard_normal((3, 8)).astype(np.float32)
    expected = plain.run(None, {C.INPUT_IMAGE: images, C.INPUT_REFERENCE: references})
    got = session.run(images, references)
    np.testing.assert_allclose(got.features, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.objective, expected[1], rtol=1e-5, atol=1e-6)
    scale = float(np.abs(expected[2]).max())
    np.testing.assert_allclose(got.grad, expected[2], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_array_equal(session.features(images), got.features)  # the forward-only session


def test_disabled_optimisation_runs_the_file_as_it_is(prelu_attack_graph: Path) -> None:
    assert AttackSession(prelu_attack_graph, device="cpu", optimization="disable").lowered == 0


def test_rewrites_are_cached_so_later_sessions_skip_the_onnx_work(
    prelu_attack_graph: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first session writes its lowered graph and its forward-only graph to the cache; a later one
    (another process, in real use) opens them without rewriting anything, with the same results. An
    edited file gets fresh entries, and its old ones go."""
    from uncnn_rt.runtime import sessions

    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2, 24, 24, 3)).astype(np.float32)
    references = rng.standard_normal((2, 8)).astype(np.float32)
    first = AttackSession(prelu_attack_graph, device="cpu")
    expected, forward = first.run(images, references), first.features(images)
    notes = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").glob("*.json"))
    assert notes == ["cpu.json", "forward-cpu.json"]

    def no_rewrites(*args: object) -> None:
        raise AssertionError("rewrote a graph the cache holds")

    monkeypatch.setattr(sessions, "lower_for_cpu", no_rewrites)
    monkeypatch.setattr(sessions, "prune_to_outputs", no_rewrites)
    again = AttackSession(prelu_attack_graph, device="cpu")
    assert again.lowered == 2
    np.testing.assert_array_equal(again.run(images, references).grad, expected.grad)
    np.testing.assert_array_equal(again.features(images), forward)
    monkeypatch.undo()

    monkeypatch.setenv(sessions.CACHE_ENV, str(tmp_path / "cache"))
    edited = tmp_path / "edited.onnx"
    edited.write_bytes(prelu_attack_graph.read_bytes())
    AttackSession(edited, device="cpu")
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    AttackSession(edited, device="cpu")
    assert len(list((tmp_path / "cache").glob("edited-*.cpu.json"))) == 1
    assert len(list((tmp_path / "cache").glob("edited-*.cpu.onnx"))) == 1

    monkeypatch.setenv(sessions.CACHE_ENV, "off")
    assert sessions.graph_cache_dir() is None
    assert AttackSession(prelu_attack_graph, device="cpu").lowered == 2


def _conv_model(weights: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weights.shape[1], 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights.shape[0], 6, 6])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _subnormal_count(model: onnx.ModelProto) -> int:
    tiny = np.finfo(np.float32).tiny
    return sum(
        int(np.count_nonzero((np.abs(a) < tiny) & (a != 0)))
        for a in (numpy_helper.to_array(init) for init in model.graph.initializer)
        if a.dtype == np.float32
    )


def test_subnormal_weights_become_zero_of_their_sign_with_the_files_results() -> None:
    rng = np.random.default_rng(3)
    weights = rng.normal(0, 0.3, (CHANNELS, 8, 1, 1)).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    weights.reshape(-1)[::3] = np.float32(tiny / 7)  # a third of the weights subnormal, of both signs
    weights.reshape(-1)[1::6] = -np.float32(tiny / 3)
    model = _conv_model(weights)
    x = rng.normal(0, 50, (2, 8, 6, 6)).astype(np.float32)
    expected = _run(model, {"x": x})[0]
    lowered, count = lower_for_cpu(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1  # one initializer flushed, no PRelu
    assert _subnormal_count(lowered) == 0
    flushed = numpy_helper.to_array(lowered.graph.initializer[0])
    assert np.all(flushed.reshape(-1)[1::6] == 0) and np.all(np.signbit(flushed.reshape(-1)[1::6]))
    normal = np.abs(weights) >= tiny
    np.testing.assert_array_equal(flushed[normal], weights[normal])
    np.testing.assert_array_equal(_run(lowered, {"x": x})[0], expected)


def test_the_shipped_fr_feature_runs_without_its_subnormal_weights_with_its_features() -> None:
    """The shipped graph that has them (about 9,600, which made its CPU forward pass 4x slower): the
    CPU session flushes them and gives the file's features and gradient to float32 rounding."""
    from uncnn_rt.runtime.catalog import resolve_model

    path = resolve_model("fr_feature")
    assert _subnormal_count(onnx.load(str(path))) > 1000
    session = AttackSession(path, device="cpu")
    assert session.lowered >= 1
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    size, dim = session.info.canonical_size, session.info.embedding_dim
    images = rng.integers(0, 256, (2, size, size, 3)).astype(np.float32)
    references = rng.standard_normal((2, dim)).astype(np.float32)
    expected = plain.run(None, {C.INPUT_IMAGE: images, C.INPUT_REFERENCE: references})
    got = session.run(images, references)
    np.testing.assert_allclose(got.features, expected[0], rtol=1e-5, atol=1e-6)
    scale = float(np.abs(expected[2]).max())
    np.testing.assert_allclose(got.grad, expected[2], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(session.features(images), expected[0], rtol=1e-5, atol=1e-6)
