"""Reductions over axes: the gradient is ``dy`` broadcast back over the reduced axes, times the local
derivative of the reduction.

Axes come from the ``axes`` input (ReduceSum at opset 13+) or attribute (the others at opset 17); no
axes means every axis, unless ``noop_with_empty_axes=1`` makes the node the identity.
"""

from __future__ import annotations

import onnx

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]


def reduced_axes(ctx: GradContext, node: onnx.NodeProto) -> list[int] | None:
    """The sorted, non-negative axes ``node`` reduces; None when it is a no-op (empty axes, noop flag)."""
    rank = ctx.rank(node.input[0])
    attrs = attributes(node)
    if len(node.input) > 1 and node.input[1]:
        axes = [int(a) for a in ctx.require_value(node.input[1], node, "axes").reshape(-1)]
    else:
        axes = [int(a) for a in attrs.get("axes", [])]
    if not axes:
        return None if attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    return sorted({a % rank for a in axes})


def keep_dims(ctx: GradContext, node: onnx.NodeProto, reduced: str, axes: list[int]) -> str:
    """A reduced tensor (``dy`` or ``y``) with the reduced axes present as size 1, so it broadcasts over x."""
    if attributes(node).get("keepdims", 1):
        return reduced
    return ctx.emit("Unsqueeze", [reduced, ctx.ints(axes, "axes")])


def expand_back(ctx: GradContext, node: onnx.NodeProto, dy: str, axes: list[int]) -> str:
    """``dy`` broadcast to the input's shape."""
    return ctx.emit("Expand", [keep_dims(ctx, node, dy, axes), ctx.shape_of(node.input[0])])


def _dy(dys: Grads) -> str:
    dy = dys[0]
    if dy is None:
        raise RuntimeError("driver called a rule with no gradient for its output")
    return dy


@grad_rule("ReduceSum")
def reduce_sum(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = sum_axes x: dy/dx = 1
    axes = reduced_axes(ctx, node)
    if axes is None:
        return [_dy(dys), None]
    return [expand_back(ctx, node, _dy(dys), axes), None]


@grad_rule("ReduceMean")
def reduce_mean(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = mean_axes x: dy/dx = 1 / (number of reduced elements)
    x = node.input[0]
    axes = reduced_axes(ctx, node)
    if axes is None:
        return [_dy(dys), None]
    dims = [ctx.shape(x)[a] for a in axes]
    if all(d is not None for d in dims):
        count = 1
        for d in dims:
            count *= int(d or 1)
        scale = ctx.const(1.0 / count, like=x)
    else:  # a reduced axis is dynamic: count = size(x) / size(y) at run time
        sizes = [ctx.emit("Cast", [ctx.emit("Size", [t])], to=ctx.elem_type(x)) for t in (node.output[0], x)]
        scale = ctx.emit("Div", sizes)
    return [expand_back(ctx, node, ctx.emit("Mul", [_dy(dys), scale]), axes), None]


@grad_rule("ReduceL2")
def reduce_l2(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = sqrt(sum_axes x^2): dy/dx = x / y. Where y = 0 every x in the group is 0, so dividing by 1
    # instead gives the subgradient 0 (what torch's norm backward returns) rather than NaN.
    x, y = node.input[0], node.output[0]
    axes = reduced_axes(ctx, node)
    if axes is None:
        raise UnsupportedOpError(node, "noop_with_empty_axes=1 with no axes (an identity or |x|, by runtime)")
    safe_y = ctx.emit("Where", [ctx.emit("Equal", [y, ctx.const(0.0, like=y)]), ctx.const(1.0, like=y), y])
    ratio = ctx.emit("Div", [_dy(dys), safe_y])
    return [ctx.emit("Mul", [x, keep_dims(ctx, node, ratio, axes)]), None]


@grad_rule("ReduceMax", "ReduceMin")
def reduce_max(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = max_axes x: dy flows to the elements equal to y. Ties share it evenly (dy / count), as
    # TensorFlow's reduce_max and torch.amax do; the result is a valid subgradient either way.
    x, y = node.input[0], node.output[0]
    axes = reduced_axes(ctx, node)
    if axes is None:
        return [_dy(dys), None]
    hit = ctx.emit("Equal", [x, keep_dims(ctx, node, y, axes)])
    mask = ctx.emit("Cast", [hit], to=ctx.elem_type(x))
    count = ctx.emit("ReduceSum", [mask, ctx.ints(axes, "axes")], keepdims=1)
    share = ctx.emit("Div", [keep_dims(ctx, node, _dy(dys), axes), count])
    return [ctx.emit("Mul", [mask, share]), None]
