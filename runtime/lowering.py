"""Rewrites of an attack graph for onnxruntime's CPU provider that keep its results, made as it loads.

onnxruntime's CPU provider runs convolutions in a blocked channel layout (NCHWc) and converts a tensor
back to plain NCHW in front of every op that cannot read that layout, and forward again behind it.
``PRelu`` is such an op, and MobileFaceNet-style recognizers put one after nearly every convolution:
in a batch-8 attack step of ``fr_feature`` the PRelus and their reorders took about a fifth of the time.

The attack graph on disk keeps its ``PRelu`` (a portable file, and what other runtimes fuse best); the
CPU session gets an equivalent made only of layout-aware ops::

    PRelu(x, a) = Relu(x) + Conv(Relu(Conv(x, -1)), -a)       (1x1 depthwise Convs, no bias)

which is exact, op for op: for ``x > 0`` it is ``x + (-a) * 0 = x``; for ``x < 0`` it is
``0 + (-a) * (-x) = a x`` (a negation is exact, so the one rounded product is PRelu's own). onnxruntime
folds the second Relu into its Conv and the Add into the last Conv's accumulator. The graph's other
convolutions may then run in the blocked layout where they ran in NCHW before, with another summation
order: features and gradients agree with the file's to float32 rounding (``tests/test_lowering.py``;
on the shipped ``fr_feature`` they came out bit-identical).

**Subnormal weights.** An x86 core computes with subnormal floats (nonzero, below 2^-126, about
1.2e-38) in microcode, many times slower than with normal ones. The shipped ``fr_feature`` holds 9,578
subnormal weights, nearly all in six 1x1 convolutions, and those six took three quarters of its forward
pass (on 2 cores about 50 ms an image, against 12 ms with them zero). The CPU session gets them as zero:
each product that drops is under 2^-126 times an activation, below float32's rounding of any sum it
enters unless the whole sum is itself near 2^-126, so features and gradients come out as the file's (on
the shipped ``fr_feature``, bit-identical). CUDA cores handle subnormals at full speed, and get the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

_PREFIX = "cpu_lowering/"


def lower_for_cpu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``model`` rewritten in place as above, and how many rewrites it took: each float32 initializer
    holding subnormal values (:func:`flush_subnormals`) and each per-channel ``PRelu`` on a float32
    ``[N, C, H, W]`` map counts one. Slopes must be initializers; other PRelus stay."""
    flushed = flush_subnormals(model)
    return model, flushed + _lower_prelus(model)


def flush_subnormals(model: onnx.ModelProto) -> int:
    """Set every subnormal value of ``model``'s float32 initializers to zero of its sign (in place);
    returns how many initializers changed."""
    from onnx import TensorProto, numpy_helper

    tiny = np.finfo(np.float32).tiny
    changed = 0
    for index, init in enumerate(model.graph.initializer):
        if init.data_type != TensorProto.FLOAT or init.data_location == TensorProto.EXTERNAL:
            continue
        values = numpy_helper.to_array(init)
        subnormal = (np.abs(values) < tiny) & (values != 0)
        if not subnormal.any():
            continue
        flushed = np.where(subnormal, np.copysign(np.float32(0), values), values).astype(np.float32)
        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(flushed, init.name))
        changed += 1
    return changed


def _lower_prelus(model: onnx.ModelProto) -> int:
    """Rewrite each qualifying ``PRelu`` of ``model`` in place; returns how many."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if not any(node.op_type == "PRelu" for node in graph.node):
        return 0
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an invalid graph: leave it as it is, for onnxruntime to name what is wrong
        return 0
    maps = {
        vi.name: vi.type.tensor_type
        for vi in [*inferred.input, *inferred.value_info]
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and len(vi.type.tensor_type.shape.dim) == 4
    }
    initializers = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    lowered = 0
    for node in graph.node:
        slope = _channel_slopes(node, maps, initializers)
        if slope is None:
            nodes.append(node)
            continue
        lowered += 1
        x, y, channels = node.input[0], node.output[0], slope.size
        name = f"{_PREFIX}{lowered}/"
        added += [
            numpy_helper.from_array(np.full((channels, 1, 1, 1), -1.0, np.float32), name + "minus_one"),
            numpy_helper.from_array((-slope).reshape(channels, 1, 1, 1), name + "minus_slope"),
        ]
        nodes += [
            helper.make_node("Relu", [x], [name + "positive"], name=name + "positive"),
            _depthwise([x, name + "minus_one"], name + "negated", channels),
            helper.make_node("Relu", [name + "negated"], [name + "negative"], name=name + "negative"),
            _depthwise([name + "negative", name + "minus_slope"], name + "scaled", channels),
            helper.make_node("Add", [name + "positive", name + "scaled"], [y], name=name + "sum"),
        ]
    if lowered:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in nodes for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]  # the PRelus' own slopes go
        del graph.initializer[:]
        graph.initializer.extend([*kept, *added])
    return lowered


def _depthwise(inputs: list[str], output: str, channels: int) -> onnx.NodeProto:
    """A bias-free 1x1 depthwise Conv (one weight per channel)."""
    from onnx import helper

    return helper.make_node("Conv", inputs, [output], name=output, group=channels, kernel_shape=[1, 1])


def _channel_slopes(
    node: onnx.NodeProto, maps: dict[str, onnx.TypeProto.Tensor], initializers: dict[str, onnx.TensorProto]
) -> np.ndarray | None:
    """The per-channel float32 slopes of a PRelu on a 4-D float32 map, or None when it does not qualify."""
    from onnx import numpy_helper

    if node.op_type != "PRelu" or node.domain not in ("", "ai.onnx") or node.input[1] not in initializers:
        return None
    tensor = maps.get(node.input[0])
    if tensor is None:
        return None
    channel_dim = tensor.shape.dim[1]
    if not channel_dim.HasField("dim_value"):
        return None
    channels = int(channel_dim.dim_value)
    slope = numpy_helper.to_array(initializers[node.input[1]])
    return per_channel_values(slope, channels) if slope.dtype == np.float32 else None


def per_channel_values(values: np.ndarray, channels: int) -> np.ndarray | None:
    """``values`` as one number per channel when they broadcast against an ``[N, C, H, W]`` map with
    ``C = channels`` along the channel axis only (shapes ``[C, 1, 1]``, ``[1, C, 1, 1]``, a scalar...),
    else None. Also used by the gradient graph's layout pass (converters/grad/ort_layout.py) for PRelu."""
    if values.ndim > 4:
        return None
    full = (1,) * (4 - values.ndim) + values.shape
    if full[0] != 1 or full[2:] != (1, 1) or full[1] not in (1, channels):
        return None
    return np.array(np.broadcast_to(values.reshape(-1), (channels,)))  # a writable copy
