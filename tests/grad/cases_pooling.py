"""Cases for the pools: kernels, strides, dilations, asymmetric pads, auto_pad, ceil_mode,
count_include_pad."""

from __future__ import annotations

import numpy as np
from harness import Case, model_of, one_node
from hypothesis import strategies as st
from onnx import helper, numpy_helper


def _window(draw, rank: int, *, dilated: bool) -> dict:
    """Pool attributes; explicit pads stay below the kernel (the ONNX rule) and ceil_mode strides <= 2
    (onnx's reference shifts windows when ceil_mode overruns the input by 2 or more)."""
    kernel = [draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    attrs: dict = {"kernel_shape": kernel, "strides": strides}
    if dilated:
        attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(rank)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    if auto_pad == "NOTSET":
        # a dilated window could otherwise lie wholly in the padding (implementations disagree there)
        limits = [k - 1 if attrs.get("dilations", [1] * rank)[i] == 1 else 0 for i, k in enumerate(kernel)]
        attrs["pads"] = [draw(st.integers(0, m)) for m in limits] + [draw(st.integers(0, m)) for m in limits]
        attrs["ceil_mode"] = draw(st.integers(0, 1))
    else:
        attrs["auto_pad"] = auto_pad
        if auto_pad != "VALID":
            # SAME pads turn negative for strides above the kernel in onnx's reference
            attrs["strides"] = [min(s, k) for s, k in zip(strides, kernel, strict=True)]
            if "dilations" in attrs:
                attrs["dilations"] = [1] * rank
    return attrs


def _shape(draw, attrs: dict, rank: int, channels: int, max_side: int) -> tuple[int, ...]:
    pads = attrs.get("pads", [0] * 2 * rank)
    dilations = attrs.get("dilations", [1] * rank)
    sides = []
    for i, (k, d) in enumerate(zip(attrs["kernel_shape"], dilations, strict=True)):
        span = (k - 1) * d + 1
        sides.append(draw(st.integers(max(span - pads[i] - pads[rank + i], 1), max(span, max_side))))
    return (1, channels, *sides)


def _last_window_dropped(attrs: dict, shape: tuple[int, ...]) -> bool:
    """ceil_mode drops a last window that would start past the input and its begin pad; onnx's shape
    inference does not, so it declares one output position more than onnxruntime produces."""
    if not attrs.get("ceil_mode"):
        return False
    rank = len(shape) - 2
    pads, dilations = attrs["pads"], attrs.get("dilations", [1] * rank)
    for i, (x, k, s, d) in enumerate(
        zip(shape[2:], attrs["kernel_shape"], attrs["strides"], dilations, strict=True)
    ):
        y = -(-(x + pads[i] + pads[rank + i] - (k - 1) * d - 1) // s) + 1
        if (y - 1) * s >= x + pads[i]:
            return True
    return False


def _pool_model(op: str, attrs: dict, shape: tuple[int, ...], n_outputs: int = 1):
    if not _last_window_dropped(attrs, shape):
        return lambda dt: one_node(op, dt, shape, n_outputs=n_outputs, **attrs)

    def build(dt):
        # the harness weights outputs by arrays of their inferred shape, which is wrong here: sum first
        outs = ["p", "i"][:n_outputs]
        nodes = [
            helper.make_node(op, ["x"], outs, **attrs),
            helper.make_node("ReduceSum", ["p", "all"], ["y0"], keepdims=0),
        ]
        axes = numpy_helper.from_array(np.arange(len(shape), dtype=np.int64), "all")
        return model_of(nodes, dt, shape, ["y0"], [axes])

    return build


def max_pool(rank: int, max_side: int):
    def case(draw) -> Case:
        attrs = _window(draw, rank, dilated=True)
        shape = _shape(draw, attrs, rank, draw(st.integers(1, 3)), max_side)
        # with the Indices output already present in the forward graph, or added by the rule
        n_outputs = draw(st.integers(1, 2))
        return Case(_pool_model("MaxPool", attrs, shape, n_outputs), shape)

    case.__name__ = f"max_pool{rank}d"
    return case


def average_pool(rank: int, max_side: int):
    def case(draw) -> Case:
        attrs = _window(draw, rank, dilated=False)
        attrs["count_include_pad"] = draw(st.integers(0, 1))
        shape = _shape(draw, attrs, rank, draw(st.integers(1, 3)), max_side)
        return Case(_pool_model("AveragePool", attrs, shape), shape)

    case.__name__ = f"average_pool{rank}d"
    return case


def global_pool(op: str, ranks: tuple[int, ...]):
    def case(draw) -> Case:
        rank = draw(st.sampled_from(ranks))
        shape = (
            draw(st.integers(1, 2)),
            draw(st.integers(1, 3)),
            *[draw(st.integers(1, 5)) for _ in range(rank)],
        )
        return Case(lambda dt: one_node(op, dt, shape), shape)

    case.__name__ = f"{op.lower()}_{'_'.join(map(str, ranks))}d"
    return case


CASES = {
    "MaxPool": [max_pool(2, 7), max_pool(1, 9)],
    "AveragePool": [average_pool(2, 7), average_pool(1, 9)],
    # onnx's reference GlobalMaxPool reduces the wrong axes unless there are exactly two spatial axes
    "GlobalMaxPool": [global_pool("GlobalMaxPool", (2,))],
    "GlobalAveragePool": [global_pool("GlobalAveragePool", (1, 2))],
}
