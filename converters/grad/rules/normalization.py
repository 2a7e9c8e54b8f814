"""Normalizations: batch norm (inference), instance norm, Lp normalization, softmax and log-softmax.

Scale, bias and statistics are weights: they get no gradient, and a rule refuses them when they
depend on the differentiated input.
"""

from __future__ import annotations

import numpy as np
import onnx

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]


def _dy(dys: Grads) -> str:
    dy = dys[0]
    if dy is None:
        raise RuntimeError("driver called a rule with no gradient for its output")
    return dy


def _constant_weights(ctx: GradContext, node: onnx.NodeProto) -> None:
    for name in node.input[1:]:
        if name and ctx.needs_grad(name):
            raise UnsupportedOpError(node, f"weight {name!r} depends on the input; it must be a constant")


def _sum_along(ctx: GradContext, t: str, axis: int) -> str:
    return ctx.emit("ReduceSum", [t, ctx.ints([axis], "axes")], keepdims=1)


@grad_rule("BatchNormalization")
def batch_normalization(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # inference: y = scale (x - mean) / sqrt(var + eps) + bias per channel (axis 1):
    # dx = dy * scale / sqrt(var + eps), one constant per channel
    attrs = attributes(node)
    if attrs.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise UnsupportedOpError(node, "training_mode=1 (batch statistics); only inference mode is supported")
    _constant_weights(ctx, node)
    x = node.input[0]
    scale = ctx.require_value(node.input[1], node, "scale").astype(np.float64)
    var = ctx.require_value(node.input[4], node, "input_var").astype(np.float64)
    coefficient = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    coefficient = coefficient.reshape([-1] + [1] * (ctx.rank(x) - 2))
    return [ctx.emit("Mul", [_dy(dys), ctx.const(coefficient, like=x, hint="bn_coefficient")])]


@grad_rule("InstanceNormalization")
def instance_normalization(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = scale * xh + bias, xh = (x - mean) * r, r = 1 / sqrt(var + eps), statistics per (n, c) over
    # the spatial axes. With g = dy * scale: dx = r * (g - mean(g) - xh * mean(g * xh)).
    _constant_weights(ctx, node)
    x, scale = node.input[0], node.input[1]
    rank = ctx.rank(x)
    axes = list(range(2, rank))
    eps = float(attributes(node).get("epsilon", 1e-5))

    def mean(t: str) -> str:
        return ctx.emit("ReduceMean", [t], axes=axes, keepdims=1)

    centred = ctx.emit("Sub", [x, mean(x)])
    var = mean(ctx.emit("Mul", [centred, centred]))
    r = ctx.emit("Reciprocal", [ctx.emit("Sqrt", [ctx.emit("Add", [var, ctx.const(eps, like=x)])])])
    xh = ctx.emit("Mul", [centred, r])
    per_channel = ctx.emit("Reshape", [scale, ctx.ints([-1] + [1] * (rank - 2), "shape")])
    g = ctx.emit("Mul", [_dy(dys), per_channel])
    along_xh = ctx.emit("Mul", [xh, mean(ctx.emit("Mul", [g, xh]))])
    inner = ctx.emit("Sub", [ctx.emit("Sub", [g, mean(g)]), along_xh])
    return [ctx.emit("Mul", [r, inner]), None, None]


@grad_rule("LpNormalization")
def lp_normalization(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x / n along axis, n = ||x||_p. p = 2: dx = (dy - y * sum(dy * y)) / n;
    # p = 1: dx = (dy - sign(x) * sum(dy * y)) / n.
    attrs = attributes(node)
    x, y = node.input[0], node.output[0]
    axis = int(attrs.get("axis", -1)) % ctx.rank(x)
    p = int(attrs.get("p", 2))
    if p not in (1, 2):
        raise UnsupportedOpError(node, f"p={p}; supported: 1, 2")
    dy = _dy(dys)
    along = _sum_along(ctx, ctx.emit("Mul", [dy, y]), axis)
    direction = y if p == 2 else ctx.emit("Sign", [x])
    norm = ctx.emit("ReduceL2" if p == 2 else "ReduceL1", [x], axes=[axis], keepdims=1)
    return [ctx.emit("Div", [ctx.emit("Sub", [dy, ctx.emit("Mul", [direction, along])]), norm])]


@grad_rule("Softmax")
def softmax(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = exp(x) / sum(exp(x)) along axis: dx = y * (dy - sum(dy * y))
    y, dy = node.output[0], _dy(dys)
    axis = int(attributes(node).get("axis", -1)) % ctx.rank(y)
    return [ctx.emit("Mul", [y, ctx.emit("Sub", [dy, _sum_along(ctx, ctx.emit("Mul", [dy, y]), axis)])])]


@grad_rule("LogSoftmax")
def log_softmax(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x - log(sum(exp(x))) along axis: dx = dy - exp(y) * sum(dy)
    y, dy = node.output[0], _dy(dys)
    axis = int(attributes(node).get("axis", -1)) % ctx.rank(y)
    return [ctx.emit("Sub", [dy, ctx.emit("Mul", [ctx.emit("Exp", [y]), _sum_along(ctx, dy, axis)])])]
