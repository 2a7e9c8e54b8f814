"""Cases for Conv and ConvTranspose: groups (single, grouped, depthwise), strides, dilations, pads,
auto_pad, output_padding, output_shape."""

from __future__ import annotations

import numpy as np
from harness import Case, one_node
from hypothesis import strategies as st


def _channels(draw) -> tuple[int, int, int]:
    """(C_in, C_out, group) for a plain, a grouped or a depthwise convolution."""
    kind = draw(st.sampled_from(["single", "grouped", "depthwise"]))
    if kind == "single":
        return draw(st.integers(1, 3)), draw(st.integers(1, 3)), 1
    if kind == "grouped":
        return 4, draw(st.sampled_from([2, 4])), 2
    c = draw(st.integers(2, 3))
    return c, c * draw(st.integers(1, 2)), c


def _spatial(draw, rank: int, max_kernel: int = 3):
    kernel = [draw(st.integers(1, max_kernel)) for _ in range(rank)]
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    return kernel, strides, dilations


def _conv(rank: int, max_side: int, max_kernel: int = 3):
    def case(draw) -> Case:
        c_in, c_out, group = _channels(draw)
        kernel, strides, dilations = _spatial(draw, rank, max_kernel)
        auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
        attrs: dict = {"group": group, "strides": strides, "dilations": dilations, "kernel_shape": kernel}
        pads = [draw(st.integers(0, 2)) for _ in range(2 * rank)] if auto_pad == "NOTSET" else [0] * 2 * rank
        if auto_pad == "NOTSET":
            attrs["pads"] = pads
        else:
            attrs["auto_pad"] = auto_pad
        if auto_pad.startswith("SAME"):
            dilations = attrs["dilations"] = [1] * rank  # onnxruntime rejects dilated SAME convolutions
        span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
        sides = [
            draw(st.integers(max(s - pads[i] - pads[rank + i], 1), max(s, max_side)))
            for i, s in enumerate(span)
        ]
        shape = (1, c_in, *sides)
        rng = np.random.default_rng(c_in * 10 + c_out)
        weight = rng.standard_normal((c_out, c_in // group, *kernel))
        inputs: list = ["x", weight]
        if draw(st.booleans()):
            inputs.append(rng.standard_normal(c_out))
        return Case(lambda dt: one_node("Conv", dt, shape, inputs=inputs, **attrs), shape)

    case.__name__ = f"conv{rank}d"
    return case


def conv_transpose(draw) -> Case:
    c_in, c_out, group = _channels(draw)
    kernel, strides, dilations = _spatial(draw, 2)
    sides = [draw(st.integers(1, 4)) for _ in range(2)]
    attrs: dict = {"group": group, "strides": strides, "dilations": dilations}
    variant = draw(st.sampled_from(["pads", "pads", "output_shape", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    full = [
        s * (x - 1) + (k - 1) * d + 1 for x, k, s, d in zip(sides, kernel, strides, dilations, strict=True)
    ]
    if variant == "pads":
        # pads crop the full output; output_padding (< stride) extends it
        begin = [draw(st.integers(0, (f - 1) // 2)) for f in full]
        attrs["pads"] = begin + [draw(st.integers(0, (f - 1) // 2)) for f in full]
        attrs["output_padding"] = [draw(st.integers(0, s - 1)) for s in strides]
    elif variant == "output_shape":
        # onnx's reference ignores output_shape when deriving pads, so only the uncropped size can be checked
        attrs["output_shape"] = full
    elif variant == "VALID":
        attrs["auto_pad"] = "VALID"
    else:
        # SAME: the output is x * stride, unless that needs negative pads (onnxruntime and onnx's
        # reference then disagree on the output size)
        attrs["auto_pad"] = variant
        if any(f < x * s for f, x, s in zip(full, sides, strides, strict=True)):
            attrs["auto_pad"] = "VALID"
    shape = (1, c_in, *sides)
    rng = np.random.default_rng(c_in * 10 + c_out)
    # ConvTranspose weight: [C_in, C_out / group, k...]
    weight = rng.standard_normal((c_in, c_out // group, *kernel))
    inputs: list = ["x", weight]
    if draw(st.booleans()):
        inputs.append(rng.standard_normal(c_out))
    return Case(lambda dt: one_node("ConvTranspose", dt, shape, inputs=inputs, **attrs), shape)


def conv_transpose_1d(draw) -> Case:
    c_in, c_out, group = _channels(draw)
    kernel, strides, dilations = _spatial(draw, 1)
    shape = (1, c_in, draw(st.integers(1, 5)))
    weight = np.random.default_rng(3).standard_normal((c_in, c_out // group, *kernel))
    attrs = {
        "group": group,
        "strides": strides,
        "dilations": dilations,
        "pads": [0, 1 if kernel[0] > 1 else 0],
    }
    return Case(lambda dt: one_node("ConvTranspose", dt, shape, inputs=["x", weight], **attrs), shape)


CASES = {
    "Conv": [_conv(2, 6), _conv(1, 9), _conv(3, 3, max_kernel=2)],
    "ConvTranspose": [conv_transpose, conv_transpose_1d],
}
