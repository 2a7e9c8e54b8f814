"""One pass over a finished gradient: the rules' plain math, in the ops onnxruntime keeps blocked.

onnxruntime's CPU provider (``nchwc_transformer.cc``) keeps a float32 ``[N, C, H, W]`` map in its
blocked NCHWc layout (blocks of 8 channels with AVX2, 16 with AVX-512) only while layout-aware ops
touch it: Conv (with a fused activation such as Clip), pools, Add, Sum, Concat, Relu, and Mul of two
same-shaped maps. Any other op reads the map in plain NCHW, so onnxruntime reorders it on the way in
and back on the way out. The rules state each activation's derivative as plain math, a comparison
mask ``Cast(Greater(y, t))`` times ``dy``; in a chain of blocked convolutions the two reorders around
each such mask cost about 40% of a batch-8 step of a MobileNet. This pass rewrites them, where the
maps around the activation stay blocked, into layout-aware ops with the same values:

* a step mask ``[t > c]`` (``[t < c]``): a depthwise 1x1 Conv, weight ``s = +-2^100`` and bias ``-s c``,
  clipped to [0, 1] (onnxruntime fuses the Clip into the Conv). ``2^100 t - 2^100 c`` has the sign of
  ``t - c`` (an IEEE sum is exact in sign), so the clip gives exactly 0 or 1 except where
  ``0 < |t - c| < 2^-100`` (8e-31: in float32 only a ``t`` that tiny at a zero threshold), and an
  overflow to infinity clips to the right end. Thresholds beyond ``2^26`` keep the comparison.
* PRelu's local slope ``mask (1 - k) + k`` with one slope per channel: a depthwise 1x1 Conv of the mask;
* Clip's window ``[lo < y] and [y < hi]``: one step mask per bound, each applied by its own Mul.

Elsewhere the maps are reordered anyway, and a comparison is cheaper than the Conv that would replace it,
so the mask rewrites need all of: a float32 4-D map with 16k channels, the activation reading a blocked
Conv's output (possibly through Mul/Add by constants onnxruntime folds into that Conv: an unfolded
batch norm), and every forward reader of the activation's output a layout-aware op (a Conv among them
running blocked).

A dense stride-1 convolution's gradient, ``ConvTranspose(dy, W)`` in the rule, becomes a Conv with the
flipped, transposed weight everywhere: onnxruntime runs that Conv blocked, and its ConvTranspose as an
im2col GEMM in plain NCHW with reorders around it.

The driver runs this pass once, after every rule has run (``differentiate(...,
ort_layout=False)`` skips it); it reads which nodes each rule emitted, never the rules themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters.grad.registry import GradContext
from uncnn_rt.runtime.lowering import per_channel_values

LAYOUT_AWARE: frozenset[str] = frozenset(
    {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Sum", "Concat", "Relu"}
)
"""Ops that onnxruntime's CPU provider runs on its blocked NCHWc layout."""

STEP_SCALE = 2.0**100  # the slope of the step's ramp: a power of two, so c * scale is exact
STEP_MAX_THRESHOLD = 2.0**26  # beyond it the comparison stays (c * scale would leave float32's range)

RuleNodes = Sequence[tuple[onnx.NodeProto, Sequence[onnx.NodeProto]]]
"""Each differentiated forward node with the gradient nodes its rule emitted, in emission order."""

Replacements = dict[int, list[onnx.NodeProto]]
"""``id`` of an emitted node -> the nodes that take its place (none: it is dropped)."""


def keep_maps_blocked(ctx: GradContext, rule_nodes: RuleNodes) -> int:
    """Rewrite ``ctx.nodes`` in place; return how many forward nodes' gradients were rewritten.

    Unused initializers that the rules emitted (the comparisons' thresholds) are dropped.
    """
    layout = _Layout(ctx)
    replacements: Replacements = {}
    rewritten = 0
    for node, emitted in rule_nodes:
        rewrite = _REWRITES.get(node.op_type)
        if rewrite is None:
            continue
        found = rewrite(layout, node, list(emitted))
        if found:
            replacements.update(found)
            rewritten += 1
    if not replacements:
        return 0
    nodes = [new for old in ctx.nodes for new in replacements.get(id(old), [old])]
    del ctx.nodes[:]
    ctx.nodes.extend(nodes)
    read = {name for n in nodes for name in n.input}
    ctx.initializers[:] = [i for i in ctx.initializers if i.name in read]
    return rewritten


class _Layout:
    """The forward graph as the layout rules see it, and the builder of the replacement nodes."""

    def __init__(self, ctx: GradContext) -> None:
        self.ctx = ctx
        self.producers = {o: n for n in ctx.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in ctx.graph.node:
            for name in n.input:
                self.readers.setdefault(name, []).append(n)
        self.emitted = {i.name: numpy_helper.to_array(i) for i in ctx.initializers}
        self.step_constants: dict[tuple[int, float, float], tuple[str, str]] = {}

    def value(self, name: str) -> np.ndarray | None:
        value = self.ctx.value(name)
        return value if value is not None else self.emitted.get(name)

    # --- when the maps stay blocked -------------------------------------------------------------
    def blocked(self, node: onnx.NodeProto) -> bool:
        """Whether the maps around activation ``node`` stay in onnxruntime's blocked layout."""
        y = node.output[0]
        shape = self.ctx.shape(y)
        if self.ctx.elem_type(y) != TensorProto.FLOAT or len(shape) != 4 or shape[1] is None or shape[1] % 16:
            return False
        readers = self.readers.get(y, [])
        return (
            self._after_conv(node.input[0])
            and bool(readers)
            and all(
                r.op_type in LAYOUT_AWARE and (r.op_type != "Conv" or self._blocked_conv(r)) for r in readers
            )
        )

    def _blocked_conv(self, node: onnx.NodeProto) -> bool:
        """Whether onnxruntime runs Conv ``node`` blocked: a constant 4-D weight with 16k output channels
        and fewer than 8 or 16k input channels per group (the AVX-512 rule; AVX2 blocks by 8)."""
        weight = self.ctx.value(node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.ndim != 4:
            return False
        return bool(weight.shape[0] % 16 == 0 and (weight.shape[1] < 8 or weight.shape[1] % 16 == 0))

    def _after_conv(self, name: str) -> bool:
        """Whether ``name`` is a blocked Conv's output, possibly through Mul/Add by constants that
        onnxruntime folds into that Conv's weights, each read only by the next."""
        producer = self.producers.get(name)
        while producer is not None and producer.op_type in ("Mul", "Add") and len(producer.input) == 2:
            variable = [n for n in producer.input if self.ctx.value(n) is None]
            if len(variable) != 1 or len(self.readers.get(variable[0], [])) != 1:
                return False
            producer = self.producers.get(variable[0])
        return producer is not None and producer.op_type == "Conv" and self._blocked_conv(producer)

    # --- the replacement nodes ------------------------------------------------------------------
    def node(
        self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs: Any
    ) -> onnx.NodeProto:
        out = output if output is not None else self.ctx.fresh(op_type.lower())
        return helper.make_node(op_type, list(inputs), [out], name=self.ctx.fresh(op_type), **attrs)

    def step(self, name: str, threshold: float, *, above: bool, output: str) -> list[onnx.NodeProto]:
        """The mask ``[name > threshold]`` (``above``) or ``[name < threshold]`` as a clipped depthwise
        1x1 Conv written to ``output`` (see the module docstring for why the values are the same)."""
        ctx = self.ctx
        if abs(threshold) > STEP_MAX_THRESHOLD:
            bound = ctx.const(threshold, like=name)
            compare = self.node("Greater" if above else "Less", [name, bound])
            return [compare, self.node("Cast", [compare.output[0]], output, to=ctx.elem_type(name))]
        channels = int(ctx.shape(name)[1] or 0)
        scale = STEP_SCALE if above else -STEP_SCALE
        key = (channels, scale, threshold)
        if key not in self.step_constants:  # one pair per distinct step, however many use it
            self.step_constants[key] = (
                ctx.const(np.full((channels, 1, 1, 1), scale), like=name, hint="step_w"),
                ctx.const(np.full((channels,), -scale * threshold), like=name, hint="step_b"),
            )
        weight, bias = self.step_constants[key]
        ramp = self.node("Conv", [name, weight, bias], group=channels, kernel_shape=[1, 1])
        clip = self.node(
            "Clip", [ramp.output[0], ctx.const(0.0, like=name), ctx.const(1.0, like=name)], output
        )
        return [ramp, clip]

    def scalar(self, name: str) -> float | None:
        value = self.value(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None


def _cast_compare(
    layout: _Layout, emitted: list[onnx.NodeProto], x: str
) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The rule's ``Cast(Greater(x, c))`` mask: its two nodes, or None when the rule emitted none."""
    compare = next((n for n in emitted if n.op_type == "Greater" and n.input[0] == x), None)
    if compare is None or layout.scalar(compare.input[1]) is None:
        return None
    cast = next((n for n in emitted if n.op_type == "Cast" and n.input[0] == compare.output[0]), None)
    return None if cast is None else (compare, cast)


def _step_in_place(layout: _Layout, mask: tuple[onnx.NodeProto, onnx.NodeProto]) -> Replacements:
    """Replace a ``Cast(Greater(x, c))`` mask by the step Conv, under the Cast's output name."""
    compare, cast = mask
    threshold = layout.scalar(compare.input[1])
    assert threshold is not None
    ramp, clip = layout.step(compare.input[0], threshold, above=True, output=cast.output[0])
    return {id(compare): [ramp], id(cast): [clip]}


def _relu(layout: _Layout, node: onnx.NodeProto, emitted: list[onnx.NodeProto]) -> Replacements:
    # dx = dy [y > 0]
    if not layout.blocked(node):
        return {}
    mask = _cast_compare(layout, emitted, node.output[0])
    return _step_in_place(layout, mask) if mask is not None else {}


def _prelu(layout: _Layout, node: onnx.NodeProto, emitted: list[onnx.NodeProto]) -> Replacements:
    # dx = dy (mask (1 - k) + k), mask = [x > 0]; with one k per channel the affine map is a depthwise Conv
    if not layout.blocked(node):
        return {}
    x, slope = node.input
    mask = _cast_compare(layout, emitted, x)
    if mask is None:
        return {}
    replacements = _step_in_place(layout, mask)
    scaled = next((n for n in emitted if n.op_type == "Mul" and mask[1].output[0] in n.input), None)
    shifted = (
        None
        if scaled is None
        else next(
            (n for n in emitted if n.op_type == "Add" and list(n.input) == [scaled.output[0], slope]), None
        )
    )
    slopes = layout.ctx.value(slope)
    shape = layout.ctx.shape(x)
    if scaled is None or shifted is None or slopes is None or len(shape) != 4 or not shape[1]:
        return replacements
    per_channel = per_channel_values(slopes, int(shape[1]))
    if per_channel is None:
        return replacements
    ctx = layout.ctx
    weight = ctx.const((1.0 - per_channel).reshape(-1, 1, 1, 1), like=x, hint="prelu_w")
    bias = ctx.const(per_channel, like=x, hint="prelu_b")
    local = layout.node(
        "Conv",
        [mask[1].output[0], weight, bias],
        shifted.output[0],
        group=per_channel.size,
        kernel_shape=[1, 1],
    )
    return {**replacements, id(scaled): [], id(shifted): [local]}


def _clip(layout: _Layout, node: onnx.NodeProto, emitted: list[onnx.NodeProto]) -> Replacements:
    # dx = dy [lo < y] [y < hi]: one step mask per bound, each applied by a Mul
    if not layout.blocked(node):
        return {}
    y = node.output[0]
    compares = [n for n in emitted if n.op_type in ("Greater", "Less") and n.input[0] == y]
    thresholds = [layout.scalar(n.input[1]) for n in compares]
    if not compares or any(t is None for t in thresholds):
        return {}
    names = {n.output[0] for n in compares}
    joined = next((n for n in emitted if n.op_type == "And" and set(n.input) == names), None)
    inside = joined.output[0] if joined is not None else compares[0].output[0]
    cast = next((n for n in emitted if n.op_type == "Cast" and n.input[0] == inside), None)
    product = (
        None
        if cast is None
        else next((n for n in emitted if n.op_type == "Mul" and n.input[1] == cast.output[0]), None)
    )
    if cast is None or product is None or (len(compares) > 1 and joined is None):
        return {}
    replacements: Replacements = {id(cast): []}
    if joined is not None:
        replacements[id(joined)] = []
    dx = product.input[0]
    applied: list[onnx.NodeProto] = []
    for i, (compare, threshold) in enumerate(zip(compares, thresholds, strict=True)):
        assert threshold is not None
        mask = layout.ctx.fresh("step")
        replacements[id(compare)] = layout.step(y, threshold, above=compare.op_type == "Greater", output=mask)
        last = i == len(compares) - 1
        applied.append(layout.node("Mul", [dx, mask], product.output[0] if last else None))
        dx = applied[-1].output[0]
    replacements[id(product)] = applied
    return replacements


def _conv(layout: _Layout, node: onnx.NodeProto, emitted: list[onnx.NodeProto]) -> Replacements:
    """A dense stride-1 2-D conv's ``dx = ConvTranspose(dy, W)`` as ``Conv(dy, W')``: dx[j] = sum_i W[i]
    dy[j + p_b - i d] = Conv(dy, W')[j], with W' the weight with its two channel axes swapped and its
    spatial axes flipped, begin pad dk - 1 - p_b and end pad whatever makes the output x long. W' is a
    Transpose and a reversing Slice of the initializer (folded once by onnxruntime), so the file holds the
    weight once. Kept as it is where a pad would go negative."""
    w = node.input[1]
    weight = layout.ctx.value(w)
    transpose = next((n for n in emitted if n.op_type == "ConvTranspose" and n.input[1] == w), None)
    if transpose is None or weight is None or weight.ndim != 4:
        return {}
    attrs = {a.name: helper.get_attribute_value(a) for a in transpose.attribute}
    kernel, rank = list(attrs["kernel_shape"]), 2
    dilations = list(attrs.get("dilations", [1] * rank))
    if attrs.get("group", 1) != 1 or set(attrs.get("strides", [1] * rank)) != {1}:
        return {}
    x_dims, y_dims = layout.ctx.shape(node.input[0])[2:], layout.ctx.shape(node.output[0])[2:]
    begin = list(attrs["pads"])[:rank]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    new_begin = [span - 1 - b for span, b in zip(spans, begin, strict=True)]
    new_end = [
        int(x or 0) - int(y or 0) - nb + span - 1
        for x, y, nb, span in zip(x_dims, y_dims, new_begin, spans, strict=True)
    ]
    if min(new_begin) < 0 or min(new_end) < 0:
        return {}
    ctx = layout.ctx
    swapped = layout.node("Transpose", [w], perm=[1, 0, 2, 3])
    flip = [ctx.ints([-1] * rank), ctx.ints([-(2**62)] * rank), ctx.ints([2, 3]), ctx.ints([-1] * rank)]
    flipped = layout.node("Slice", [swapped.output[0], *flip])
    conv = layout.node(
        "Conv",
        [transpose.input[0], flipped.output[0]],
        transpose.output[0],
        kernel_shape=kernel,
        dilations=dilations,
        pads=[*new_begin, *new_end],
    )
    return {id(transpose): [swapped, flipped, conv]}


_REWRITES: dict[str, Callable[[_Layout, onnx.NodeProto, list[onnx.NodeProto]], Replacements]] = {
    "Conv": _conv,
    "Relu": _relu,
    "PRelu": _prelu,
    "Clip": _clip,
}
