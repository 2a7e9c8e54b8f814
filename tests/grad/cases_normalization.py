"""Cases for the normalizations: batch norm (inference), instance norm, Lp norm, softmax, log-softmax."""

from __future__ import annotations

import numpy as np
from harness import Case, one_node
from hypothesis import strategies as st

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple).filter(lambda s: np.prod(s) <= 96)


def _channel_params(c: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, c), rng.uniform(-1.0, 1.0, c)


def batch_norm_case(draw) -> Case:
    """Inference form on [N, C] and [N, C, spatial...] inputs (rank 2 to 4)."""
    shape = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple))
    c = shape[1]
    scale, bias = _channel_params(c, 0)
    rng = np.random.default_rng(1)
    mean, var = rng.uniform(-1.0, 1.0, c), rng.uniform(0.1, 2.0, c)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    inputs = ["x", scale, bias, mean, var]
    return Case(lambda dt: one_node("BatchNormalization", dt, shape, inputs=inputs, epsilon=eps), shape)


def instance_norm_case(draw) -> Case:
    """Statistics over the spatial axes (1-D or 2-D). At least 3 elements per instance: with 2 the
    output is +-scale whatever x is, and the gradient is pure rounding noise."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2).filter(lambda s: np.prod(s) >= 3))
    shape = (n, c, *spatial)
    scale, bias = _channel_params(c, 2)
    eps = draw(st.sampled_from([1e-5, 1e-2]))
    inputs = ["x", scale, bias]
    return Case(lambda dt: one_node("InstanceNormalization", dt, shape, inputs=inputs, epsilon=eps), shape)


def lp_norm_case(p: int | None):
    """p=2 (None: the default p and axis) on signed inputs; p=1 on positive ones (onnx's reference sums
    x, not |x|, for p=1)."""

    def case(draw) -> Case:
        shape = draw(shapes)
        attrs = {} if p is None else {"p": p, "axis": draw(st.integers(-len(shape), len(shape) - 1))}
        low = 0.5 if p == 1 else -2.0
        return Case(lambda dt: one_node("LpNormalization", dt, shape, **attrs), shape, low=low, high=2.0)

    case.__name__ = f"lpnormalization_p{p or 'default'}"
    return case


def softmax_case(op: str, default_axis: bool):
    def case(draw) -> Case:
        shape = draw(shapes)
        attrs = {} if default_axis else {"axis": draw(st.integers(-len(shape), len(shape) - 1))}
        return Case(lambda dt: one_node(op, dt, shape, **attrs), shape)

    case.__name__ = f"{op.lower()}_{'default_axis' if default_axis else 'axis'}"
    return case


CASES = {
    "BatchNormalization": [batch_norm_case],
    "InstanceNormalization": [instance_norm_case],
    "LpNormalization": [lp_norm_case(None), lp_norm_case(1), lp_norm_case(2)],
    "Softmax": [softmax_case("Softmax", True), softmax_case("Softmax", False)],
    "LogSoftmax": [softmax_case("LogSoftmax", True), softmax_case("LogSoftmax", False)],
}
