"""Reverse-mode differentiation of an ONNX graph into standard ``ai.onnx`` ops.

The driver owns everything that is not an op's own calculus: it folds constant subgraphs, infers
shapes, finds the nodes that lie between the input and the objective (pruning the rest, never
differentiating weights), walks them in reverse topological order, calls each op's rule, and sums
gradients that reach one tensor along several paths.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter
from onnx.reference import ReferenceEvaluator

from uncnn_rt.converters.grad import rules as _rules  # noqa: F401  (registers every rule)
from uncnn_rt.converters.grad.fuse import fuse_activations
from uncnn_rt.converters.grad.ort_layout import keep_maps_blocked
from uncnn_rt.converters.grad.registry import (
    FLOAT_TYPES,
    NON_DIFFERENTIABLE,
    RULES,
    GradContext,
    Shape,
    UnsupportedOpError,
)
from uncnn_rt.runtime.errors import ModelError

OPSET = 17
"""The ``ai.onnx`` opset every graph is brought to before differentiation; rules emit this opset."""


def to_opset(model: onnx.ModelProto, opset: int = OPSET) -> onnx.ModelProto:
    """Bring ``model`` to ``opset`` (rules are written against one opset's op signatures)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None:
        raise ModelError("model imports no ai.onnx opset")
    others = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if others:
        raise ModelError(
            f"model uses non-standard op domains {others}; only ai.onnx ops can be differentiated"
        )
    # Exporters import domains they never use (tf2onnx always adds ai.onnx.ml); drop those imports.
    if any(o.domain not in ("", "ai.onnx") for o in model.opset_import):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        kept = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    if current == opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors with C++ messages
        raise ModelError(f"cannot convert the model from opset {current} to {opset}: {exc}") from exc


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace Constant nodes and nodes whose inputs are all constant by initializers.

    This removes shape-only arithmetic (Shape of a static tensor, Gather on shapes, ConstantOfShape,
    Concat of dims) so rules see plain constants for Reshape targets, Pad widths, Resize scales.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input} - set(constants)
    shapes = _infer(model)[0]
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        values = _try_fold(node, constants, shapes, graph_inputs)
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values, strict=False):
            if name:
                constants[name] = value
    used = {n for node in kept for n in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items() if k in used)
    # Inputs that were also initializers (old-style weight inputs) stay declared only as initializers.
    real_inputs = [i for i in graph.input if i.name not in constants]
    del graph.input[:]
    graph.input.extend(real_inputs)
    return model


def _try_fold(
    node: onnx.NodeProto,
    constants: dict[str, np.ndarray],
    shapes: dict[str, Shape],
    graph_inputs: set[str],
) -> list[np.ndarray] | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        return _eval(node, {})
    if node.op_type == "Shape" and node.input[0] in shapes:
        shape = shapes[node.input[0]]
        if all(d is not None for d in shape):
            full = np.array(shape, dtype=np.int64)
            attrs = {a.name: a.i for a in node.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(shape))
            return [full[start:end]]
        return None
    if node.op_type.startswith("Random") or not node.input:
        return None
    inputs = [n for n in node.input if n]
    if all(n in constants for n in inputs) and not any(n in graph_inputs for n in inputs):
        return _eval(node, {n: constants[n] for n in inputs})
    return None


def _eval(node: onnx.NodeProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in feeds.items()
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in node.output if n]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]


def _infer(model: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    try:
        inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed: {exc}") from exc
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for init in g.initializer:
        types[init.name] = init.data_type
        shapes[init.name] = tuple(init.dims)
    return shapes, types


def differentiate(
    model: onnx.ModelProto, *, wrt: str, objective: str, grad_name: str = "grad", ort_layout: bool = True
) -> onnx.ModelProto:
    """Return ``model`` with one more output, ``grad_name`` = d sum(objective) / d ``wrt``.

    ``wrt`` must be a graph input and ``objective`` a float tensor of the graph; the seed gradient is
    ones of the objective's shape, so per-sample objectives give per-sample gradients. ``ort_layout``
    runs :func:`~uncnn_rt.converters.grad.ort_layout.keep_maps_blocked` over the finished gradient
    (the same values, in ops onnxruntime's CPU provider keeps in its blocked layout); without it the
    gradient is the rules' plain math.
    """
    model = fold_constants(to_opset(model))
    model, _ = fuse_activations(model, _infer(model)[0])
    graph = model.graph
    if wrt not in {i.name for i in graph.input}:
        raise ModelError(f"{wrt!r} is not a graph input (inputs: {[i.name for i in graph.input]})")
    shapes, types = _infer(model)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    requires = {wrt}
    for node in graph.node:
        if node.op_type in NON_DIFFERENTIABLE or not any(n in requires for n in node.input if n):
            continue
        requires.update(o for o in node.output if o and types.get(o) in FLOAT_TYPES)
    if objective not in requires:
        raise ModelError(f"objective {objective!r} does not depend on input {wrt!r}")

    # Nodes on a path wrt -> objective, found backwards from the objective.
    reaches = {objective}
    on_path: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in reaches for o in node.output) and any(n in requires for n in node.input if n):
            on_path.append(node)
            reaches.update(n for n in node.input if n in requires)

    ctx = GradContext(graph, shapes, types, constants, requires)
    pending: dict[str, list[str]] = {objective: [ctx.filled_like(objective, 1.0)]}
    gradient_of: dict[str, str] = {}  # gradient tensor -> the forward tensor it is the gradient of
    rule_nodes: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []  # what each rule emitted
    for node in on_path:  # already in reverse topological order
        dys = _gather(ctx, node, pending)
        if dys is None:
            continue
        gradient_of.update((dy, out) for dy, out in zip(dys, node.output, strict=False) if dy)
        rule = RULES.get(node.op_type)
        if rule is None:
            raise UnsupportedOpError(node)
        start = len(ctx.nodes)
        dxs = list(rule(ctx, node, dys))
        rule_nodes.append((node, ctx.nodes[start:]))
        if any(dx is not None for dx in dxs[len(node.input) :]):
            raise RuntimeError(
                f"rule for {node.op_type} returned gradients for inputs the node does not have"
            )
        for name, dx in zip(node.input, dxs, strict=False):
            if dx is not None and name in reaches:
                pending.setdefault(name, []).append(dx)

    grad = _accumulate(ctx, pending.pop(wrt))
    gradient_of[grad] = wrt
    if ort_layout:
        keep_maps_blocked(ctx, rule_nodes)
    forward = shape_inference.infer_shapes(model, data_prop=True).graph
    graph.node.extend(ctx.nodes)
    graph.node.append(helper.make_node("Identity", [grad], [grad_name], name="grad/output"))
    graph.initializer.extend(ctx.initializers)
    _annotate(model, gradient_of, forward)
    wrt_vi = next(i for i in graph.input if i.name == wrt)
    out = onnx.ValueInfoProto()
    out.CopyFrom(wrt_vi)
    out.name = grad_name
    graph.output.append(out)
    return model


def _annotate(model: onnx.ModelProto, gradient_of: dict[str, str], forward: onnx.GraphProto) -> None:
    """Declare each gradient's shape: that of its forward tensor (``forward``: the inferred forward
    graph), symbolic batch dimension included.

    Shape inference cannot see through the seed's ``Expand``/``ConstantOfShape`` of a runtime shape, so
    without this every gradient has an anonymous batch dimension, and no optimiser can prove a gradient
    and its forward tensor the same shape (onnxruntime's blocked layout, ``ort_layout.py``, needs that of
    the two operands of a Mul). Strict shape inference afterwards rejects any declaration that
    contradicts what the ops imply.
    """
    infos = {vi.name: vi for vi in [*forward.input, *forward.value_info, *forward.output]}
    declared = {vi.name for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    for grad, primal in gradient_of.items():
        if grad in declared or grad in infos or primal not in infos:
            continue  # a forward tensor passed through as a gradient keeps its own declaration
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(infos[primal])
        vi.name = grad
        model.graph.value_info.append(vi)
        declared.add(grad)
    try:
        shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"a gradient's declared shape contradicts shape inference: {exc}") from exc


def _accumulate(ctx: GradContext, parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ctx.emit("Sum", parts)


def _gather(ctx: GradContext, node: onnx.NodeProto, pending: dict[str, list[str]]) -> list[str | None] | None:
    """The summed gradient of each output of ``node``; zeros for float outputs no path reached."""
    dys: list[str | None] = [_accumulate(ctx, pending.pop(o)) if o in pending else None for o in node.output]
    if all(d is None for d in dys):
        return None
    for i, out in enumerate(node.output):
        if dys[i] is None and out and ctx.elem_type(out) in FLOAT_TYPES and ctx.needs_grad(out):
            dys[i] = ctx.zeros_like(out)
    return dys
