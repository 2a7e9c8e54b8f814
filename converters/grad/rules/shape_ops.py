"""Ops that move or copy values without arithmetic: their gradients route ``dy`` back.

Every rule here is a linear map's adjoint: a reshape's adjoint reshapes back, a slice's adjoint pads
with zeros, a pad's adjoint slices (and, for reflect/edge padding, adds the copied border values back
onto the elements they were copied from), a gather's adjoint scatter-adds.
"""

from __future__ import annotations

import numpy as np
import onnx

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]

INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)


def _dy(dys: Grads) -> str:
    dy = dys[0]
    if dy is None:
        raise RuntimeError("driver called a rule with no gradient for its output")
    return dy


def _reshape_to(ctx: GradContext, grad: str, like: str) -> str:
    """``grad`` reshaped to forward tensor ``like``'s shape (a constant shape when it is static)."""
    shape = ctx.shape(like)
    if all(d is not None and d > 0 for d in shape):
        return ctx.emit("Reshape", [grad, ctx.ints([int(d) for d in shape if d is not None], "shape")])
    return ctx.emit("Reshape", [grad, ctx.shape_of(like)], allowzero=1)  # a 0 in Shape(x) is a real 0


def _pad(ctx: GradContext, grad: str, rank: int, widths: dict[int, tuple[int, int]]) -> str:
    """Zero-pad ``grad`` by ``widths[axis] = (before, after)``."""
    if not any(b or e for b, e in widths.values()):
        return grad
    pads = [0] * (2 * rank)
    for axis, (before, after) in widths.items():
        pads[axis], pads[rank + axis] = before, after
    return ctx.emit("Pad", [grad, ctx.ints(pads, "pads")], mode="constant")


def _slice(ctx: GradContext, grad: str, axes: list[int], starts: list[int], ends: list[int],
           steps: list[int] | None = None) -> str:
    inputs = [grad, ctx.ints(starts, "starts"), ctx.ints(ends, "ends"), ctx.ints(axes, "axes")]
    if steps is not None:
        inputs.append(ctx.ints(steps, "steps"))
    return ctx.emit("Slice", inputs)


def _optional_value(ctx: GradContext, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
    if len(node.input) > index and node.input[index]:
        return ctx.require_value(node.input[index], node, what)
    return None


@grad_rule("Identity")
def identity(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    return [dys[0]]


@grad_rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x with another shape (shape/axes inputs, constant or computed at run time): dx = dy reshaped back
    return [_reshape_to(ctx, _dy(dys), node.input[0]), None]


@grad_rule("Transpose")
def transpose(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x.transpose(perm): dx = dy.transpose(perm^-1)
    rank = ctx.rank(node.input[0])
    perm = list(attributes(node).get("perm", range(rank - 1, -1, -1)))
    inverse = [int(i) for i in np.argsort(perm)]
    return [ctx.emit("Transpose", [_dy(dys)], perm=inverse)]


@grad_rule("Dropout")
def dropout(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # Inference-mode dropout is the identity (ratio is ignored).
    if len(node.input) > 2 and node.input[2]:
        mode = ctx.value(node.input[2])
        if mode is None:
            raise UnsupportedOpError(node, "training_mode is computed at run time; only inference is handled")
        if bool(np.asarray(mode).reshape(-1)[0]):
            raise UnsupportedOpError(node, "training_mode=true (random dropout); only inference is supported")
    return [_dy(dys), None, None]


@grad_rule("Cast")
def cast(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = float(x) between float types: dx = dy cast back to x's type
    x, y = node.input[0], node.output[0]
    if ctx.elem_type(x) == ctx.elem_type(y):
        return [_dy(dys)]
    return [ctx.emit("Cast", [_dy(dys)], to=ctx.elem_type(x))]


@grad_rule("Concat")
def concat(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = [x_1 | x_2 | ...] along axis: dx_i = the slice of dy that x_i filled
    rank = ctx.rank(node.output[0])
    axis = int(attributes(node)["axis"]) % rank
    sizes = [ctx.shape(name)[axis] for name in node.input]
    if any(s is None for s in sizes):
        raise UnsupportedOpError(node, f"concatenation along dynamic axis {axis} (input sizes {sizes})")
    dy, need = _dy(dys), [ctx.needs_grad(name) for name in node.input]
    if all(need):
        return list(ctx.emit_multi("Split", [dy, ctx.ints([int(s or 0) for s in sizes], "split")],
                                   len(sizes), axis=axis))
    grads: Grads = []
    offset = 0
    for size, wanted in zip(sizes, need, strict=True):
        grads.append(_slice(ctx, dy, [axis], [offset], [offset + int(size or 0)]) if wanted else None)
        offset += int(size or 0)
    return grads


@grad_rule("Split")
def split(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y_1, y_2, ... = pieces of x along axis: dx = [dy_1 | dy_2 | ...]; unused pieces contribute zeros
    rank = ctx.rank(node.input[0])
    axis = int(attributes(node).get("axis", 0)) % rank
    pieces = [dy if dy is not None else ctx.zeros_like(out) for dy, out in zip(dys, node.output, strict=True)]
    return [ctx.emit("Concat", pieces, axis=axis), None]


def _slice_range(start: int, end: int, step: int, dim: int) -> range:
    """The indices ONNX Slice selects on an axis of length ``dim`` (clamping as its spec says)."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), dim), min(max(end, 0), dim), step)
    return range(min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step)


@grad_rule("Slice")
def slice_(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x[start:end:step] per axis: dx = dy placed back at the selected indices, zeros elsewhere.
    # Negative steps: reverse dy first. Steps k > 1: interleave k-1 zeros after each element
    # (Unsqueeze, Pad, Reshape). Then one zero Pad puts the block at its offset.
    x = node.input[0]
    shape, rank = list(ctx.shape(x)), ctx.rank(x)
    starts = [int(v) for v in ctx.require_value(node.input[1], node, "starts").reshape(-1)]
    ends = [int(v) for v in ctx.require_value(node.input[2], node, "ends").reshape(-1)]
    axes_v, steps_v = _optional_value(ctx, node, 3, "axes"), _optional_value(ctx, node, 4, "steps")
    axes = [int(a) % rank for a in axes_v.reshape(-1)] if axes_v is not None else list(range(len(starts)))
    steps = [int(s) for s in steps_v.reshape(-1)] if steps_v is not None else [1] * len(starts)

    selected: dict[int, range] = {}
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        dim = shape[axis]
        if dim is None:
            if step == 1 and start == 0 and end >= 2**31 - 1:
                continue  # the whole dynamic axis: nothing to undo
            raise UnsupportedOpError(node, f"slice {start}:{end}:{step} of dynamic axis {axis}")
        selected[axis] = _slice_range(start, end, step, dim)
    if any(len(r) == 0 for r in selected.values()):
        return [ctx.zeros_like(x)]

    grad = _dy(dys)
    reversed_axes = sorted(a for a, r in selected.items() if r.step < 0 and len(r) > 1)
    if reversed_axes:
        k = len(reversed_axes)
        grad = _slice(ctx, grad, reversed_axes, [-1] * k, [INT64_MIN] * k, [-1] * k)
    current = [len(selected[a]) if a in selected else d for a, d in enumerate(shape)]
    trims: dict[int, int] = {}
    widths: dict[int, tuple[int, int]] = {}
    for axis in sorted(selected):
        r = selected[axis]
        count, stride, low = len(r), abs(r.step), min(r[0], r[-1])
        length = count
        if stride > 1 and count > 1:
            grad = _interleave(ctx, node, grad, axis, current, stride)
            length = count * stride
            current[axis] = length
            span = (count - 1) * stride + 1
            if low + length > int(shape[axis] or 0):
                trims[axis], length = span, span
        widths[axis] = (low, int(shape[axis] or 0) - low - length)
    if trims:
        grad = _slice(ctx, grad, list(trims), [0] * len(trims), list(trims.values()))
    return [_pad(ctx, grad, rank, widths), None, None, None, None]


def _interleave(ctx: GradContext, node: onnx.NodeProto, grad: str, axis: int, current: list[int | None],
                stride: int) -> str:
    """``grad`` with ``stride - 1`` zeros after each element along ``axis`` (length m -> m * stride)."""
    after = current[axis + 1:]
    if any(d is None for d in after):
        raise UnsupportedOpError(node, f"strided slice on axis {axis} followed by dynamic axes {after}")
    rank = len(current)
    grad = ctx.emit("Unsqueeze", [grad, ctx.ints([axis + 1], "axes")])
    grad = _pad(ctx, grad, rank + 1, {axis + 1: (0, stride - 1)})
    target = [0] * axis + [int(current[axis] or 0) * stride] + [int(d or 0) for d in after]
    return ctx.emit("Reshape", [grad, ctx.ints(target, "shape")])


@grad_rule("Pad")
def pad(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # constant: y = x surrounded by a constant, so dx = the centre of dy.
    # reflect/edge: border values are copies of x's elements, so their gradients add onto those elements.
    x = node.input[0]
    rank, shape = ctx.rank(x), ctx.shape(x)
    mode = attributes(node).get("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        raise UnsupportedOpError(node, f"mode {mode!r}; supported modes: constant, reflect, edge")
    if len(node.input) > 2 and node.input[2] and ctx.needs_grad(node.input[2]):
        raise UnsupportedOpError(node, "constant_value depends on the input; it must be a constant")
    pads = [int(p) for p in ctx.require_value(node.input[1], node, "pads").reshape(-1)]
    axes_v = _optional_value(ctx, node, 3, "axes")
    axes = [int(a) % rank for a in axes_v.reshape(-1)] if axes_v is not None else list(range(rank))
    if any(p < 0 for p in pads):
        raise UnsupportedOpError(node, f"negative pads {pads} (cropping)")
    widths = {a: (pads[i], pads[len(axes) + i]) for i, a in enumerate(axes) if pads[i] or pads[len(axes) + i]}
    grad = _dy(dys)
    if mode == "constant":
        if widths:
            grad = _slice(ctx, grad, list(widths), [b for b, _ in widths.values()],
                          [-e if e else INT64_MAX for _, e in widths.values()])
        return [grad, None, None, None]
    for axis, (before, after) in widths.items():
        dim = shape[axis]
        if dim is None:
            raise UnsupportedOpError(node, f"{mode} padding of dynamic axis {axis}")
        if mode == "reflect" and max(before, after) > dim - 1:
            raise UnsupportedOpError(node, f"reflect pads {(before, after)} exceed {dim - 1} on axis {axis}")
        adjoint = _reflect_adjoint if mode == "reflect" else _edge_adjoint
        grad = adjoint(ctx, grad, rank, axis, before, after, dim)
    return [grad, None, None, None]


def _reflect_adjoint(ctx: GradContext, grad: str, rank: int, axis: int, before: int, after: int,
                     dim: int) -> str:
    # y[before - i] = x[i] for i in 1..before and y[before + dim - 1 + i] = x[dim - 1 - i] for i in 1..after
    parts = [_slice(ctx, grad, [axis], [before], [before + dim])]
    if before:
        mirrored = _slice(ctx, grad, [axis], [before - 1], [INT64_MIN], [-1])
        parts.append(_pad(ctx, mirrored, rank, {axis: (1, dim - 1 - before)}))
    if after:
        mirrored = _slice(ctx, grad, [axis], [-1], [before + dim - 1], [-1])
        parts.append(_pad(ctx, mirrored, rank, {axis: (dim - 1 - after, 1)}))
    return parts[0] if len(parts) == 1 else ctx.emit("Sum", parts)


def _edge_adjoint(ctx: GradContext, grad: str, rank: int, axis: int, before: int, after: int,
                  dim: int) -> str:
    # every border element before (after) the data is a copy of x[0] (x[dim - 1])
    parts = [_slice(ctx, grad, [axis], [before], [before + dim])]
    if before:
        border = ctx.emit("ReduceSum", [_slice(ctx, grad, [axis], [0], [before]), ctx.ints([axis], "axes")],
                          keepdims=1)
        parts.append(_pad(ctx, border, rank, {axis: (0, dim - 1)}))
    if after:
        border = ctx.emit("ReduceSum", [_slice(ctx, grad, [axis], [before + dim], [INT64_MAX]),
                                        ctx.ints([axis], "axes")], keepdims=1)
        parts.append(_pad(ctx, border, rank, {axis: (dim - 1, 0)}))
    return parts[0] if len(parts) == 1 else ctx.emit("Sum", parts)


@grad_rule("Gather")
def gather(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = x.take(indices, axis) with constant indices: dx = dy scatter-added at the indices
    # (a zero Pad when the indices are one ascending run, e.g. a channel range).
    x, indices_name = node.input
    shape, rank = ctx.shape(x), ctx.rank(x)
    axis = int(attributes(node).get("axis", 0)) % rank
    dim = shape[axis]
    if dim is None:
        raise UnsupportedOpError(node, f"gathering along dynamic axis {axis}")
    indices = ctx.require_value(indices_name, node, "indices").astype(np.int64)
    flat = np.where(indices < 0, indices + dim, indices).reshape(-1)
    count, after = int(flat.size), shape[axis + 1:]
    grad = _dy(dys)
    if indices.ndim == 0:
        grad = ctx.emit("Unsqueeze", [grad, ctx.ints([axis], "axes")])
    elif indices.ndim > 1:
        if any(d is None for d in after):
            raise UnsupportedOpError(node, f"multi-dimensional indices followed by dynamic axes {after}")
        target = [0] * axis + [count] + [int(d or 0) for d in after]
        grad = ctx.emit("Reshape", [grad, ctx.ints(target, "shape")])
    if count and np.array_equal(flat, np.arange(flat[0], flat[0] + count)):
        return [_pad(ctx, grad, rank, {axis: (int(flat[0]), dim - int(flat[0]) - count)}), None]
    where = ctx.ints(flat.tolist(), "indices")
    where = ctx.emit("Reshape", [where, ctx.ints([1] * axis + [count] + [1] * len(after), "shape")])
    where = ctx.emit("Expand", [where, ctx.emit("Shape", [grad])])
    return [ctx.emit("ScatterElements", [ctx.zeros_like(x), where, grad], axis=axis, reduction="add"), None]
