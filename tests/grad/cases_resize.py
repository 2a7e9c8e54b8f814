"""Cases for Resize: nearest and linear, every coordinate transformation and nearest mode, fixed scales or
sizes, on NCHW (axes 2, 3), NHWC (axes 1, 2) or one axis, up- and down-sampling."""

from __future__ import annotations

import numpy as np
from harness import Case, model_of
from hypothesis import strategies as st
from onnx import helper, numpy_helper

# tf_half_pixel_for_centers left the spec at opset 13 (onnxruntime rejects it at opset 17): the rule raises.
COORDINATES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


def resize(draw) -> Case:
    layout = draw(st.sampled_from(["nchw", "nhwc", "last_axis", "h_only"]))
    c = draw(st.integers(1, 2))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    shape, axes = {
        "nchw": ((1, c, h, w), (2, 3)),
        "nhwc": ((1, h, w, c), (1, 2)),
        "last_axis": ((1, c, h, w), (3,)),
        "h_only": ((1, c, h, w), (2,)),
    }[layout]
    mode = draw(st.sampled_from(["nearest", "linear"]))
    attrs: dict = {"mode": mode, "coordinate_transformation_mode": draw(st.sampled_from(COORDINATES))}
    if mode == "nearest":
        attrs["nearest_mode"] = draw(st.sampled_from(NEAREST))
    factors = [1.0] * len(shape)
    for a in axes:
        # dyadic factors: the rule follows onnxruntime's float32 coordinates, onnx's reference float64
        factors[a] = draw(st.sampled_from([0.5, 0.75, 1.25, 1.5, 2.0, 2.5, 3.0]))
    if any(int(np.floor(n * f)) == 0 for n, f in zip(shape, factors, strict=True)):
        factors = [max(f, 1.0) for f in factors]
    sizes = np.array([int(np.floor(n * f)) for n, f in zip(shape, factors, strict=True)], dtype=np.int64)
    # align_corners and pytorch_half_pixel (for an output length of 1) read the integer output length,
    # onnx's reference in * scale: give them sizes; so too when no dim changes (onnxruntime then copies
    # the input, onnx's reference still resamples)
    coordinates = attrs["coordinate_transformation_mode"]
    use_sizes = (
        draw(st.booleans())
        or coordinates == "align_corners"
        or (coordinates == "pytorch_half_pixel" and 1 in sizes[list(axes)])
        or tuple(sizes) == shape
    )

    def build(dt):
        # scales stay float32 whatever the data type (one_node would cast them)
        inputs = ["x", "", "", "sizes"] if use_sizes else ["x", "", "scales"]
        init = [
            numpy_helper.from_array(sizes, "sizes")
            if use_sizes
            else numpy_helper.from_array(np.array(factors, dtype=np.float32), "scales")
        ]
        return model_of([helper.make_node("Resize", inputs, ["y0"], **attrs)], dt, shape, ["y0"], init)

    # the rule uses onnxruntime's float32 weights (1/3 is 0.33333334): allow their rounding
    return Case(build, shape, atol=1e-5)


CASES = {"Resize": [resize]}
