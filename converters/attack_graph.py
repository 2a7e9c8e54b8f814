"""Attack-graph assembly: preprocessing + source model + head + objective, then its gradient.

The gradient comes from the autodiff in :mod:`uncnn_rt.converters.grad`; this module only builds the
graph around the model and checks the result.

The result follows the contract of ``uncnn_rt.runtime.contract``: inputs ``image`` [N, S, S, 3]
(RGB 0..255) and ``reference`` [N, D]; outputs ``features``, ``objective`` and ``grad``.

The model's own preprocessing is folded into the graph as linear ops, so the gradient reaches the
canonical crop exactly:

* crop window + resize to the native size: two constant matrix products (one per spatial axis);
* channel order and ``(x - mean) / std``: one 1x1 convolution with a 3x3 weight and a bias;
* layout: a Transpose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters.grad.driver import OPSET, differentiate, to_opset
from uncnn_rt.converters.grad.registry import NON_DIFFERENTIABLE, UnsupportedOpError
from uncnn_rt.runtime import contract as C
from uncnn_rt.runtime.errors import ModelError

_P = "pre/"  # prefix of every tensor this module adds in front of the source model
_H = "head/"  # ... and behind it


def build_attack_graph(
    model: onnx.ModelProto,
    *,
    kind: C.ModelKind,
    preprocessing: C.Preprocessing,
    canonical_size: int,
    name: str,
    threshold: float | None = None,
    labels: Sequence[str] | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    outputs: Literal["logits", "probabilities", "embedding"] | None = None,
    check_batch: bool = True,
    notes: list[str] | None = None,
) -> onnx.ModelProto:
    """Turn a forward model into an attack graph.

    Args:
        model: the source model, one float image input (``[N, C, H, W]`` or ``[N, H, W, C]``).
        kind: ``"face"`` (features = L2-normalised output) or ``"classifier"`` (log-softmax).
        preprocessing: what the model expects (native size, layout, colour order, mean/std, crop).
        canonical_size: S of the ``image`` input.
        name, threshold, labels: metadata (threshold: cosine match threshold for face models).
        input_name / output_name: which source input/output to use when there are several.
        outputs: what the source output is; defaults to ``"embedding"`` for face models and
            ``"logits"`` for classifiers (``"probabilities"`` takes a log instead of a log-softmax).
        check_batch: run the graph at batch 1 and 2 and fall back to a fixed batch of 1 when the
            source model only works at batch 1 (e.g. a Reshape to a constant ``[1, -1]``).
        notes: when given, what the user should know about the result is appended, one line each: a
            fallback to a fixed batch of 1 (and why), and the ops that pass no gradient
            (:func:`no_gradient_notes`).

    Raises:
        UnsupportedOpError: an op without a gradient rule, or control flow (Loop, If, Scan) on the
            image's path, which the builder cannot differentiate.

    Returns:
        The attack graph; it passes ``onnx.checker`` (full check).
    """
    if kind not in C.KINDS:
        raise ModelError(f"kind must be one of {C.KINDS}, got {kind!r}")
    if canonical_size <= 0:
        raise ModelError(f"canonical_size must be positive, got {canonical_size}")
    outputs = outputs or ("embedding" if kind == "face" else "logits")
    _refuse_control_flow(model, input_name)
    graph_model = _assemble(
        model, kind, preprocessing, canonical_size, input_name, output_name, outputs, dynamic_batch=True
    )
    attack = _finish(graph_model, kind, preprocessing, canonical_size, name, threshold, labels)
    problem = _batch_problem(attack, canonical_size) if check_batch else None
    if problem is not None:
        graph_model = _assemble(
            model, kind, preprocessing, canonical_size, input_name, output_name, outputs, dynamic_batch=False
        )
        attack = _finish(graph_model, kind, preprocessing, canonical_size, name, threshold, labels)
        if notes is not None:
            notes.append(
                f"the attack graph takes one image at a time (a fixed batch of 1): at batch 2 {problem}; "
                "attacks still run, one image per call"
            )
    if notes is not None:
        notes.extend(no_gradient_notes(model, input_name))
    return attack


_CONTROL_FLOW = frozenset({"Loop", "If", "Scan"})
# Ops that read only their input's shape, never its values: their outputs do not change with the pixels.
_SHAPE_ONLY = frozenset(
    {"Shape", "Size", "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike"}
)


def _image_dependent(model: onnx.ModelProto, input_name: str | None, *, values_only: bool) -> set[str]:
    """Tensors computed from the image input (by value when ``values_only``: shape reads excluded)."""
    g = model.graph
    initializers = {i.name for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in initializers]
    reached = {input_name} if input_name is not None else set(inputs[:1])
    for node in g.node:
        if values_only and node.op_type in _SHAPE_ONLY:
            continue
        if any(n in reached for n in node.input if n):
            reached.update(o for o in node.output if o)
    return reached


def _refuse_control_flow(model: onnx.ModelProto, input_name: str | None) -> None:
    """Name a Loop, If or Scan on the image's path, before shape inference fails on it less clearly."""
    reached = _image_dependent(model, input_name, values_only=False)
    for node in model.graph.node:
        if node.op_type in _CONTROL_FLOW and any(n in reached for n in node.input if n):
            raise UnsupportedOpError(
                node,
                "control flow has no gradient rule: the gradient builder differentiates one static graph "
                "and does not enter the body subgraph, whose outputs also have no static shape; export "
                "the model with the loop unrolled or the branch taken (for torch, trace rather than script "
                "it)",
            )


def no_gradient_notes(model: onnx.ModelProto, input_name: str | None = None) -> list[str]:
    """One line per op type on the path from the image to the outputs that passes no gradient back.

    Such ops make a discrete choice from the pixels (NonMaxSuppression, TopK's indices, ArgMax,
    comparisons, Floor, Round, a Cast to integers): their output is piecewise constant in the image, so
    the gradient treats the choice as fixed and only moves the values it selects. The attack graph is
    still exact where the choice does not change.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # types are a refinement here; without them the op list alone decides
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}
    by_value = _image_dependent(model, input_name, values_only=True)
    wanted = {o.name for o in model.graph.output}
    for node in reversed(model.graph.node):
        if any(o in wanted for o in node.output):
            wanted.update(n for n in node.input if n)
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in _SHAPE_ONLY or not any(n in by_value for n in node.input if n):
            continue
        outs = [o for o in node.output if o and o in wanted]
        discrete = [o for o in outs if types.get(o, TensorProto.FLOAT) not in floats]
        if outs and (node.op_type in NON_DIFFERENTIABLE or discrete):
            found.setdefault(node.op_type, []).append(node.name or "(unnamed)")
    return [
        f"no gradient flows through {op} ({len(names)} node{'s' if len(names) > 1 else ''}: "
        f"{', '.join(repr(n) for n in names[:3])}{', ...' if len(names) > 3 else ''}): its output is "
        "a discrete choice made from the pixels, so the gradient holds that choice fixed and moves only "
        "the values it selects"
        for op, names in found.items()
    ]


def _finish(
    model: onnx.ModelProto,
    kind: str,
    pre: C.Preprocessing,
    size: int,
    name: str,
    threshold: float | None,
    labels: Sequence[str] | None,
) -> onnx.ModelProto:
    model = differentiate(model, wrt=C.INPUT_IMAGE, objective=C.OUTPUT_OBJECTIVE, grad_name=C.OUTPUT_GRAD)
    by_name = {o.name: o for o in model.graph.output}
    ordered = [by_name[C.OUTPUT_FEATURES], by_name[C.OUTPUT_OBJECTIVE], by_name[C.OUTPUT_GRAD]]
    del model.graph.output[:]
    model.graph.output.extend(ordered)
    model.graph.name = name
    model.producer_name = "uncnn-rt"
    model.producer_version = C.CONTRACT_VERSION
    feature_dim = _static_dim(ordered[0], 1)
    meta = {
        C.META_NAME: name,
        C.META_KIND: kind,
        C.META_CANONICAL_SIZE: str(size),
        C.META_NATIVE_SIZE: json.dumps(list(pre.native_size)),
        C.META_PREPROCESSING: pre.to_json(),
        C.META_EMBEDDING_DIM: str(feature_dim),
        C.META_CONTRACT_VERSION: C.CONTRACT_VERSION,
    }
    if threshold is not None:
        meta[C.META_THRESHOLD] = repr(float(threshold))
    if labels is not None:
        if len(labels) != feature_dim:
            raise ModelError(f"{len(labels)} labels given for a model with {feature_dim} outputs")
        meta[C.META_LABELS] = json.dumps(list(labels))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the assembled attack graph is not valid ONNX: {exc}") from exc
    return model


def _assemble(
    model: onnx.ModelProto,
    kind: str,
    pre: C.Preprocessing,
    size: int,
    input_name: str | None,
    output_name: str | None,
    outputs: str,
    *,
    dynamic_batch: bool,
) -> onnx.ModelProto:
    model = to_opset(onnx.ModelProto.FromString(model.SerializeToString()), OPSET)
    g = model.graph
    initializers = {i.name for i in g.initializer}
    data_inputs = [i for i in g.input if i.name not in initializers]
    src_in = _pick(data_inputs, input_name, "input")
    src_out = _pick(list(g.output), output_name, "output")
    _check_names(g)
    _check_input_shape(src_in, pre)

    batch: str | int = "N" if dynamic_batch else 1
    _set_batch(src_in, batch)
    for out in g.output:
        _set_batch(out, batch)
    del g.value_info[:]  # stale once the batch dimension changes; shape inference recomputes it

    nodes, inits = _preprocessing_nodes(pre, size, model_input=src_in.name)
    head_nodes, head_inits = _head_nodes(kind, outputs, src_out.name)

    body = list(g.node)
    del g.node[:]
    g.node.extend([*nodes, *body, *head_nodes])
    g.initializer.extend(inits + head_inits)
    elem = TensorProto.FLOAT
    del g.input[:]
    g.input.extend(
        [
            helper.make_tensor_value_info(C.INPUT_IMAGE, elem, [batch, size, size, 3]),
            helper.make_tensor_value_info(C.INPUT_REFERENCE, elem, [batch, None]),
        ]
    )
    del g.output[:]
    g.output.extend(
        [
            helper.make_tensor_value_info(C.OUTPUT_FEATURES, elem, None),
            helper.make_tensor_value_info(C.OUTPUT_OBJECTIVE, elem, None),
        ]
    )
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError with one line per failing node
        first = str(exc).strip().splitlines()
        raise ModelError(
            "shape inference failed on the model with the attack graph's preprocessing and head: "
            + (first[1] if len(first) > 1 and "Inference error" in first[0] else first[0] if first else "")
        ) from exc
    feats = next(v for v in [*inferred.graph.output] if v.name == C.OUTPUT_FEATURES)
    dim = _static_dim(feats, 1)
    g.input[1].CopyFrom(helper.make_tensor_value_info(C.INPUT_REFERENCE, elem, [batch, dim]))
    g.output[0].CopyFrom(helper.make_tensor_value_info(C.OUTPUT_FEATURES, elem, [batch, dim]))
    g.output[1].CopyFrom(helper.make_tensor_value_info(C.OUTPUT_OBJECTIVE, elem, [batch]))
    return model


def _pick(values: list[onnx.ValueInfoProto], wanted: str | None, what: str) -> onnx.ValueInfoProto:
    names = [v.name for v in values]
    if wanted is not None:
        for v in values:
            if v.name == wanted:
                return v
        raise ModelError(f"the model has no {what} named {wanted!r} ({what}s: {names})")
    if len(values) != 1:
        raise ModelError(f"the model has {len(values)} {what}s {names}; name the one to use")
    return values[0]


def _check_names(g: onnx.GraphProto) -> None:
    ours = {C.INPUT_IMAGE, C.INPUT_REFERENCE, C.OUTPUT_FEATURES, C.OUTPUT_OBJECTIVE, C.OUTPUT_GRAD}
    theirs = {n for node in g.node for n in [*node.input, *node.output]} | {i.name for i in g.input}
    clash = sorted(n for n in theirs if n in ours or n.startswith((_P, _H, "grad/")))
    if clash:
        raise ModelError(f"the model uses tensor names reserved for the attack graph: {clash}")


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _check_input_shape(vi: onnx.ValueInfoProto, pre: C.Preprocessing) -> None:
    elem = vi.type.tensor_type.elem_type
    if elem != TensorProto.FLOAT:
        got = helper.tensor_dtype_to_string(elem)
        raise ModelError(f"model input {vi.name!r} must be float32, got {got}")
    dims = _dims(vi)
    h, w = pre.native_size
    expected = ["N", 3, h, w] if pre.layout == "NCHW" else ["N", h, w, 3]
    if len(dims) != 4 or any(
        isinstance(d, int) and d != e for d, e in zip(dims[1:], expected[1:], strict=True)
    ):
        raise ModelError(
            f"model input {vi.name!r} has shape {dims}; preprocessing ({pre.layout}, native size "
            f"{h}x{w}) expects {expected}"
        )


def _set_batch(vi: onnx.ValueInfoProto, batch: str | int) -> None:
    shape = vi.type.tensor_type.shape
    if not shape.dim:
        return
    d = shape.dim[0]
    d.Clear()
    if isinstance(batch, str):
        d.dim_param = batch
    else:
        d.dim_value = batch


def _static_dim(vi: onnx.ValueInfoProto, axis: int) -> int:
    dims = _dims(vi)
    if len(dims) <= axis or not isinstance(dims[axis], int):
        raise ModelError(f"{vi.name!r} needs a static dimension {axis}, got shape {dims}")
    return int(dims[axis])  # type: ignore[arg-type]


def _preprocessing_nodes(
    pre: C.Preprocessing, size: int, *, model_input: str
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, _P + name))
        return _P + name

    x = _P + "nchw"
    nodes.append(helper.make_node("Transpose", [C.INPUT_IMAGE], [x], perm=[0, 3, 1, 2], name=_P + "to_nchw"))
    h, w = pre.native_size
    top, left, bottom, right = pre.crop
    # A window may reach past the canonical crop (e.g. an ArcFace framing needs more forehead than the
    # crop holds); the resize then samples the crop's edge pixels there.
    if not (top < bottom and left < right):
        raise ModelError(f"crop window {pre.crop} must satisfy top < bottom and left < right")
    if (h, w) != (size, size) or pre.crop != (0.0, 0.0, 1.0, 1.0):
        rows = crop_resize_matrix(size, h, top * size, bottom * size, pre.resize)  # [h, S]
        cols = crop_resize_matrix(size, w, left * size, right * size, pre.resize)  # [w, S]
        nodes.append(
            helper.make_node("MatMul", [const("rows", rows), x], [_P + "rows_out"], name=_P + "rows")
        )
        nodes.append(
            helper.make_node(
                "MatMul",
                [_P + "rows_out", const("cols_t", np.ascontiguousarray(cols.T))],
                [_P + "resized"],
                name=_P + "cols",
            )
        )
        x = _P + "resized"
    # Colour order and (x - mean) / std as one 1x1 convolution: y_c = sum_k W[c, k] x_k + b_c.
    order = [0, 1, 2] if pre.channel_order == "RGB" else [2, 1, 0]
    std = np.asarray(pre.std, dtype=np.float64)
    mean = np.asarray(pre.mean, dtype=np.float64)
    if np.any(std == 0):
        raise ModelError(f"preprocessing std must be non-zero, got {pre.std}")
    weight = np.zeros((3, 3, 1, 1), dtype=np.float32)
    bias = np.zeros(3, dtype=np.float32)
    for out_c, in_c in enumerate(order):
        weight[out_c, in_c, 0, 0] = 1.0 / std[out_c]
        bias[out_c] = -mean[out_c] / std[out_c]
    normalised = _P + "normalised" if pre.layout == "NHWC" else model_input
    nodes.append(
        helper.make_node(
            "Conv",
            [x, const("colour_w", weight), const("colour_b", bias)],
            [normalised],
            kernel_shape=[1, 1],
            name=_P + "colour",
        )
    )
    if pre.layout == "NHWC":
        nodes.append(
            helper.make_node("Transpose", [normalised], [model_input], perm=[0, 2, 3, 1], name=_P + "to_nhwc")
        )
    return nodes, inits


def crop_resize_matrix(
    src: int, dst: int, start: float, stop: float, method: Literal["bilinear", "area"] = "bilinear"
) -> np.ndarray:
    """The ``[dst, src]`` matrix that crops the window ``[start, stop)`` of a length-``src`` axis and
    resamples it to ``dst`` pixels: the model's own crop + resize, folded into the attack graph.

    ``bilinear`` samples at pixel centres (half-pixel convention, borders clamped), like ONNX Resize
    ``linear``/``half_pixel`` without antialiasing (unlike the attacks' own
    :func:`uncnn_rt.runtime.attacks.linear.resize_matrix`, whose filter widens when shrinking).
    ``area`` averages the source over each output pixel's footprint (box filter), the right choice
    when shrinking by more than 2x; when enlarging it falls back to bilinear.
    """
    scale = (stop - start) / dst
    m = np.zeros((dst, src), dtype=np.float64)
    if method == "area" and scale > 1.0:
        for i in range(dst):
            a, b = start + i * scale, start + (i + 1) * scale
            for k in range(max(int(np.floor(a)), 0), min(int(np.ceil(b)), src)):
                m[i, k] = min(b, k + 1) - max(a, k)
        m /= np.maximum(m.sum(axis=1, keepdims=True), 1e-12)
        return m.astype(np.float32)
    if method not in ("bilinear", "area"):
        raise ModelError(f"resize must be 'bilinear' or 'area', got {method!r}")
    for i in range(dst):
        pos = start + (i + 0.5) * scale - 0.5
        pos = min(max(pos, 0.0), src - 1.0)
        lo = int(np.floor(pos))
        hi = min(lo + 1, src - 1)
        frac = pos - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m.astype(np.float32)


def _head_nodes(kind: str, outputs: str, model_output: str) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    flat = _H + "flat"
    nodes = [helper.make_node("Flatten", [model_output], [flat], axis=1, name=_H + "flatten")]
    inits: list[TensorProto] = []
    if kind == "face":
        if outputs != "embedding":
            raise ModelError(f"face models output an embedding, got outputs={outputs!r}")
        # features = z / sqrt(sum z^2 + eps): the unit embedding; eps keeps the gradient finite at z = 0.
        inits.append(numpy_helper.from_array(np.array([1e-12], dtype=np.float32), _H + "eps"))
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), _H + "axis1"))
        nodes += [
            helper.make_node("Mul", [flat, flat], [_H + "sq"]),
            helper.make_node("ReduceSum", [_H + "sq", _H + "axis1"], [_H + "sumsq"], keepdims=1),
            helper.make_node("Add", [_H + "sumsq", _H + "eps"], [_H + "sumsq_eps"]),
            helper.make_node("Sqrt", [_H + "sumsq_eps"], [_H + "norm"]),
            helper.make_node("Div", [flat, _H + "norm"], [C.OUTPUT_FEATURES]),
        ]
    elif outputs == "logits":
        nodes.append(helper.make_node("LogSoftmax", [flat], [C.OUTPUT_FEATURES], axis=1))
    elif outputs == "probabilities":
        inits.append(numpy_helper.from_array(np.array([1e-12], dtype=np.float32), _H + "eps"))
        nodes += [
            helper.make_node("Add", [flat, _H + "eps"], [_H + "p_eps"]),
            helper.make_node("Log", [_H + "p_eps"], [C.OUTPUT_FEATURES]),
        ]
    else:
        raise ModelError(f"classifier outputs must be 'logits' or 'probabilities', got {outputs!r}")
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), _H + "obj_axis"))
    nodes += [
        helper.make_node("Mul", [C.OUTPUT_FEATURES, C.INPUT_REFERENCE], [_H + "weighted"]),
        helper.make_node("ReduceSum", [_H + "weighted", _H + "obj_axis"], [C.OUTPUT_OBJECTIVE], keepdims=0),
    ]
    return nodes, inits


def _batch_problem(model: onnx.ModelProto, size: int) -> str | None:
    """Why a batch of 2 does not give the same features as two batches of 1 (a fixed-batch Reshape would
    not), in words; None when it does."""
    import onnxruntime as ort

    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value"):
        return None
    dim = _static_dim(model.graph.output[0], 1)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    refs = np.zeros((2, dim), dtype=np.float32)
    rejected = (
        ort.capi.onnxruntime_pybind11_state.Fail,
        ort.capi.onnxruntime_pybind11_state.InvalidArgument,
        ort.capi.onnxruntime_pybind11_state.RuntimeException,
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    try:
        both = sess.run([C.OUTPUT_FEATURES], {C.INPUT_IMAGE: images, C.INPUT_REFERENCE: refs})[0]
        one = np.concatenate(
            [
                sess.run(
                    [C.OUTPUT_FEATURES],
                    {C.INPUT_IMAGE: images[i : i + 1], C.INPUT_REFERENCE: refs[i : i + 1]},
                )[0]
                for i in range(2)
            ]
        )
    except rejected as exc:  # onnxruntime rejects the batch of 2 outright: a fixed-batch model
        return f"onnxruntime rejects the model ({_ort_reason(exc)})"
    if both.shape == one.shape and bool(np.allclose(both, one, rtol=1e-4, atol=1e-5)):
        return None
    return "its features differ from those of two batches of 1 (the model mixes the images of a batch)"


def _ort_reason(exc: Exception) -> str:
    """onnxruntime's error without its C++ source locations: the node and the status message."""
    text = " ".join(str(exc).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    message = text.split("Status Message:", 1)[-1].strip()
    message = re.sub(r"^\S+\.(?:h|cc):\d+ (?:\S+\(.*?\) )?", "", message)  # the C++ file and function
    message = re.sub(r"^[^.]* was false\. ", "", message)  # the failed assertion, when a sentence follows
    where = f"{node.group(1)} node {node.group(2)!r}: " if node else ""
    return where + message[:300]
