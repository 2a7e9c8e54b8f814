"""Convolutions: the input-gradient of each is the other, run with the same weight initializer.

For ``y = Conv(x, W)`` with ``W`` of shape ``[C_out, C_in/g, k...]``, ``dx = ConvTranspose(dy, W)``:
ConvTranspose reads its weight as ``[C_in', C_out'/g, k...]`` with ``C_in' = C_out`` (the channels of
``dy``), which is the same array seen from the other side, so no weight is copied or transposed.
Symmetrically, ``y = ConvTranspose(x, W)`` has ``dx = Conv(dy, W)``. Weights and biases get no gradient.

Geometry along one spatial axis (``s`` stride, ``d`` dilation, ``k`` kernel, ``dk = (k-1) d + 1``):
the conv output ``o`` reads inputs ``o s - p_begin + i d``. Its transpose writes the same positions, so
the gradient is a ConvTranspose with the same ``p_begin``; its length is set to the input's exactly by
cropping (end pads) or extending with zeros (``output_padding``): inputs no window reads get zero.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        raise UnsupportedOpError(node, f"kernel_shape {attrs['kernel_shape']} differs from the weight's {kernel}")
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
    x, y = node.input[0], node.output[0]
    x_dims, y_dims = spatial_dims(ctx, x, node), spatial_dims(ctx, y, node)
    begin, _ = forward_pads(node, attrs, x_dims, y_dims, kernel, strides, dilations)
    geometry = transpose_geometry(x_dims, y_dims, kernel, strides, dilations, begin)
    dx = ctx.emit("ConvTranspose", [dys[0], node.input[1]], group=int(attrs.get("group", 1)),
                  kernel_shape=list(kernel), strides=strides, dilations=dilations, **geometry)
    return [dx]


@grad_rule("ConvTranspose")
def conv_transpose(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    # y = ConvTranspose(x, W) is the adjoint of Conv(., W) => dx = Conv(dy, W) with the forward's pads
    attrs, kernel, strides, dilations = _common(ctx, node)
    x, y = node.input[0], node.output[0]
    x_dims, y_dims = spatial_dims(ctx, x, node), spatial_dims(ctx, y, node)
    rank = len(kernel)
    output_padding = list(attrs.get("output_padding", [0] * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if any(p >= max(s, d) for p, s, d in zip(output_padding, strides, dilations, strict=True)):
        raise UnsupportedOpError(node, f"output_padding {output_padding} must be below the strides {strides}")
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # pads are derived from the output size: total = s (x - 1) + output_padding + dk - y, split as the
        # ONNX spec says (SAME_UPPER puts the smaller half first, otherwise the larger half)
        begin = []
        for xd, yd, k, s, d, op in zip(x_dims, y_dims, kernel, strides, dilations, output_padding, strict=True):
            total = s * (xd - 1) + op + (k - 1) * d + 1 - yd
            if total < 0:
                raise UnsupportedOpError(node, f"output_shape {list(y_dims)} needs negative pads")
            if total % 2:
                # onnx and onnxruntime disagree on which side gets the odd pixel
                raise UnsupportedOpError(node, f"ambiguous odd total padding {total} from output_shape/auto_pad")
            begin.append(total // 2)
    elif auto_pad == "VALID":
        begin = [0] * rank
    elif auto_pad == "NOTSET":
        begin = list(attrs.get("pads", [0] * 2 * rank))[:rank]
    else:
        raise UnsupportedOpError(node, f"unknown auto_pad {auto_pad!r}")
    # Conv(dy) over the padded y reads exactly the windows ConvTranspose wrote; its length
    # floor((y + p_b + p_e - dk) / s) + 1 is x for p_e = s (x - 1) + dk - y - p_b (or 0, then the
    # remainder is output_padding < s).
    end = [max(s * (xd - 1) + (k - 1) * d + 1 - yd - b, 0)
           for xd, yd, k, s, d, b in zip(x_dims, y_dims, kernel, strides, dilations, begin, strict=True)]
    dx = ctx.emit("Conv", [dys[0], node.input[1]], group=int(attrs.get("group", 1)), kernel_shape=list(kernel),
                  strides=strides, dilations=dilations, pads=[*begin, *end])
    return [dx]
