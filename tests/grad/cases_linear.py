"""Cases for Gemm (transposes, alpha/beta, bias shapes, input on either side) and MatMul (batched,
broadcast, 1-D operands, both operands depending on the input)."""

from __future__ import annotations

import numpy as np
from harness import Case, model_of, one_node
from hypothesis import strategies as st
from onnx import helper, numpy_helper

dims = st.integers(1, 4)


def gemm_weight(draw) -> Case:
    m, k, n = draw(dims), draw(dims), draw(dims)
    ta, tb = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    alpha, beta = draw(st.sampled_from([1.0, 0.5, -2.0])), draw(st.sampled_from([1.0, 0.3]))
    rng = np.random.default_rng(m * 16 + k * 4 + n)
    b = rng.standard_normal((n, k) if tb else (k, n))
    c_shape = draw(st.sampled_from([None, (), (n,), (1, n), (m, 1), (m, n)]))
    inputs: list = ["x", b] + ([] if c_shape is None else [rng.standard_normal(c_shape)])
    shape = (k, m) if ta else (m, k)
    return Case(
        lambda dt: one_node("Gemm", dt, shape, inputs=inputs, alpha=alpha, beta=beta, transA=ta, transB=tb),
        shape,
    )


def gemm_input_on_every_side(draw) -> Case:
    """A = x, B = tanh(x) (x x^T-like) and C = x: every operand depends on the input."""
    m, k = draw(dims), draw(dims)
    ta = draw(st.integers(0, 1))
    alpha, beta = draw(st.sampled_from([1.0, 0.7])), draw(st.sampled_from([1.0, -0.5]))
    shape = (m, k)

    def build(dt):
        # A' = x^T when transA (shape k x m) and B' = tanh(x) (m x k) then, else A' = x and B' = tanh(x)^T
        nodes = [helper.make_node("Tanh", ["x"], ["t"])]
        if ta:
            nodes.append(helper.make_node("Gemm", ["x", "t"], ["y0"], alpha=alpha, transA=1))
        else:
            nodes.append(helper.make_node("Gemm", ["x", "t", "s"], ["y0"], alpha=alpha, beta=beta, transB=1))
            nodes.insert(0, helper.make_node("ReduceSum", ["x", "one"], ["s"], keepdims=1))
        return model_of(
            nodes, dt, shape, ["y0"], [numpy_helper.from_array(np.array([1], dtype=np.int64), "one")]
        )

    return Case(build, shape)


def _batch(draw, rank: int) -> tuple[int, ...]:
    return tuple(draw(st.integers(1, 3)) for _ in range(rank))


def _broadcast_partner(draw, batch: tuple[int, ...]) -> tuple[int, ...]:
    """A batch shape broadcasting against ``batch``: a suffix of it with some dims set to 1."""
    k = draw(st.integers(0, len(batch)))
    return tuple(1 if draw(st.booleans()) else d for d in batch[len(batch) - k :])


def matmul_weight(draw) -> Case:
    """x [batch..., M, K] @ W [batch'..., K, N] (or W @ x), batch dims broadcast either way."""
    batch = _batch(draw, draw(st.integers(0, 2)))
    other = _broadcast_partner(draw, batch)
    if draw(st.booleans()):
        batch, other = other, batch
    m, k, n = draw(dims), draw(dims), draw(dims)
    w = np.random.default_rng(m + 7 * n).standard_normal((*other, k, n))
    if draw(st.booleans()):
        shape = (*batch, m, k)
        inputs: list = ["x", w]
    else:
        shape = (*batch, n, m)
        w = np.random.default_rng(k).standard_normal((*other, k, n))
        inputs = [w, "x"]
    return Case(lambda dt: one_node("MatMul", dt, shape, inputs=inputs), shape)


def matmul_vector(draw) -> Case:
    """1-D operands: x [K] @ W [..., K, N], W [..., M, K] @ x [K], x [K] @ w [K], and W [K] @ x."""
    k, n = draw(dims), draw(dims)
    batch = _batch(draw, draw(st.integers(0, 2)))
    rng = np.random.default_rng(k * 5 + n)
    variant = draw(st.sampled_from(["vec_mat", "mat_vec", "vec_vec", "wvec_mat"]))
    if variant == "vec_mat":
        shape, inputs = (k,), ["x", rng.standard_normal((*batch, k, n))]
    elif variant == "mat_vec":
        shape, inputs = (k,), [rng.standard_normal((*batch, n, k)), "x"]
    elif variant == "vec_vec":
        shape, inputs = (k,), ["x", rng.standard_normal(k)]
    else:
        shape, inputs = (*batch, k, n), [rng.standard_normal(k), "x"]
    return Case(lambda dt: one_node("MatMul", dt, shape, inputs=inputs), shape)


def matmul_both_operands(draw) -> Case:
    """Attention-like ``x @ f(x)^T`` where f(x) is also broadcast over a batch axis."""
    batch = _batch(draw, draw(st.integers(1, 2)))
    m, k = draw(dims), draw(dims)
    shape = (*batch, m, k)
    rank = len(shape)
    broadcast = draw(st.booleans())

    def build(dt):
        perm = [*range(rank - 2), rank - 1, rank - 2]
        nodes = [helper.make_node("Tanh", ["x"], ["t"])]
        if broadcast:  # mean over the first batch axis, kept as 1: B broadcasts along it
            nodes.append(helper.make_node("ReduceMean", ["t"], ["tm"], axes=[0], keepdims=1))
        nodes += [
            helper.make_node("Transpose", ["tm" if broadcast else "t"], ["tt"], perm=perm),
            helper.make_node("MatMul", ["x", "tt"], ["y0"]),
            helper.make_node("MatMul", ["tt", "x"], ["y1"]),
        ]
        return model_of(nodes, dt, shape, ["y0", "y1"])

    return Case(build, shape)


CASES = {
    "Gemm": [gemm_weight, gemm_input_on_every_side],
    "MatMul": [matmul_weight, matmul_vector, matmul_both_operands],
}
