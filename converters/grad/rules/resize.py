"""Resize with fixed scales or sizes: a linear map, separable per axis, so ``dx = dy`` times its transpose.

Along each resized axis, output ``o`` reads source coordinate ``c(o)`` (the coordinate transformation
mode) and takes the nearest pixel (``nearest_mode``) or the two neighbours weighted ``1 - t, t``
(``linear``), indices clamped to the edge. Those weights form an ``[out, in]`` matrix ``M`` built here
with numpy, so ``y = M x`` along the axis and ``dx = M^T dy``: one MatMul per resized axis.

The matrix follows onnxruntime rather than the spec's exact arithmetic: coordinates are float32 (a
nearest tie like ``1.5 / 0.6 - 0.5`` lands on 2.0, not 1.99999...), an axis whose scale is 1 is copied,
and a Resize whose output shape equals its input shape is a copy whatever the scales. At float32 ties
that onnxruntime's compiled loop rounds the other way (some non-dyadic scales with round_prefer_ceil,
asymmetric or tf_half_pixel_for_nn; under 1% of the configurations tried) the gradient of that one
output pixel goes to the neighbouring input pixel.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]

# tf_half_pixel_for_nn is the opset-11 name of TF's half_pixel_centers for nearest resizes (tf2onnx
# emits it); tf_crop_and_resize (roi, extrapolation) and half_pixel_symmetric (opset 19) are not supported.
COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")

f32 = np.float32


def source_coordinates(n_in: int, n_out: int, scale: float, mode: str) -> np.ndarray:
    """The (float32) input coordinate each output position samples, by onnxruntime's formulas."""
    o, s, half = np.arange(n_out, dtype=f32), f32(scale), f32(0.5)
    if mode == "half_pixel":
        return (o + half) / s - half
    if mode == "pytorch_half_pixel":
        return (o + half) / s - half if n_out > 1 else np.zeros(n_out, f32)
    if mode == "align_corners":
        return o * f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else np.zeros(n_out, f32)
    if mode == "asymmetric":
        return o / s
    if mode == "tf_half_pixel_for_nn":
        return (o + half) / s
    raise ValueError(f"unknown coordinate_transformation_mode {mode!r}")


def interpolation_matrix(n_in: int, n_out: int, scale: float, mode: str, coordinates: str,
                         nearest_mode: str) -> np.ndarray:
    """The ``[n_out, n_in]`` matrix of a 1-D resize (float64 holding onnxruntime's float32 weights)."""
    rows = np.arange(n_out)
    matrix = np.zeros((n_out, n_in))
    if f32(scale) == 1:
        matrix[rows, np.minimum(rows, n_in - 1)] = 1.0
        return matrix
    c = source_coordinates(n_in, n_out, scale, coordinates)
    if mode == "linear":
        c = np.clip(c, f32(0), f32(n_in - 1))
        low = np.minimum(c.astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        # weight of `low` is the distance to `high` and vice versa; both 0.5 when clamped to one pixel
        np.add.at(matrix, (rows, low), np.where(low == high, f32(0.5), np.abs(c - high.astype(f32))))
        np.add.at(matrix, (rows, high), np.where(low == high, f32(0.5), np.abs(c - low.astype(f32))))
        return matrix
    # std::round: halves away from zero
    rounded = np.where(c >= 0, np.floor(c + f32(0.5)), np.ceil(c - f32(0.5)))
    if nearest_mode == "round_prefer_floor":
        index = np.where(c == np.trunc(c) + f32(0.5), np.floor(c), rounded)
    elif nearest_mode == "round_prefer_ceil":
        index = rounded
    elif nearest_mode == "floor":
        index = np.floor(c)
    else:
        index = np.ceil(c)
    matrix[rows, np.clip(index, 0, n_in - 1).astype(np.int64)] = 1.0
    return matrix


@grad_rule("Resize")
def resize(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = M_a x along each resized axis a  =>  dx = M_a^T dy along each of them
    attrs = attributes(node)
    x, y = node.input[0], node.output[0]
    mode = attrs.get("mode", "nearest")
    coordinates = attrs.get("coordinate_transformation_mode", "half_pixel")
    nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise UnsupportedOpError(node, f"mode {mode!r}; only 'nearest' and 'linear' are supported")
    if coordinates not in COORDINATE_MODES:
        raise UnsupportedOpError(
            node, f"coordinate_transformation_mode {coordinates!r}; supported: {COORDINATE_MODES}")
    if mode == "nearest" and nearest_mode not in NEAREST_MODES:
        raise UnsupportedOpError(node, f"nearest_mode {nearest_mode!r}; supported: {NEAREST_MODES}")
    if int(attrs.get("antialias", 0)) or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedOpError(node, "antialias and keep_aspect_ratio_policy are not supported")
    if "axes" in attrs:
        raise UnsupportedOpError(node, "the axes attribute (opset 18) is not supported")
    for name in node.input[1:]:
        if name and ctx.needs_grad(name):
            raise UnsupportedOpError(node, f"roi/scales/sizes {name!r} depend on the input")

    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    scales = _optional_constant(ctx, node, 2, "scales")
    sizes = _optional_constant(ctx, node, 3, "sizes")
    if scales is None and sizes is None:
        raise UnsupportedOpError(node, "needs constant scales or sizes")
    if in_shape == out_shape:
        return [dys[0]]  # onnxruntime copies the input when no dim changes, whatever the scales
    grad, cur = dys[0], list(out_shape)
    for axis in reversed(range(len(in_shape))):
        n_in = in_shape[axis]
        n_out = int(sizes[axis]) if sizes is not None else out_shape[axis]
        if n_in == n_out and (scales is None or f32(scales[axis]) == 1):
            continue  # identity along this axis
        if n_in is None or n_out is None:
            raise UnsupportedOpError(node, f"axis {axis} is resized but its size is dynamic")
        # the coordinate formulas use the given scale, or out/in when sizes are given
        scale = float(scales[axis]) if scales is not None else float(f32(n_out) / f32(n_in))
        matrix = interpolation_matrix(n_in, n_out, scale, mode, coordinates, nearest_mode)
        grad = _apply_transposed(ctx, node, grad, cur, axis, matrix, like=x)
        cur[axis] = n_in
    return [grad]


def _optional_constant(ctx: GradContext, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    value = ctx.require_value(node.input[index], node, what)
    return value if value.size else None


def _apply_transposed(ctx: GradContext, node: onnx.NodeProto, grad: str, shape: list[int | None], axis: int,
                      matrix: np.ndarray, *, like: str) -> str:
    """``M^T`` applied along ``axis`` of ``grad`` (of ``shape``), as one MatMul (Reshapes are free)."""
    rank = len(shape)
    if axis == rank - 1:  # [..., out] @ [out, in]
        return ctx.emit("MatMul", [grad, ctx.const(matrix, like=like, hint="resize_matrix")])
    transposed = ctx.const(np.ascontiguousarray(matrix.T), like=like, hint="resize_matrix_t")
    if axis == rank - 2:  # [in, out] @ [..., out, w]
        return ctx.emit("MatMul", [transposed, grad])
    before, after = shape[:axis], shape[axis + 1:]
    if any(d is None for d in after) or sum(d is None for d in before) > 1:
        raise UnsupportedOpError(node, f"cannot fold the dims around resized axis {axis} of {shape}")
    lead = -1 if None in before else math.prod(int(d) for d in before if d is not None)
    rows = ctx.emit("Reshape", [grad, ctx.ints([lead, matrix.shape[0], math.prod(after)], "rows")])
    out = ctx.emit("MatMul", [transposed, rows])
    back = [-1 if d is None else d for d in shape]
    back[axis] = matrix.shape[1]
    return ctx.emit("Reshape", [out, ctx.ints(back, "shape")])
