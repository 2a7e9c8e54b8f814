"""Pooling: max pools route dy to the argmax, average pools spread it evenly over each window.

MaxPool reuses the forward node's ``Indices`` output (flat positions over the whole N*C*H*W tensor):
one ScatterElements(reduction="add") of dy into zeros. AveragePool is linear: ``y = (1/n_o) sum x`` over
window ``o``, so ``dx`` is the transpose of a depthwise conv with a kernel of ones applied to ``dy / n_o``,
where the divisor ``n_o`` (window size, or the count of real pixels when ``count_include_pad=0``; ceil_mode
windows may overrun the padded input) is computed here from static shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule
from uncnn_rt.converters.grad.rules.conv import (
    depthwise_gradient,
    forward_pads,
    spatial_dims,
    transpose_geometry,
)

Grads = list[str | None]


@grad_rule("MaxPool")
def max_pool(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y_o = x[idx_o]  =>  dx[idx_o] += dy_o (overlapping windows may pick one pixel several times)
    attrs = attributes(node)
    if int(attrs.get("storage_order", 0)) != 0:
        raise UnsupportedOpError(node, "storage_order=1 (column-major indices) is not supported")
    x = node.input[0]
    dy = dys[0]
    if int(attrs.get("ceil_mode", 0)) and all(d is not None for d in ctx.shape(x)):
        x_dims = spatial_dims(ctx, x, node)
        rank = len(x_dims)
        strides, dilations = list(attrs.get("strides", [1] * rank)), list(attrs.get("dilations", [1] * rank))
        y_dims = _pooled_dims(node, attrs, x_dims, list(attrs["kernel_shape"]), strides, dilations)
        dy = _true_shape(ctx, node, dy, y_dims)
    indices = ctx.forward_output(node, 1)
    flat = ctx.ints([-1], "flat")
    dx = ctx.emit("ScatterElements", [_flat_zeros(ctx, x), ctx.emit("Reshape", [indices, flat]),
                                      ctx.emit("Reshape", [dy, flat])], axis=0, reduction="add")
    return [_reshape_like(ctx, dx, x)]


@grad_rule("GlobalMaxPool")
def global_max_pool(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y[n, c] = max over the spatial positions: dy goes to the first argmax of each channel
    x = node.input[0]
    rows_shape = ctx.ints([0, 0, -1], "rows")
    argmax = ctx.emit("ArgMax", [ctx.emit("Reshape", [x, rows_shape])], axis=2, keepdims=1)
    dy = ctx.emit("Reshape", [dys[0], ctx.ints([0, 0, 1], "rows")])
    zeros = ctx.emit("Reshape", [ctx.zeros_like(x), rows_shape])
    dx = ctx.emit("ScatterElements", [zeros, argmax, dy], axis=2)
    return [_reshape_like(ctx, dx, x)]


@grad_rule("GlobalAveragePool")
def global_average_pool(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y[n, c] = mean over the H*W... positions: dx = dy / (H*W...) everywhere
    x = node.input[0]
    count = math.prod(spatial_dims(ctx, x, node))
    scaled = ctx.emit("Mul", [dys[0], ctx.const(1.0 / count, like=x)])
    return [ctx.emit("Expand", [scaled, ctx.shape_of(x)])]


@grad_rule("AveragePool")
def average_pool(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y_o = (1 / n_o) sum_{i in window o} x_i  =>  dx = ConvTranspose(dy / n_o, ones, group=C)
    attrs = attributes(node)
    x = node.input[0]
    x_dims = spatial_dims(ctx, x, node)
    rank = len(x_dims)
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    if any(d != 1 for d in dilations):
        raise UnsupportedOpError(node, f"dilated average pooling (dilations {dilations}) is not supported")
    channels = ctx.shape(x)[1]
    if channels is None:
        raise UnsupportedOpError(node, f"the channel count of {x!r} must be static")
    y_dims = _pooled_dims(node, attrs, x_dims, kernel, strides, dilations)
    begin, end = forward_pads(node, attrs, x_dims, y_dims, kernel, strides, dilations)
    include_pad = int(attrs.get("count_include_pad", 0))
    inverse = _inverse_counts(x_dims, y_dims, kernel, strides, begin, end, include_pad)
    dy = _true_shape(ctx, node, dys[0], y_dims)
    weight = np.ones((channels, 1, *kernel))
    if np.all(inverse == inverse.flat[0]):
        weight *= inverse.flat[0]  # every window has the same divisor: fold it into the kernel
    else:
        dy = ctx.emit("Mul", [dy, ctx.const(inverse[None, None], like=x, hint="inverse_counts")])
    # a depthwise Conv where the pads allow (onnxruntime's grouped ConvTranspose is several times slower)
    dx = depthwise_gradient(ctx, dy, weight, x_dims, y_dims, strides, dilations, begin, int(channels), like=x)
    if dx is None:
        geometry = transpose_geometry(x_dims, y_dims, kernel, strides, dilations, begin)
        dx = ctx.emit("ConvTranspose", [dy, ctx.const(weight, like=x, hint="ones")], group=int(channels),
                      kernel_shape=kernel, strides=strides, **geometry)
    return [dx]


def _pooled_dims(node: onnx.NodeProto, attrs: dict, x_dims: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """The pool's output dims as onnxruntime computes them (onnx's shape inference misses the ceil_mode
    rule that the last window must start inside the input or its begin pad)."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    ceil_mode = int(attrs.get("ceil_mode", 0))
    if auto_pad != "NOTSET" and ceil_mode:
        raise UnsupportedOpError(node, f"ceil_mode=1 with auto_pad={auto_pad} is not supported")
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return [-(-x // s) for x, s in zip(x_dims, strides, strict=True)]
    if auto_pad == "VALID":
        return [(x - k) // s + 1 for x, k, s in zip(x_dims, spans, strides, strict=True)]
    rank = len(x_dims)
    pads = list(attrs.get("pads", [0] * 2 * rank))
    dims = []
    for i, (x, k, s) in enumerate(zip(x_dims, spans, strides, strict=True)):
        room = x + pads[i] + pads[rank + i] - k
        y = (-(-room // s) if ceil_mode else room // s) + 1
        if ceil_mode and (y - 1) * s >= x + pads[i]:
            y -= 1
        dims.append(y)
    return dims


def _true_shape(ctx: GradContext, node: onnx.NodeProto, dy: str, y_dims: list[int]) -> str:
    """``dy`` cut to the pool's real output dims where onnx's shape inference declared one position more
    (ceil_mode): a no-op at run time, unless onnxruntime folded that wrong shape into a Shape/Expand."""
    if list(ctx.shape(node.output[0])[2:]) == y_dims:
        return dy
    rank = len(y_dims)
    return ctx.emit("Slice", [dy, ctx.ints([0] * rank), ctx.ints(y_dims), ctx.ints(list(range(2, rank + 2)))])


def _inverse_counts(x_dims: Sequence[int], y_dims: Sequence[int], kernel: Sequence[int],
                    strides: Sequence[int], begin: Sequence[int], end: Sequence[int],
                    include_pad: int) -> np.ndarray:
    """``1 / n_o`` for every output position: the product over axes of the window's length inside the
    input (``count_include_pad=0``) or inside the padded input (``=1``; ceil_mode windows may overrun it)."""
    per_axis = []
    for x, y, k, s, b, e in zip(x_dims, y_dims, kernel, strides, begin, end, strict=True):
        start = np.arange(y) * s - b
        lo, hi = (0, x) if not include_pad else (-b, x + e)
        per_axis.append(np.minimum(start + k, hi) - np.maximum(start, lo))
    counts = per_axis[0]
    for lengths in per_axis[1:]:
        counts = np.multiply.outer(counts, lengths)
    return 1.0 / counts


def _flat_zeros(ctx: GradContext, x: str) -> str:
    shape = ctx.shape(x)
    if any(d is None for d in shape):
        return ctx.emit("Reshape", [ctx.zeros_like(x), ctx.ints([-1], "flat")])
    size = math.prod(int(d) for d in shape if d is not None)
    fill = numpy_helper.from_array(np.zeros((1,), dtype=ctx.np_dtype(x)))
    return ctx.emit("ConstantOfShape", [ctx.ints([size], "size")], value=fill)


def _reshape_like(ctx: GradContext, grad: str, x: str) -> str:
    shape = ctx.shape(x)
    if any(d is None for d in shape):
        return ctx.emit("Reshape", [grad, ctx.shape_of(x)])
    return ctx.emit("Reshape", [grad, ctx.ints([int(d) for d in shape if d is not None], "shape")])
