"""Cases for the element-wise rules: each draws shapes (with broadcasting) and attributes."""

from __future__ import annotations

import numpy as np
from harness import Case, model_of, one_node
from hypothesis import strategies as st
from onnx import helper, numpy_helper

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def _broadcast_partner(draw, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts against ``shape``: a suffix with some dims set to 1."""
    k = draw(st.integers(0, len(shape)))
    suffix = shape[len(shape) - k :]
    return tuple(1 if draw(st.booleans()) else d for d in suffix)


def binary_const(op: str):
    def case(draw) -> Case:
        shape = draw(shapes)
        other = _broadcast_partner(draw, shape)
        c = np.random.default_rng(len(other)).uniform(0.5, 2.0, other)
        first = draw(st.booleans())
        return Case(lambda dt: one_node(op, dt, shape, inputs=["x", c] if first else [c, "x"]), shape)

    case.__name__ = f"{op.lower()}_with_constant"
    return case


def binary_both(op: str):
    """``op(f(x), g(x))`` where both operands depend on x and one is broadcast (exercises un-broadcasting)."""

    def case(draw) -> Case:
        shape = draw(shapes)
        axes = sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1)))

        def build(dt):
            axes_c = numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes")
            nodes = [
                helper.make_node("ReduceMean", ["x"], ["m"], axes=axes, keepdims=1),
                helper.make_node("Sigmoid", ["m"], ["s"]),
                helper.make_node(op, ["x", "s"], ["y0"]),
                helper.make_node(op, ["s", "x"], ["y1"]),
            ]
            return model_of(nodes, dt, shape, ["y0", "y1"], [axes_c])

        return Case(build, shape, low=0.5, high=2.0)

    case.__name__ = f"{op.lower()}_both_operands"
    return case


def unary(op: str, low: float = -2.0, high: float = 2.0, rtol: float = 1e-5, **attrs):
    def case(draw) -> Case:
        shape = draw(shapes)
        return Case(lambda dt: one_node(op, dt, shape, **attrs), shape, low=low, high=high, rtol=rtol)

    case.__name__ = f"{op.lower()}_unary"
    return case


def pow_case(draw) -> Case:
    shape = draw(shapes)
    p = draw(st.sampled_from([2.0, 3.0, 0.5, -1.0, 1.5]))
    return Case(lambda dt: one_node("Pow", dt, shape, inputs=["x", np.array(p)]), shape, low=0.5, high=2.0)


def leaky_case(draw) -> Case:
    shape = draw(shapes)
    alpha = draw(st.floats(0.01, 0.5))
    return Case(lambda dt: one_node("LeakyRelu", dt, shape, alpha=alpha), shape)


def prelu_case(draw) -> Case:
    shape = draw(shapes)
    slope = np.random.default_rng(1).uniform(0.05, 0.5, _broadcast_partner(draw, shape))
    return Case(lambda dt: one_node("PRelu", dt, shape, inputs=["x", slope]), shape)


def clip_case(draw) -> Case:
    shape = draw(shapes)
    lo, hi = draw(st.sampled_from([(-1.0, 1.0), (0.0, 6.0), (-0.5, None), (None, 0.3)]))
    inputs: list = ["x", np.array(lo) if lo is not None else "", np.array(hi) if hi is not None else ""]
    while inputs and isinstance(inputs[-1], str) and inputs[-1] == "":
        inputs.pop()
    return Case(lambda dt: one_node("Clip", dt, shape, inputs=inputs), shape)


def min_max(op: str):
    def case(draw) -> Case:
        shape = draw(shapes)
        other = _broadcast_partner(draw, shape)
        c = np.random.default_rng(2).uniform(-1.0, 1.0, other)
        return Case(lambda dt: one_node(op, dt, shape, inputs=["x", c]), shape)

    case.__name__ = f"{op.lower()}_with_constant"
    return case


def min_max_const_first(op: str):
    def case(draw) -> Case:
        shape = draw(shapes)
        other = _broadcast_partner(draw, shape)
        c = np.random.default_rng(2).uniform(-1.0, 1.0, other)
        return Case(lambda dt: one_node(op, dt, shape, inputs=[c, "x"]), shape)

    case.__name__ = f"{op.lower()}_constant_first"
    return case


def sum_case(draw) -> Case:
    shape = draw(shapes)
    other = _broadcast_partner(draw, shape)
    c = np.random.default_rng(3).uniform(-1.0, 1.0, other)

    def build(dt):
        nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Sum", ["x", "c", "t"], ["y0"])]
        return model_of(nodes, dt, shape, ["y0"], [numpy_helper.from_array(c.astype(dt), "c")])

    return Case(build, shape)


def hard_sigmoid_case(draw) -> Case:
    shape = draw(shapes)
    alpha, beta = draw(st.sampled_from([(0.2, 0.5), (1.0 / 6.0, 0.5), (0.5, 0.1)]))
    return Case(
        lambda dt: one_node("HardSigmoid", dt, shape, alpha=alpha, beta=beta), shape, low=-5.0, high=5.0
    )


CASES = {
    "HardSigmoid": [hard_sigmoid_case],
    "HardSwish": [unary("HardSwish", -5.0, 5.0)],
    "Sum": [sum_case],
    "Add": [binary_const("Add"), binary_both("Add")],
    "Sub": [binary_const("Sub"), binary_both("Sub")],
    "Mul": [binary_const("Mul"), binary_both("Mul")],
    "Div": [binary_const("Div"), binary_both("Div")],
    "Neg": [unary("Neg")],
    "Abs": [unary("Abs")],
    "Sqrt": [unary("Sqrt", 0.5, 2.0)],
    "Reciprocal": [unary("Reciprocal", 0.5, 2.0)],
    "Pow": [pow_case],
    "Exp": [unary("Exp")],
    "Log": [unary("Log", 0.5, 2.0)],
    "Erf": [unary("Erf")],
    "Sigmoid": [unary("Sigmoid")],
    "Tanh": [unary("Tanh")],
    "Relu": [unary("Relu")],
    "LeakyRelu": [leaky_case],
    "PRelu": [prelu_case],
    "Clip": [clip_case],
    "Min": [min_max("Min"), min_max_const_first("Min"), binary_both("Min")],
    "Max": [min_max("Max"), min_max_const_first("Max"), binary_both("Max")],
}
