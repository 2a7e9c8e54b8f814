"""The activation fusions run before differentiation: same values, fewer ops, correct gradients."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from harness import evaluator, model_of, numeric_gradient, with_objective
from onnx import helper, numpy_helper

from uncnn_rt.converters.grad.driver import _infer, differentiate, fold_constants
from uncnn_rt.converters.grad.fuse import fuse_activations

SHAPE = (2, 4, 5, 5)


def _prelu_chain(dtype, *, swap_add: bool = False, swap_mul: bool = False, slope_shape=(4, 1, 1), leak=False):
    k = np.linspace(-0.3, 0.2, int(np.prod(slope_shape))).reshape(slope_shape)
    mul_in = ["k", "s"] if swap_mul else ["s", "k"]
    add_in = ["m", "r"] if swap_add else ["r", "m"]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("Sub", ["x", "a"], ["s"]),
        helper.make_node("Mul", mul_in, ["m"]),
        helper.make_node("Add", add_in, ["y0"]),
        helper.make_node("Tanh", ["y0"], ["y1"]),
    ]
    outputs = ["y1"]
    if leak:  # the Abs output is read elsewhere too: the chain must stay as it is
        nodes.append(helper.make_node("Neg", ["a"], ["y2"]))
        outputs.append("y2")
    return model_of(nodes, dtype, SHAPE, outputs, [numpy_helper.from_array(k.astype(dtype), "k")])


def _prelu_min_max_chain(dtype, *, swap: bool = False, slope_shape=(1, 4, 1, 1), zero: float = 0.0):
    """TF.js's other PReLU spelling: Max(x, 0) + Mul(Min(x, 0), k), operands in either order."""
    k = np.linspace(-0.3, 0.2, int(np.prod(slope_shape))).reshape(slope_shape)
    nodes = [
        helper.make_node("Max", ["zero", "x"] if swap else ["x", "zero"], ["p"]),
        helper.make_node("Min", ["x", "zero"] if swap else ["zero", "x"], ["n"]),
        helper.make_node("Mul", ["k", "n"] if swap else ["n", "k"], ["m"]),
        helper.make_node("Add", ["m", "p"] if swap else ["p", "m"], ["y0"]),
        helper.make_node("Tanh", ["y0"], ["y1"]),
    ]
    inits = [
        numpy_helper.from_array(k.astype(dtype), "k"),
        numpy_helper.from_array(np.full((1, 1, 1, 1), zero, dtype), "zero"),
    ]
    return model_of(nodes, dtype, SHAPE, ["y1"], inits)


def _relu6_chain(dtype, *, lo: float | None = 0.0, hi: float = 0.6):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Min", ["r", "hi"], ["n" if lo is not None else "y0"]),
    ]
    inits = [numpy_helper.from_array(np.array(hi, dtype), "hi")]
    if lo is not None:
        nodes.append(helper.make_node("Max", ["n", "lo"], ["y0"]))
        inits.append(numpy_helper.from_array(np.array(lo, dtype), "lo"))
    nodes.append(helper.make_node("Tanh", ["y0"], ["y1"]))
    return model_of(nodes, dtype, SHAPE, ["y1"], inits)


def _fused(model: onnx.ModelProto):
    folded = fold_constants(model)
    return fuse_activations(folded, _infer(folded)[0])


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _same_values(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> None:
    names = [o.name for o in a.graph.output]
    for left, right in zip(evaluator(a).run(names, {"x": x}), evaluator(b).run(names, {"x": x}), strict=True):
        np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("swap_add", [False, True])
@pytest.mark.parametrize("swap_mul", [False, True])
@pytest.mark.parametrize("slope_shape", [(4, 1, 1), (1, 4, 1, 1), (1,)])
def test_prelu_chain_becomes_one_prelu(swap_add: bool, swap_mul: bool, slope_shape) -> None:
    model = _prelu_chain(np.float64, swap_add=swap_add, swap_mul=swap_mul, slope_shape=slope_shape)
    fused, counts = _fused(model)
    assert counts["PRelu"] == 1 and _ops(fused) == ["PRelu", "Tanh"]
    _same_values(model, fused, np.random.default_rng(0).normal(size=SHAPE))


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("slope_shape", [(1, 4, 1, 1), (4, 1, 1), (1,)])
def test_min_max_prelu_becomes_one_prelu_with_the_same_bits(swap: bool, slope_shape) -> None:
    model = _prelu_min_max_chain(np.float32, swap=swap, slope_shape=slope_shape)
    fused, counts = _fused(model)
    assert counts["PRelu"] == 1 and _ops(fused) == ["PRelu", "Tanh"]
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    x.reshape(-1)[:4] = [0.0, -0.0, 1e-30, -1e-30]

    def run(m: onnx.ModelProto) -> np.ndarray:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    np.testing.assert_array_equal(run(model), run(fused))


def test_relu6_chain_becomes_one_clip() -> None:
    for model in (
        _relu6_chain(np.float64),
        _relu6_chain(np.float64, lo=None),
        _relu6_chain(np.float64, lo=-1.0),
    ):
        fused, counts = _fused(model)
        assert counts["Clip"] == 1 and _ops(fused) == ["Clip", "Tanh"]
        _same_values(model, fused, np.random.default_rng(1).normal(size=SHAPE))


def test_chains_that_differ_are_left_alone() -> None:
    for model in (
        _prelu_chain(np.float64, leak=True),
        _relu6_chain(np.float64, lo=0.1),
        _prelu_min_max_chain(np.float64, zero=0.1),
    ):
        fused, counts = _fused(model)
        assert not counts and _ops(fused) == _ops(fold_constants(model))


@pytest.mark.parametrize("build", [_prelu_chain, _prelu_min_max_chain, _relu6_chain])
def test_fused_gradient_matches_finite_differences_of_the_source(build) -> None:
    """The attack graph's gradient (built on the fused graph) is the source model's derivative."""
    x = np.random.default_rng(2).normal(size=SHAPE)
    x[np.abs(x) < 0.05] += 0.1  # keep clear of the kinks, where finite differences straddle two slopes
    x[np.abs(x - 0.6) < 0.05] += 0.1
    source = with_objective(build(np.float64), np.random.default_rng(3))
    grad_model = differentiate(source, wrt="x", objective="objective")
    assert not {"Abs", "Min", "Max"} & set(_ops(grad_model))
    analytic = evaluator(grad_model).run(["grad"], {"x": x})[0]
    np.testing.assert_allclose(analytic, numeric_gradient(source, x.copy()), rtol=1e-5, atol=1e-7)
    sess = ort.InferenceSession(
        differentiate(
            with_objective(build(np.float32), np.random.default_rng(3)), wrt="x", objective="objective"
        ).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    np.testing.assert_allclose(
        sess.run(["grad"], {"x": x.astype(np.float32)})[0], analytic, rtol=1e-4, atol=1e-6
    )
