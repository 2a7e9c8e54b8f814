"""Convolutions: the input-gradient of each is the other, run with the same weight initializer.

For ``y = Conv(x, W)`` with ``W`` of shape ``[C_out, C_in/g, k...]``, ``dx = ConvTranspose(dy, W)``:
ConvTranspose reads its weight as ``[C_in', C_out'/g, k...]`` with ``C_in' = C_out`` (the channels of
``dy``), which is the same array seen from the other side, so no weight is copied or transposed.
Symmetrically, ``y = ConvTranspose(x, W)`` has ``dx = Conv(dy, W)``. Weights and biases get no gradient.

Geometry along one spatial axis (``s`` stride, ``d`` dilation, ``k`` kernel, ``dk = (k-1) d + 1``):
the conv output ``o`` reads inputs ``o s - p_begin + i d``. Its transpose writes the same positions, so
the gradient is a ConvTranspose with the same ``p_begin``; its length is set to the input's exactly by
cropping (end pads) or extending with zeros (``output_padding``): inputs no window reads get zero.

Two Conv cases take a faster route in onnxruntime: a pointwise (1x1, stride 1) conv becomes a Conv with
the transposed weight, and a depthwise conv a depthwise Conv with the flipped weight over dy spread out
by the stride (its grouped ConvTranspose is 3-9x slower than a depthwise Conv). A dense stride-1
ConvTranspose is left to the layout pass (``converters/grad/ort_layout.py``), which makes it a Conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from uncnn_rt.converters.grad.registry import GradContext, UnsupportedOpError, attributes, grad_rule

Grads = list[str | None]


def spatial_dims(ctx: GradContext, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
    """The static spatial dims (all but N and C) of ``name``; a dynamic one is an error."""
    dims = ctx.shape(name)[2:]
    if any(d is None for d in dims):
        raise UnsupportedOpError(node, f"tensor {name!r} has dynamic spatial dims {ctx.shape(name)}")
    return tuple(int(d) for d in dims if d is not None)


def forward_pads(
    node: onnx.NodeProto,
    attrs: dict,
    x_dims: Sequence[int],
    y_dims: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[list[int], list[int]]:
    """``(begin, end)`` pads the forward Conv/pool applied, resolving ``auto_pad`` from static shapes."""
    rank = len(x_dims)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = list(attrs.get("pads", [0] * 2 * rank))
        return pads[:rank], pads[rank:]
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for x, y, k, s, d in zip(x_dims, y_dims, kernel, strides, dilations, strict=True):
            total = max((y - 1) * s + (k - 1) * d + 1 - x, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin, end
    raise UnsupportedOpError(node, f"unknown auto_pad {auto_pad!r}")


def transpose_geometry(
    x_dims: Sequence[int],
    y_dims: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    begin: Sequence[int],
) -> dict[str, list[int]]:
    """Pads and output_padding of the ConvTranspose that scatters ``y_dims`` windows back onto ``x_dims``.

    The full transposed output has ``s (y - 1) + dk`` positions starting at input position ``-p_begin``;
    the end is cropped (end pad) or zero-extended (output_padding) so exactly ``x`` positions remain.
    """
    end, output_padding = [], []
    for x, y, k, s, d, b in zip(x_dims, y_dims, kernel, strides, dilations, begin, strict=True):
        surplus = s * (y - 1) + (k - 1) * d + 1 - b - x
        end.append(max(surplus, 0))
        output_padding.append(max(-surplus, 0))
    geometry = {"pads": [*begin, *end]}
    if any(output_padding):
        geometry["output_padding"] = output_padding
    return geometry


def _no_weight_grads(ctx: GradContext, node: onnx.NodeProto) -> None:
    for name in node.input[1:]:
        if name and ctx.needs_grad(name):
            raise UnsupportedOpError(
                node, f"weight/bias {name!r} depends on the input; gradients flow only to the data input"
            )


def _common(ctx: GradContext, node: onnx.NodeProto) -> tuple[dict, tuple[int, ...], list[int], list[int]]:
    """Attributes, kernel shape, strides and dilations shared by Conv and ConvTranspose."""
    _no_weight_grads(ctx, node)
    attrs = attributes(node)
    w_shape = ctx.static_shape(node.input[1], node)
    kernel = w_shape[2:]
    if list(attrs.get("kernel_shape", kernel)) != list(kernel):
        raise UnsupportedOpError(node, f"kernel_shape {attrs['kernel_shape']} is not the weight's {kernel}")
    rank = len(kernel)
    if rank not in (1, 2, 3):
        raise UnsupportedOpError(node, f"only 1-D, 2-D and 3-D convolutions are supported, got {rank}-D")
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    return attrs, kernel, strides, dilations


@grad_rule("Conv")
def conv(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y[o] = sum_i W[i] x[o s - p + i d]  =>  dx = ConvTranspose(dy, W), same strides/dilations/groups
    attrs, kernel, strides, dilations = _common(ctx, node)
    x, y, w = node.input[0], node.output[0], node.input[1]
    x_dims, y_dims = spatial_dims(ctx, x, node), spatial_dims(ctx, y, node)
    begin, end = forward_pads(node, attrs, x_dims, y_dims, kernel, strides, dilations)
    group = int(attrs.get("group", 1))
    if group == 1 and set(kernel) == {1} and set(strides) == {1} and not any(begin) and not any(end):
        # pointwise: dx = W^T dy over the channels. A Conv with the transposed weight (a Transpose of the
        # same initializer, folded once by onnxruntime) runs 5-20% faster than the 1x1 ConvTranspose.
        transposed = ctx.emit("Transpose", [w], perm=[1, 0, *range(2, 2 + len(kernel))])
        return [ctx.emit("Conv", [dys[0], transposed], kernel_shape=list(kernel))]
    weight = ctx.value(w)
    if group > 1 and group == ctx.shape(x)[1] and weight is not None:
        # depthwise: onnxruntime's grouped ConvTranspose runs 3-9x slower than its depthwise Conv
        dx = depthwise_gradient(ctx, dys[0], weight, x_dims, y_dims, strides, dilations, begin, group, like=w)
        if dx is not None:
            return [dx]
    geometry = transpose_geometry(x_dims, y_dims, kernel, strides, dilations, begin)
    dx = ctx.emit(
        "ConvTranspose",
        [dys[0], w],
        group=group,
        kernel_shape=list(kernel),
        strides=strides,
        dilations=dilations,
        **geometry,
    )
    return [dx]


def depthwise_gradient(
    ctx: GradContext,
    dy: str,
    weight: np.ndarray,
    x_dims: Sequence[int],
    y_dims: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    begin: Sequence[int],
    group: int,
    *,
    like: str,
) -> str | None:
    """dx as a stride-1 Conv: with ``u`` = dy spread out by the stride (zeros between), dx[j] =
    sum_i W[i] u[j + p_b - i d] = sum_i' flip(W)[i'] u[j - p_b' + i' d], p_b' = dk - 1 - p_b. The weight,
    read per group as [C_out/g, C_in/g], is transposed within its group and flipped in space (a small
    constant for a depthwise conv). None when a pad exceeds the kernel span (p_b' or p_e' < 0)."""
    rank = len(x_dims)
    c_out, c_in_g, *kernel = weight.shape
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    new_begin = [span - 1 - b for span, b in zip(spans, begin, strict=True)]
    # length of u is (y - 1) s + 1; the end pad makes the conv output exactly x long
    new_end = [
        x - (y - 1) * s - 1 - nb + span - 1
        for x, y, s, nb, span in zip(x_dims, y_dims, strides, new_begin, spans, strict=True)
    ]
    if min(new_begin) < 0 or min(new_end) < 0:
        return None
    flipped = weight.reshape(group, c_out // group, c_in_g, *kernel).swapaxes(1, 2)
    flipped = flipped.reshape(group * c_in_g, c_out // group, *kernel)
    flipped = np.flip(flipped, axis=tuple(range(2, 2 + rank)))
    if any(s > 1 for s in strides):
        # spread dy: nearest-upsample by the strides and keep every s-th value (Pad is far slower in
        # onnxruntime); the s - 1 trailing zeros count against the end pad, or are sliced off
        spread = [y * s for y, s in zip(y_dims, strides, strict=True)]
        scales = ctx.const([1.0, 1.0, *[float(s) for s in strides]], hint="scales")
        dy = ctx.emit(
            "Resize",
            [dy, "", scales],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        )
        keep = np.zeros(spread)
        keep[tuple(slice(None, None, s) for s in strides)] = 1.0
        dy = ctx.emit("Mul", [dy, ctx.const(keep, like=like, hint="stride_mask")])
        new_end = [e - (s - 1) for e, s in zip(new_end, strides, strict=True)]
        if min(new_end) < 0:
            lengths = [n + min(e, 0) for n, e in zip(spread, new_end, strict=True)]
            axes = ctx.ints(list(range(2, 2 + rank)))
            dy = ctx.emit("Slice", [dy, ctx.ints([0] * rank), ctx.ints(lengths), axes])
            new_end = [max(e, 0) for e in new_end]
    return ctx.emit(
        "Conv",
        [dy, ctx.const(np.ascontiguousarray(flipped), like=like, hint="flipped_weight")],
        group=group,
        kernel_shape=list(kernel),
        dilations=list(dilations),
        pads=[*new_begin, *new_end],
    )


@grad_rule("ConvTranspose")
def conv_transpose(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = ConvTranspose(x, W) is the adjoint of Conv(., W) => dx = Conv(dy, W) with the forward's pads
    attrs, kernel, strides, dilations = _common(ctx, node)
    x, y = node.input[0], node.output[0]
    rank = len(kernel)
    x_dims = spatial_dims(ctx, x, node)
    # onnx's shape inference drops dims of y when output_shape is below the input size: trust the attribute
    y_dims = tuple(attrs["output_shape"][-rank:]) if "output_shape" in attrs else spatial_dims(ctx, y, node)
    output_padding = list(attrs.get("output_padding", [0] * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if any(p >= s for p, s in zip(output_padding, strides, strict=True)):
        raise UnsupportedOpError(node, f"output_padding {output_padding} must be below the strides {strides}")
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # pads come from the output size: total = s (x - 1) + output_padding + dk - y, split as the spec
        # (and onnxruntime) do: SAME_UPPER puts the smaller half first, otherwise the larger half
        begin = []
        for i, (xd, yd, k, s, d) in enumerate(zip(x_dims, y_dims, kernel, strides, dilations, strict=True)):
            total = s * (xd - 1) + output_padding[i] + (k - 1) * d + 1 - yd
            if total < 0:
                raise UnsupportedOpError(node, f"output size {list(y_dims)} would need negative pads")
            begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    elif auto_pad == "VALID":
        begin = [0] * rank
    elif auto_pad == "NOTSET":
        begin = list(attrs.get("pads", [0] * 2 * rank))[:rank]
    else:
        raise UnsupportedOpError(node, f"unknown auto_pad {auto_pad!r}")
    # Conv(dy) over the padded y reads exactly the windows ConvTranspose wrote; its length
    # floor((y + p_b + p_e - dk) / s) + 1 is x for p_e = s (x - 1) + dk - y - p_b, or for p_e = 0 when
    # that is negative (output_padding < s added those positions)
    end = [
        max(s * (xd - 1) + (k - 1) * d + 1 - yd - b, 0)
        for xd, yd, k, s, d, b in zip(x_dims, y_dims, kernel, strides, dilations, begin, strict=True)
    ]
    dx = ctx.emit(
        "Conv",
        [dys[0], node.input[1]],
        group=int(attrs.get("group", 1)),
        kernel_shape=list(kernel),
        strides=strides,
        dilations=dilations,
        pads=[*begin, *end],
    )
    return [dx]
