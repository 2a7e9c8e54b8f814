"""Activation patterns that converters spell out in several elementwise ops, fused back into one.

tf2onnx writes a TF.js PReLU as ``Relu(x) + k (x - |x|)`` or ``Max(x, 0) + k Min(x, 0)``, and a ReLU6 as
``Max(Min(Relu(x), 6), 0)``. Each
op of such a chain costs a pass over the feature map forward, another backward (plus the sum where the
gradient paths of ``x`` meet), and onnxruntime's layout reorders around every op it cannot fuse into
the convolution. One ``PRelu`` / ``Clip`` computes the same values, and its gradient rule is a single
masked product. The fused graph differs from the source only in the subgradient chosen where the
pre-activation is exactly 0 (PReLU) or exactly at the clip bound (ReLU6), a set of measure zero.

The pass runs on a graph whose constant subgraphs are folded (``driver.fold_constants``), so the slopes
and bounds are initializers, and only rewrites chains whose intermediate tensors have no other consumer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

Shape = tuple[int | None, ...]


def fuse_activations(
    model: onnx.ModelProto, shapes: dict[str, Shape]
) -> tuple[onnx.ModelProto, Counter[str]]:
    """``model`` with PReLU and ReLU6 chains fused (a copy), and how many of each were fused.

    ``shapes``: inferred tensor shapes (a PReLU slope must broadcast to ``x`` one way, as ``PRelu`` needs).
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    fused: Counter[str] = Counter()
    for name, rewrite in (("PRelu", _prelu), ("PRelu", _prelu_min_max), ("Clip", _relu6)):
        while True:
            consumers = _consumers(graph)
            producer = {o: n for n in graph.node for o in n.output}
            match = None
            for node in graph.node:
                match = rewrite(node, producer, consumers, constants, shapes)
                if match is not None:
                    break
            if match is None:
                break
            removed, new_node, new_constants = match
            for key, value in new_constants.items():
                constants[key] = value
                graph.initializer.append(numpy_helper.from_array(value, key))
            at = min(i for i, n in enumerate(graph.node) if id(n) in {id(r) for r in removed})
            kept = [n for n in graph.node if id(n) not in {id(r) for r in removed}]
            kept.insert(at, new_node)
            del graph.node[:]
            graph.node.extend(kept)
            fused[name] += 1
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    initializers = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model, fused


Match = tuple[list[onnx.NodeProto], onnx.NodeProto, dict[str, np.ndarray]]
Rewrite = Callable[
    [onnx.NodeProto, dict[str, onnx.NodeProto], Counter[str], dict[str, np.ndarray], dict[str, Shape]],
    Match | None,
]


def _consumers(graph: onnx.GraphProto) -> Counter[str]:
    """How many node inputs and graph outputs read each tensor."""
    count: Counter[str] = Counter(n for node in graph.node for n in node.input if n)
    count.update(o.name for o in graph.output)
    return count


def _only(name: str, consumers: Counter[str], uses: int = 1) -> bool:
    return consumers[name] == uses


def _prelu(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    consumers: Counter[str],
    constants: dict[str, np.ndarray],
    shapes: dict[str, Shape],
) -> Match | None:
    """``Add(Relu(x), Mul(Sub(x, Abs(x)), k))`` (either operand order) -> ``PRelu(x, 2 k)``.

    For ``x > 0`` both sides are ``x``; for ``x < 0`` the left is ``2 k x``.
    """
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for relu_out, mul_out in (node.input, node.input[::-1]):
        relu, mul = producer.get(relu_out), producer.get(mul_out)
        if relu is None or mul is None or relu.op_type != "Relu" or mul.op_type != "Mul":
            continue
        x = relu.input[0]
        for sub_out, k in (mul.input, mul.input[::-1]):
            sub = producer.get(sub_out)
            if k not in constants or sub is None or sub.op_type != "Sub" or sub.input[0] != x:
                continue
            absolute = producer.get(sub.input[1])
            if absolute is None or absolute.op_type != "Abs" or absolute.input[0] != x:
                continue
            if not all(_only(t, consumers) for t in (relu_out, mul_out, sub_out, absolute.output[0])):
                continue
            slope = (2.0 * constants[k]).astype(constants[k].dtype)
            if _broadcasts_one_way(slope.shape, shapes.get(x)):
                return _fused_prelu(node, x, slope, [relu, absolute, sub, mul, node])
    return None


def _prelu_min_max(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    consumers: Counter[str],
    constants: dict[str, np.ndarray],
    shapes: dict[str, Shape],
) -> Match | None:
    """``Add(Max(x, 0), Mul(Min(x, 0), k))`` (any operand orders) -> ``PRelu(x, k)``, TF.js's other
    spelling. Bit for bit the same values: for ``x > 0`` it is ``x + k 0 = x``, for ``x < 0`` ``0 + k x``.
    """
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for max_out, mul_out in (node.input, node.input[::-1]):
        top, mul = producer.get(max_out), producer.get(mul_out)
        if top is None or mul is None or top.op_type != "Max" or mul.op_type != "Mul":
            continue
        x = _other_than_zero(top, constants)
        for min_out, k in (mul.input, mul.input[::-1]):
            bottom = producer.get(min_out)
            if x is None or k not in constants or bottom is None or bottom.op_type != "Min":
                continue
            if _other_than_zero(bottom, constants) != x:
                continue
            if not all(_only(t, consumers) for t in (max_out, mul_out, min_out)):
                continue
            slope = constants[k]
            if slope.dtype.kind == "f" and _broadcasts_one_way(slope.shape, shapes.get(x)):
                return _fused_prelu(node, x, slope, [top, bottom, mul, node])
    return None


def _fused_prelu(node: onnx.NodeProto, x: str, slope: np.ndarray, removed: list[onnx.NodeProto]) -> Match:
    """The match replacing ``removed`` (ending in ``node``) by ``PRelu(x, slope)`` under ``node``'s output."""
    slope_name = f"{node.output[0]}/fused_prelu_slope"
    fused = helper.make_node("PRelu", [x, slope_name], [node.output[0]], name=f"{node.name}/fused_prelu")
    return removed, fused, {slope_name: slope}


def _other_than_zero(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> str | None:
    """For a two-input Min/Max against a scalar-shaped constant 0, the other input's name."""
    if len(node.input) != 2:
        return None
    for x, zero in (node.input, node.input[::-1]):
        value = constants.get(zero)
        if value is not None and value.dtype.kind == "f" and value.size == 1 and not value.any():
            return x if x not in constants else None
    return None


def _relu6(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    consumers: Counter[str],
    constants: dict[str, np.ndarray],
    shapes: dict[str, Shape],
) -> Match | None:
    """``Min(Relu(x), hi)``, optionally followed by ``Max(., lo)`` with ``lo <= 0``, -> ``Clip(x, 0, hi)``.

    ``node`` is the last op of the chain (the Max when there is one), scalar ``hi >= 0``.
    """
    chain: list[onnx.NodeProto] = []
    top = node
    if node.op_type == "Max" and len(node.input) == 2:
        lo = _scalar(node.input[1], constants)
        inner = producer.get(node.input[0])
        if (
            lo is None
            or lo > 0
            or inner is None
            or inner.op_type != "Min"
            or not _only(inner.output[0], consumers)
        ):
            return None
        chain.append(node)
        top = inner
    if top.op_type != "Min" or len(top.input) != 2:
        return None
    hi = _scalar(top.input[1], constants)
    relu = producer.get(top.input[0])
    if hi is None or hi < 0 or relu is None or relu.op_type != "Relu" or not _only(relu.output[0], consumers):
        return None
    if not chain and any(n.op_type == "Max" for n in _readers(top.output[0], producer, consumers)):
        return None  # let the Max at the end of the chain take the whole of it
    dtype = constants[top.input[1]].dtype
    zero_name, hi_name = f"{node.output[0]}/fused_clip_min", f"{node.output[0]}/fused_clip_max"
    fused = helper.make_node(
        "Clip", [relu.input[0], zero_name, hi_name], [node.output[0]], name=f"{node.name}/fused_clip"
    )
    new = {zero_name: np.zeros((), dtype), hi_name: np.asarray(hi, dtype)}
    return [relu, top, *chain], fused, new


def _readers(name: str, producer: dict[str, onnx.NodeProto], consumers: Counter[str]) -> list[onnx.NodeProto]:
    if consumers[name] == 0:
        return []
    return [n for n in producer.values() if name in n.input]


def _scalar(name: str, constants: dict[str, np.ndarray]) -> float | None:
    value = constants.get(name)
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _broadcasts_one_way(slope: tuple[int, ...], x: Shape | None) -> bool:
    """``slope`` broadcasts to ``x`` without growing it (numpy rules, ``x`` fully known)."""
    if x is None or any(d is None for d in x[1:]) or len(slope) > len(x):
        return False
    return all(s in (1, d) for s, d in zip(slope[::-1], x[::-1], strict=False) if d is not None) and all(
        s == 1 for s, d in zip(slope[::-1], x[::-1], strict=False) if d is None
    )
