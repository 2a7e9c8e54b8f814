"""The driver's own duties: shape-only subgraphs, pruning, accumulation, weights, and its errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from harness import evaluator, tensor_type
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters.grad.driver import OPSET, differentiate, fold_constants
from uncnn_rt.converters.grad.registry import RULES, UnsupportedOpError


def _model(nodes, dtype, x_shape, outputs, initializers=(), extra_inputs=()) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", tensor_type(dtype), x_shape), *extra_inputs]
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs]
    graph = helper.make_graph(nodes, "driver_test", inputs, outs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.output}
    del model.graph.output[:]
    model.graph.output.extend(inferred[o] for o in outputs)
    return model


def _objective_sum(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    return float(np.sum(evaluator(model).run(["objective"], feeds)[0]))


def _finite_differences(model: onnx.ModelProto, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for i in range(x.size):
        plus, minus = x.copy(), x.copy()
        plus.reshape(-1)[i] += h
        minus.reshape(-1)[i] -= h
        difference = _objective_sum(model, {"x": plus}) - _objective_sum(model, {"x": minus})
        grad.reshape(-1)[i] = difference / (2 * h)
    return grad


def _emitted(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name.startswith("grad/")]


def _ort_grad(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["grad"], {"x": x})[0]


# --- shape-only subgraphs -------------------------------------------------------------------------


def _reshape_chain(dtype, x_shape) -> onnx.ModelProto:
    """objective[n] = sum(Reshape(tanh(x), [Shape(x)[0], 48]) * w): the target shape is computed from x."""
    w = np.random.default_rng(0).standard_normal((1, 48)).astype(dtype)
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "first"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "features"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["flat"]),
        helper.make_node("Mul", ["flat", "w"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "one"], ["objective"], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "first"),
        numpy_helper.from_array(np.array([48], dtype=np.int64), "features"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(w, "w"),
    ]
    return _model(nodes, dtype, x_shape, ["objective"], inits)


def test_shape_chain_with_dynamic_batch_differentiates_and_runs_for_any_batch() -> None:
    g64 = differentiate(_reshape_chain(np.float64, ["N", 3, 4, 4]), wrt="x", objective="objective")
    onnx.checker.check_model(g64, full_check=True)
    # a dynamic batch cannot be folded: the chain stays and runs at run time
    assert {"Shape", "Gather", "Concat"} <= {n.op_type for n in g64.graph.node}
    g32 = differentiate(_reshape_chain(np.float32, ["N", 3, 4, 4]), wrt="x", objective="objective")
    forward = _reshape_chain(np.float64, ["N", 3, 4, 4])
    for batch in (1, 3):
        x = np.random.default_rng(batch).uniform(-2, 2, (batch, 3, 4, 4))
        analytic = evaluator(g64).run(["grad"], {"x": x})[0]
        np.testing.assert_allclose(analytic, _finite_differences(forward, x), rtol=1e-5, atol=1e-7)
        on_ort = _ort_grad(g32, x.astype(np.float32))
        assert on_ort.shape == (batch, 3, 4, 4)
        np.testing.assert_allclose(on_ort, analytic, rtol=0, atol=1e-4 * np.abs(analytic).max())


def _dynamic_batch_chain(dtype) -> onnx.ModelProto:
    """Data-movement and normalization rules on an [N, 3, 4, 4] input; N is only known at run time."""
    ints = _ints
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["sliced"]),  # [N, 3, 2, 4]
        helper.make_node("Pad", ["sliced", "pads"], ["padded"], mode="reflect"),  # [N, 3, 4, 6]
        helper.make_node("Gather", ["padded", "channels"], ["picked"], axis=1),  # [N, 3, 4, 6]
        helper.make_node("Split", ["picked", "split"], ["a", "b"], axis=1),
        helper.make_node("Concat", ["b", "a"], ["swapped"], axis=1),
        helper.make_node("InstanceNormalization", ["swapped", "scale", "bias"], ["normed"]),
        helper.make_node("Softmax", ["normed"], ["soft"], axis=1),
        helper.make_node("Transpose", ["soft"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["nhwc"], ["batch_mean"], axes=[0], keepdims=1),
        helper.make_node("Mul", ["nhwc", "batch_mean"], ["mixed"]),
        helper.make_node("Flatten", ["mixed"], ["flat"], axis=1),
        helper.make_node("Mul", ["flat", "w"], ["weighted"]),
        helper.make_node("ReduceMax", ["weighted"], ["objective"], axes=[1], keepdims=0),
    ]
    inits = [
        ints("starts", [0, 3]),
        ints("ends", [4, np.iinfo(np.int64).min]),
        ints("axes", [2, 3]),
        ints("steps", [2, -1]),
        ints("pads", [0, 0, 1, 1, 0, 0, 1, 1]),
        ints("channels", [2, 0, 0]),
        ints("split", [1, 2]),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 3).astype(dtype), "scale"),
        numpy_helper.from_array(rng.uniform(-1.0, 1.0, 3).astype(dtype), "bias"),
        numpy_helper.from_array(rng.standard_normal((1, 72)).astype(dtype), "w"),
    ]
    return _model(nodes, dtype, ["N", 3, 4, 4], ["objective"], inits)


def test_shape_rules_work_with_a_dynamic_batch() -> None:
    forward = _dynamic_batch_chain(np.float64)
    g64 = differentiate(forward, wrt="x", objective="objective")
    onnx.checker.check_model(g64, full_check=True)
    g32 = differentiate(_dynamic_batch_chain(np.float32), wrt="x", objective="objective")
    for batch in (1, 3):
        x = np.random.default_rng(batch).uniform(-2, 2, (batch, 3, 4, 4))
        analytic = evaluator(g64).run(["grad"], {"x": x})[0]
        np.testing.assert_allclose(analytic, _finite_differences(forward, x), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            _ort_grad(g32, x.astype(np.float32)), analytic, rtol=0, atol=1e-3 * np.abs(analytic).max()
        )


def test_static_shape_chain_is_folded_to_constants() -> None:
    model = _reshape_chain(np.float64, [2, 3, 4, 4])
    folded = fold_constants(model)
    assert [n.op_type for n in folded.graph.node] == ["Tanh", "Reshape", "Mul", "ReduceSum"]
    target = next(i for i in folded.graph.initializer if i.name == "target")
    assert numpy_helper.to_array(target).tolist() == [2, 48]
    grad = differentiate(model, wrt="x", objective="objective")
    x = np.random.default_rng(0).uniform(-2, 2, (2, 3, 4, 4))
    np.testing.assert_allclose(
        evaluator(grad).run(["grad"], {"x": x})[0], _finite_differences(model, x), rtol=1e-5, atol=1e-7
    )


def test_constant_nodes_are_folded_and_need_no_rule() -> None:
    value = numpy_helper.from_array(np.full((2, 3), 0.5), "value")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=value),
        helper.make_node("Add", ["x", "c"], ["s"]),
        helper.make_node("Tanh", ["s"], ["t"]),
        helper.make_node("ReduceSum", ["t"], ["objective"], keepdims=0),
    ]
    model = _model(nodes, np.float64, [2, 3], ["objective"])
    assert "Constant" not in RULES
    grad = differentiate(model, wrt="x", objective="objective")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3))
    expected = 1 - np.tanh(x + 0.5) ** 2
    np.testing.assert_allclose(evaluator(grad).run(["grad"], {"x": x})[0], expected, rtol=1e-12)


# --- errors ---------------------------------------------------------------------------------------


def test_unsupported_op_names_the_op_the_node_and_the_supported_ops() -> None:
    nodes = [
        helper.make_node("Einsum", ["x"], ["e"], name="mixing_einsum", equation="ij->ji"),
        helper.make_node("ReduceSum", ["e"], ["objective"], keepdims=0),
    ]
    with pytest.raises(UnsupportedOpError) as info:
        differentiate(_model(nodes, np.float32, [2, 3], ["objective"]), wrt="x", objective="objective")
    message = str(info.value)
    assert info.value.op_type == "Einsum"
    assert info.value.node_name == "mixing_einsum"
    assert "Einsum" in message and "'mixing_einsum'" in message
    assert "supported ops: " in message
    assert all(op in message for op in ("Reshape", "Softmax", "ReduceMax", "Pad"))


def _one_node_objective(node: onnx.NodeProto, x_shape, initializers=()) -> onnx.ModelProto:
    nodes = [node, helper.make_node("ReduceSum", ["y"], ["objective"], keepdims=0)]
    return _model(nodes, np.float32, x_shape, ["objective"], initializers)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


UNHANDLED = {
    # wrap is an opset-19 mode; a graph that still carries it must be refused, never half-handled
    "pad_wrap": (
        helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap"),
        [2, 3],
        [_ints("pads", [0, 1, 0, 1])],
        "wrap",
    ),
    "pad_negative": (
        helper.make_node("Pad", ["x", "pads"], ["y"]),
        [2, 3],
        [_ints("pads", [0, -1, 0, 0])],
        "negative pads",
    ),
    "dropout_training": (
        helper.make_node("Dropout", ["x", "", "training"], ["y"]),
        [2, 3],
        [numpy_helper.from_array(np.array(True), "training")],
        "training_mode=true",
    ),
    "batchnorm_training": (
        helper.make_node(
            "BatchNormalization",
            ["x", "s", "b", "m", "v"],
            ["y", "running_mean", "running_var"],
            training_mode=1,
        ),
        [2, 3],
        [numpy_helper.from_array(np.ones(3, np.float32), n) for n in "sbmv"],
        "training_mode=1",
    ),
    "lpnorm_p3": (helper.make_node("LpNormalization", ["x"], ["y"], p=3), [2, 3], [], "p=3"),
}


@pytest.mark.parametrize("name", sorted(UNHANDLED))
def test_unhandled_attribute_values_raise(name: str) -> None:
    node, x_shape, inits, reason = UNHANDLED[name]
    with pytest.raises(UnsupportedOpError, match=reason) as info:
        differentiate(_one_node_objective(node, x_shape, inits), wrt="x", objective="objective")
    assert info.value.op_type == node.op_type


def test_training_mode_computed_at_run_time_raises() -> None:
    flag = helper.make_tensor_value_info("training", TensorProto.BOOL, [])
    nodes = [
        helper.make_node("Dropout", ["x", "", "training"], ["y"]),
        helper.make_node("ReduceSum", ["y"], ["objective"], keepdims=0),
    ]
    model = _model(nodes, np.float32, [2, 3], ["objective"], extra_inputs=[flag])
    with pytest.raises(UnsupportedOpError, match="run time"):
        differentiate(model, wrt="x", objective="objective")


# --- accumulation, pruning, weights ---------------------------------------------------------------


def test_gradients_reaching_a_tensor_along_two_paths_are_summed() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Add", ["r", "t"], ["s"]),
        helper.make_node("ReduceSum", ["s"], ["objective"], keepdims=0),
    ]
    grad = differentiate(_model(nodes, np.float64, [3, 4], ["objective"]), wrt="x", objective="objective")
    sums = [n for n in _emitted(grad) if n.op_type == "Sum"]
    assert len(sums) == 1 and len(sums[0].input) == 2
    x = np.random.default_rng(0).uniform(-2, 2, (3, 4))
    expected = (x > 0) + 1 - np.tanh(x) ** 2
    np.testing.assert_allclose(evaluator(grad).run(["grad"], {"x": x})[0], expected, rtol=1e-12)


def test_branch_not_reaching_the_objective_is_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []

    def spy(ctx, node, dys):
        called.append(node.op_type)
        raise AssertionError("the Sigmoid branch does not reach the objective")

    monkeypatch.setitem(RULES, "Sigmoid", spy)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ReduceSum", ["r"], ["objective"], keepdims=0),
        helper.make_node("Sigmoid", ["x"], ["side"]),
        helper.make_node("Exp", ["side"], ["side_exp"]),
    ]
    grad = differentiate(
        _model(nodes, np.float32, [2, 3], ["objective", "side_exp"]), wrt="x", objective="objective"
    )
    assert called == []
    emitted = _emitted(grad)
    assert not any({"side", "side_exp"} & set(n.input) for n in emitted)
    # only the seed, ReduceSum's broadcast back and Relu's mask
    allowed = {"Shape", "ConstantOfShape", "Unsqueeze", "Expand", "Greater", "Cast", "Mul", "Identity"}
    assert {n.op_type for n in emitted} <= allowed


def test_weights_never_get_gradient_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight initializer and a weight computed from another graph input: neither gets a gradient."""
    sigmoid_calls: list[str] = []
    returned: list[tuple[list[str], list[str | None]]] = []
    real_mul = RULES["Mul"]

    def sigmoid_spy(ctx, node, dys):
        sigmoid_calls.append(node.name)
        raise AssertionError("the weight branch must not be differentiated")

    def mul_spy(ctx, node, dys):
        grads = list(real_mul(ctx, node, dys))
        returned.append((list(node.input), grads))
        return grads

    monkeypatch.setitem(RULES, "Sigmoid", sigmoid_spy)
    monkeypatch.setitem(RULES, "Mul", mul_spy)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((2, 3)), "w")
    nodes = [
        helper.make_node("Sigmoid", ["v"], ["gate"], name="gate"),
        helper.make_node("Mul", ["x", "w"], ["a"]),
        helper.make_node("Mul", ["gate", "a"], ["b"]),
        helper.make_node("ReduceSum", ["b"], ["objective"], keepdims=0),
    ]
    v = helper.make_tensor_value_info("v", TensorProto.DOUBLE, [2, 3])
    grad = differentiate(
        _model(nodes, np.float64, [2, 3], ["objective"], [w], [v]), wrt="x", objective="objective"
    )
    assert sigmoid_calls == []
    grads = {tuple(inputs): dxs for inputs, dxs in returned}
    assert grads.keys() == {("gate", "a"), ("x", "w")}
    assert grads["gate", "a"][0] is None and grads["gate", "a"][1] is not None
    assert grads["x", "w"][0] is not None and grads["x", "w"][1] is None
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3)), "v": rng.standard_normal((2, 3))}
    expected = numpy_helper.to_array(w) / (1 + np.exp(-feeds["v"]))
    np.testing.assert_allclose(evaluator(grad).run(["grad"], feeds)[0], expected, rtol=1e-12)


# --- tie-breaking -------------------------------------------------------------------------------------


def test_reduce_max_splits_ties_evenly() -> None:
    """Like TensorFlow's reduce_max and torch.amax: tied maxima share the gradient equally."""
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], axes=[1], keepdims=0),
        helper.make_node("ReduceSum", ["m"], ["objective"], keepdims=0),
    ]
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 1.0, 1.0]])
    expected = np.array([[0, 0.5, 0.5, 0], [0.25] * 4, [1, 0, 0, 0]])
    for dtype in (np.float64, np.float32):
        grad = differentiate(_model(nodes, dtype, [3, 4], ["objective"]), wrt="x", objective="objective")
        np.testing.assert_array_equal(evaluator(grad).run(["grad"], {"x": x.astype(dtype)})[0], expected)
        np.testing.assert_array_equal(_ort_grad(grad, x.astype(dtype)), expected)


@pytest.mark.parametrize(
    ("op_type", "x_first", "expected"),
    [
        ("Max", True, lambda x: x >= 0),
        ("Max", False, lambda x: x > 0),
        ("Min", True, lambda x: x <= 0),
        ("Min", False, lambda x: x < 0),
    ],
)
def test_min_max_against_a_constant_send_ties_to_the_first_input(op_type, x_first, expected) -> None:
    """The one-input fast path of the Min/Max rule keeps the general rule's tie-breaking."""
    zero = numpy_helper.from_array(np.zeros((1, 3), np.float32), "c")
    inputs = ["x", "c"] if x_first else ["c", "x"]
    nodes = [
        helper.make_node(op_type, inputs, ["y"]),
        helper.make_node("ReduceSum", ["y"], ["objective"], keepdims=0),
    ]
    grad_model = differentiate(
        _model(nodes, np.float32, (2, 3), ["objective"], [zero]), wrt="x", objective="objective"
    )
    assert not any(n.op_type == "Where" for n in grad_model.graph.node)
    x = np.array([[-1.0, 0.0, 2.0], [0.0, 3.0, -0.5]], np.float32)
    sess = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(["grad"], {"x": x})[0], expected(x).astype(np.float32))
