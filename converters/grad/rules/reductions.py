"""Reductions over axes: the gradient is ``dy`` broadcast back over the reduced axes."""

from __future__ import annotations

import onnx

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]


def reduced_axes(ctx: GradContext, node: onnx.NodeProto, axes_input: bool) -> list[int]:
    """The normalised axes a Reduce* node reduces (all axes when none are given)."""
    rank = ctx.rank(node.input[0])
    attrs = attributes(node)
    if axes_input:
        if len(node.input) > 1 and node.input[1]:
            axes = [int(a) for a in ctx.require_value(node.input[1], node, "axes").reshape(-1)]
        else:
            axes = []
    else:
        axes = list(attrs.get("axes", []))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            raise UnsupportedOpError(node, "noop_with_empty_axes=1 with empty axes")
        return list(range(rank))
    return sorted(a % rank for a in axes)


def expand_back(ctx: GradContext, node: onnx.NodeProto, dy: str, axes: list[int]) -> str:
    """Re-insert reduced axes (when keepdims=0) and broadcast ``dy`` to the input's shape."""
    if not attributes(node).get("keepdims", 1):
        dy = ctx.emit("Unsqueeze", [dy, ctx.ints(axes, "axes")])
    return ctx.emit("Expand", [dy, ctx.shape_of(node.input[0])])


@grad_rule("ReduceSum")
def reduce_sum(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = sum_axes x: dy/dx = 1
    assert dys[0] is not None
    axes = reduced_axes(ctx, node, axes_input=True)
    return [expand_back(ctx, node, dys[0], axes), None]


@grad_rule("ReduceMean")
def reduce_mean(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = mean_axes x: dy/dx = 1 / (number of reduced elements)
    assert dys[0] is not None
    axes = reduced_axes(ctx, node, axes_input=False)
    shape = ctx.static_shape(node.input[0], node) if any(ctx.shape(node.input[0])[a] is None for a in axes) \
        else ctx.shape(node.input[0])
    count = 1
    for a in axes:
        count *= int(shape[a] or 1)
    scaled = ctx.emit("Mul", [dys[0], ctx.const(1.0 / count, like=node.input[0])])
    return [expand_back(ctx, node, scaled, axes)]
