"""Matrix products: Gemm and MatMul (numpy semantics: batched, broadcast, 1-D operands promoted).

For ``Y = A B``: ``dA = dY B^T`` and ``dB = A^T dY``, then summed over the batch dims the operand was
broadcast along. Either operand may depend on the input (``x @ x^T`` in attention-like blocks).
"""

from __future__ import annotations

import onnx

from uncnn_rt.converters.grad.registry import GradContext, Shape, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]


@grad_rule("Gemm")
def gemm(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # Y = alpha A' B' + beta C, A' = A^T if transA, B' = B^T if transB:
    #   dA' = alpha dY B'^T, dB' = alpha A'^T dY, dC = beta dY (un-broadcast)
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    attrs = attributes(node)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))
    dy = dys[0]
    da = db = dc = None
    if ctx.needs_grad(a):
        # dA = dA'^T when transA: (alpha dY B'^T)^T = alpha B' dY^T
        da = (ctx.emit("Gemm", [b, dy], alpha=alpha, transA=tb, transB=1) if ta
              else ctx.emit("Gemm", [dy, b], alpha=alpha, transB=1 - tb))
    if ctx.needs_grad(b):
        # dB = dB'^T when transB: (alpha A'^T dY)^T = alpha dY^T A'
        db = (ctx.emit("Gemm", [dy, a], alpha=alpha, transA=1, transB=ta) if tb
              else ctx.emit("Gemm", [a, dy], alpha=alpha, transA=1 - ta))
    if c is not None and ctx.needs_grad(c):
        scaled = dy if beta == 1.0 else ctx.emit("Mul", [dy, ctx.const(beta, like=c)])
        dc = ctx.unbroadcast(scaled, like=node.output[0], to=c, node=node)
    return [da, db, dc]


@grad_rule("MatMul")
def matmul(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # Y = A B over the last two axes; a 1-D A is read as [1, K], a 1-D B as [K, 1] (that axis then dropped)
    a, b = node.input
    a_shape, b_shape = ctx.shape(a), ctx.shape(b)
    dy = dys[0]
    if len(a_shape) == 1:
        dy = ctx.emit("Unsqueeze", [dy, ctx.ints([-2 if len(b_shape) > 1 else -1])])
    if len(b_shape) == 1:
        dy = ctx.emit("Unsqueeze", [dy, ctx.ints([-1])])
    a2 = (1, *a_shape) if len(a_shape) == 1 else a_shape
    b2 = (*b_shape, 1) if len(b_shape) == 1 else b_shape
    a_op = ctx.emit("Unsqueeze", [a, ctx.ints([0])]) if len(a_shape) == 1 else a
    b_op = ctx.emit("Unsqueeze", [b, ctx.ints([-1])]) if len(b_shape) == 1 else b
    batch = _broadcast_dims(node, a2[:-2], b2[:-2])
    da = db = None
    if ctx.needs_grad(a):
        grad = ctx.emit("MatMul", [dy, _swap_last(ctx, b_op, len(b2))])
        da = _sum_to(ctx, node, grad, (*batch, a2[-2], a2[-1]), a, a2)
    if ctx.needs_grad(b):
        grad = ctx.emit("MatMul", [_swap_last(ctx, a_op, len(a2)), dy])
        db = _sum_to(ctx, node, grad, (*batch, b2[-2], b2[-1]), b, b2)
    return [da, db]


def _swap_last(ctx: GradContext, name: str, rank: int) -> str:
    perm = [*range(rank - 2), rank - 1, rank - 2]
    return ctx.emit("Transpose", [name], perm=perm)


def _broadcast_dims(node: onnx.NodeProto, a: Shape, b: Shape) -> Shape:
    """numpy broadcast of two batch shapes; ``None`` (dynamic) wins over 1."""
    rank = max(len(a), len(b))
    a = (1,) * (rank - len(a)) + tuple(a)
    b = (1,) * (rank - len(b)) + tuple(b)
    out: list[int | None] = []
    for p, q in zip(a, b, strict=True):
        if p == 1:
            out.append(q)
        elif q == 1 or q is None or p == q:
            out.append(p)
        elif p is None:
            out.append(q)
        else:
            raise UnsupportedOpError(node, f"batch dims {a} and {b} do not broadcast")
    return tuple(out)


def _sum_to(ctx: GradContext, node: onnx.NodeProto, grad: str, grad_shape: Shape, target: str,
            promoted: Shape) -> str:
    """Sum ``grad`` over the axes along which ``target`` (read with shape ``promoted``) was broadcast."""
    lead = len(grad_shape) - len(promoted)
    axes = list(range(lead))
    axes += [lead + i for i, dim in enumerate(promoted) if dim == 1 and grad_shape[lead + i] != 1]
    if axes:
        grad = ctx.emit("ReduceSum", [grad, ctx.ints(axes, "axes")], keepdims=1)
    if lead or len(promoted) != ctx.rank(target):
        shape = ctx.shape(target)
        if any(d is None for d in shape):
            grad = ctx.emit("Reshape", [grad, ctx.shape_of(target)])
        else:
            grad = ctx.emit("Reshape", [grad, ctx.ints([int(d) for d in shape if d is not None], "shape")])
    return grad
