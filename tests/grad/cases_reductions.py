"""Cases for the reductions: axes subsets (negative too) or omitted, keepdims 0/1, noop_with_empty_axes."""

from __future__ import annotations

import numpy as np
from harness import Case, one_node
from hypothesis import strategies as st

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple).filter(lambda s: np.prod(s) <= 96)


def _axes(draw, rank: int) -> list[int]:
    """A non-empty subset of the axes, each given as positive or negative."""
    chosen = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    return [a - rank if draw(st.booleans()) else a for a in chosen]


def reduce_sum_case(axes_mode: str):
    """ReduceSum takes axes as an input (opset 13+). ``axes_mode``: "given", "all" (input omitted) or
    "noop" (omitted with noop_with_empty_axes=1: the identity)."""

    def case(draw) -> Case:
        shape = draw(shapes)
        attrs = {"keepdims": draw(st.sampled_from([0, 1]))}
        inputs: list = ["x"]
        if axes_mode == "given":
            inputs.append(np.array(_axes(draw, len(shape)), dtype=np.int64))
        else:
            attrs["noop_with_empty_axes"] = int(axes_mode == "noop")
        return Case(lambda dt: one_node("ReduceSum", dt, shape, inputs=inputs, **attrs), shape)

    case.__name__ = f"reducesum_{axes_mode}"
    return case


def reduce_attr_case(op: str, given: bool):
    """Reductions that take axes as an attribute at opset 17; all axes when it is omitted."""

    def case(draw) -> Case:
        shape = draw(shapes)
        attrs: dict = {"keepdims": draw(st.sampled_from([0, 1]))}
        if given:
            attrs["axes"] = _axes(draw, len(shape))
        return Case(lambda dt: one_node(op, dt, shape, **attrs), shape)

    case.__name__ = f"{op.lower()}_{'axes' if given else 'all'}"
    return case


# Random continuous inputs have no ties, so ReduceMax/ReduceMin are differentiable at the drawn points;
# tie splitting is tested in test_driver.py.
CASES = {
    "ReduceSum": [reduce_sum_case(mode) for mode in ("given", "all", "noop")],
    **{
        op: [reduce_attr_case(op, True), reduce_attr_case(op, False)]
        for op in ("ReduceMean", "ReduceL2", "ReduceMax", "ReduceMin")
    },
}
