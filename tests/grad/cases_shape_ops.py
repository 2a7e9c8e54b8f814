"""Cases for the data-movement rules: reshapes, transposes, concat/split, slice, pad, gather, casts."""

from __future__ import annotations

import math

import numpy as np
from harness import Case, model_of, one_node, tensor_type
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)

shapes = st.lists(st.integers(1, 3), min_size=1, max_size=4).map(tuple)


def _ints(values) -> np.ndarray:
    return np.array(list(values), dtype=np.int64)


def _variant(make, value, name: str):
    """A case function with one discrete choice fixed, so every variant is tested on every run."""

    def case(draw) -> Case:
        return make(draw, value)

    case.__name__ = name
    return case


def identity_case(draw) -> Case:
    shape = draw(shapes)
    return Case(lambda dt: one_node("Identity", dt, shape), shape)


def reshape_case(draw) -> Case:
    shape = draw(shapes)
    total = math.prod(shape)
    allowzero = draw(st.sampled_from([0, 1]))
    divisor = draw(st.sampled_from([d for d in range(1, total + 1) if total % d == 0]))
    target = draw(st.sampled_from([[-1], [0, -1], [divisor, total // divisor], [1, divisor, -1], [total, 1]]))
    if allowzero:  # with allowzero=1 a 0 means an empty dimension, not "copy"
        target = [shape[0] if t == 0 else t for t in target]
    inputs = ["x", _ints(target)]
    return Case(lambda dt: one_node("Reshape", dt, shape, inputs=inputs, allowzero=allowzero), shape)


def reshape_from_shape_case(draw) -> Case:
    """The target shape is computed from Shape(x) (Shape -> Gather -> Concat), as exporters write it."""
    shape = draw(st.lists(st.integers(1, 3), min_size=2, max_size=4).map(tuple))

    def build(dt):
        nodes = [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Concat", ["n", "minus_one"], ["target"], axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y0"]),
        ]
        inits = [
            numpy_helper.from_array(_ints([0]), "zero"),
            numpy_helper.from_array(_ints([-1]), "minus_one"),
        ]
        return model_of(nodes, dt, shape, ["y0"], inits)

    return Case(build, shape)


def flatten_case(draw) -> Case:
    shape = draw(shapes)
    axis = draw(st.integers(-len(shape), len(shape)))
    return Case(lambda dt: one_node("Flatten", dt, shape, axis=axis), shape)


def transpose_case(draw, default_perm: bool) -> Case:
    shape = draw(shapes)
    attrs = {} if default_perm else {"perm": list(draw(st.permutations(range(len(shape)))))}
    return Case(lambda dt: one_node("Transpose", dt, shape, **attrs), shape)


def concat_case(draw) -> Case:
    """Concat of x, Sigmoid(x) and constants in any order: only some inputs need a gradient."""
    shape = draw(shapes)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    kinds = draw(st.lists(st.sampled_from(["x", "sigmoid", "const"]), min_size=2, max_size=4))
    if all(k == "const" for k in kinds):
        kinds[0] = "x"
    const_sizes = [draw(st.integers(1, 3)) for _ in kinds]

    def build(dt):
        nodes, names, inits = [helper.make_node("Sigmoid", ["x"], ["s"])], [], []
        for i, kind in enumerate(kinds):
            if kind == "const":
                c_shape = list(shape)
                c_shape[axis] = const_sizes[i]
                value = np.random.default_rng(i).uniform(-1, 1, c_shape).astype(dt)
                inits.append(numpy_helper.from_array(value, f"c{i}"))
                names.append(f"c{i}")
            else:
                names.append("x" if kind == "x" else "s")
        nodes.append(helper.make_node("Concat", names, ["y0"], axis=axis))
        return model_of(nodes, dt, shape, ["y0"], inits)

    return Case(build, shape)


def split_case(draw, by_sizes: bool) -> Case:
    """Split by a sizes input or into equal parts; outputs left unused get zero gradients."""
    shape = list(draw(shapes))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    shape[axis] = dim = draw(st.integers(2, 6))
    if by_sizes:
        cuts = sorted(draw(st.sets(st.integers(1, dim - 1), min_size=1, max_size=2)))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, dim], strict=True)]
        inputs: list = ["x", _ints(sizes)]
        n = len(sizes)
    else:
        n = draw(st.sampled_from([d for d in range(2, dim + 1) if dim % d == 0]))
        inputs = ["x"]
    used = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1)))
    x_shape = tuple(shape)

    def build(dt):
        model = one_node("Split", dt, x_shape, inputs=inputs, n_outputs=n, axis=axis)
        keep = [o for o in model.graph.output if int(o.name[1:]) in used]
        del model.graph.output[:]
        model.graph.output.extend(keep)
        return model

    return Case(build, x_shape)


@st.composite
def _axis_slice(draw, dim: int, steps: list[int]) -> tuple[int, int, int]:
    """start, end, step selecting at least one element; starts and ends reach past the axis."""
    step = draw(st.sampled_from(steps))
    bounds = st.integers(-dim - 2, dim + 2) | st.sampled_from([INT64_MAX, INT64_MIN])
    # onnx's reference (numpy) and the ONNX spec disagree on a negative step's start below -dim
    starts = st.integers(-dim, dim + 2) | st.just(INT64_MAX) if step < 0 else bounds
    start, end = draw(st.tuples(starts, bounds).filter(lambda se: len(range(dim)[se[0] : se[1] : step]) > 0))
    return start, end, step


def slice_case(draw, steps: list[int]) -> Case:
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple))
    rank = len(shape)
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    parts = [draw(_axis_slice(shape[a], steps)) for a in axes]
    starts, ends, steps = ([p[i] for p in parts] for i in range(3))
    axes_in = [a - rank if draw(st.booleans()) else a for a in axes]
    inputs: list = ["x", _ints(starts), _ints(ends)]
    if axes != list(range(len(axes))) or any(s != 1 for s in steps) or draw(st.booleans()):
        inputs.append(_ints(axes_in))
        if any(s != 1 for s in steps) or draw(st.booleans()):
            inputs.append(_ints(steps))
    return Case(lambda dt: one_node("Slice", dt, shape, inputs=inputs), shape)


def squeeze_case(draw) -> Case:
    shape = list(draw(shapes))
    for _ in range(draw(st.integers(1, 2))):
        shape.insert(draw(st.integers(0, len(shape))), 1)
    ones = [i for i, d in enumerate(shape) if d == 1]
    axes = draw(st.none() | st.lists(st.sampled_from(ones), min_size=1, unique=True))
    inputs: list = ["x"] if axes is None else ["x", _ints(a - len(shape) if a % 2 else a for a in axes)]
    x_shape = tuple(shape)
    return Case(lambda dt: one_node("Squeeze", dt, x_shape, inputs=inputs), x_shape)


def unsqueeze_case(draw) -> Case:
    shape = draw(shapes)
    out_rank = len(shape) + draw(st.integers(1, 2))
    positions = draw(
        st.lists(
            st.integers(0, out_rank - 1),
            min_size=out_rank - len(shape),
            max_size=out_rank - len(shape),
            unique=True,
        )
    )
    axes = [p - out_rank if draw(st.booleans()) else p for p in positions]
    return Case(lambda dt: one_node("Unsqueeze", dt, shape, inputs=["x", _ints(axes)]), shape)


def dropout_case(draw, variant: str) -> Case:
    shape = draw(shapes)
    inputs: list = {
        "plain": ["x"],
        "ratio": ["x", np.array(0.3)],
        "ratio_training_false": ["x", np.array(0.5), np.array(False)],
        "training_false_only": ["x", "", np.array(False)],
    }[variant]
    n_outputs = draw(st.sampled_from([1, 2]))  # 2: the boolean mask is requested too
    return Case(lambda dt: one_node("Dropout", dt, shape, inputs=inputs, n_outputs=n_outputs), shape)


def cast_case(draw) -> Case:
    """float64 models cast to themselves; float32 models go through float64 and back (run on onnxruntime,
    checked against the float64 gradient)."""
    shape = draw(shapes)

    def build(dt):
        own = tensor_type(dt)
        wide = TensorProto.DOUBLE
        nodes = [
            helper.make_node("Cast", ["x"], ["w"], to=wide),
            helper.make_node("Tanh", ["w"], ["t"]),
            helper.make_node("Cast", ["t"], ["y0"], to=own),
            helper.make_node("Cast", ["x"], ["y1"], to=own),
        ]
        return model_of(nodes, dt, shape, ["y0", "y1"])

    return Case(build, shape)


def pad_case(mode: str):
    def case(draw) -> Case:
        shape = draw(shapes)
        limit = (lambda d: min(2, d - 1)) if mode == "reflect" else (lambda d: 2)
        widths = [(draw(st.integers(0, limit(d))), draw(st.integers(0, limit(d)))) for d in shape]
        pads = _ints([b for b, _ in widths] + [e for _, e in widths])
        inputs: list = ["x", pads]
        if mode == "constant" and draw(st.booleans()):
            inputs.append(np.array(draw(st.sampled_from([0.0, 1.5, -3.0]))))
        attrs = {} if mode == "constant" and draw(st.booleans()) else {"mode": mode}
        return Case(lambda dt: one_node("Pad", dt, shape, inputs=inputs, **attrs), shape)

    case.__name__ = f"pad_{mode}"
    return case


def gather_case(draw, kind: str) -> Case:
    shape = list(draw(shapes))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    shape[axis] = dim = draw(st.integers(2, 5))
    index = st.integers(-dim, dim - 1)
    if kind == "scalar":
        indices = np.array(draw(index), dtype=np.int64)
    elif kind == "range":
        start = draw(st.integers(0, dim - 1))
        indices = np.arange(start, draw(st.integers(start + 1, dim)), dtype=np.int64)
    elif kind == "any":  # duplicates and negative indices: gradients add up
        indices = _ints(draw(st.lists(index, min_size=1, max_size=4)))
    else:
        indices = np.array(draw(st.lists(index, min_size=4, max_size=4)), dtype=np.int64).reshape(2, 2)
    x_shape = tuple(shape)
    return Case(lambda dt: one_node("Gather", dt, x_shape, inputs=["x", indices], axis=axis), x_shape)


CASES = {
    "Identity": [identity_case],
    "Reshape": [reshape_case, reshape_from_shape_case],
    "Flatten": [flatten_case],
    "Transpose": [
        _variant(transpose_case, True, "transpose_default_perm"),
        _variant(transpose_case, False, "transpose_perm"),
    ],
    "Concat": [concat_case],
    "Split": [_variant(split_case, True, "split_sizes"), _variant(split_case, False, "split_equal")],
    "Slice": [
        _variant(slice_case, [1], "slice_unit_steps"),
        _variant(slice_case, [2, 3], "slice_strided"),
        _variant(slice_case, [-1, -2, -3], "slice_negative_steps"),
        _variant(slice_case, [1, 2, -1, -2], "slice_mixed_steps"),
    ],
    "Squeeze": [squeeze_case],
    "Unsqueeze": [unsqueeze_case],
    "Dropout": [
        _variant(dropout_case, v, f"dropout_{v}")
        for v in ("plain", "ratio", "ratio_training_false", "training_false_only")
    ],
    "Cast": [cast_case],
    "Pad": [pad_case("constant"), pad_case("reflect"), pad_case("edge")],
    "Gather": [_variant(gather_case, k, f"gather_{k}") for k in ("scalar", "range", "any", "matrix")],
}
