"""ONNX passthrough, and the finishing step every source converter applies to its output.

A user's own ONNX export (any face model) is validated, brought to :data:`TARGET_OPSET`, and given fixed
producer fields so that the same source always serialises to the same bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from uncnn_rt.runtime.errors import InputError, ModelError

TARGET_OPSET = 17
PRODUCER_NAME = "uncnn-rt"
PRODUCER_VERSION = "1"
BATCH_DIM = "N"


def load_onnx(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX file; raises :class:`InputError` or :class:`ModelError`."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError or a bare google.protobuf error
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelError("model imports no ai.onnx opset; expected a standard ONNX model")


def finalize(
    model: onnx.ModelProto, *, name: str | None = None, opset: int = TARGET_OPSET
) -> onnx.ModelProto:
    """Validate ``model``, convert it to ``opset``, and fix the fields that would make serialisation vary.

    Only ``ai.onnx`` ops are accepted: the attack graph must run on stock onnxruntime on any provider.
    """
    foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ModelError(f"model uses ops from non-standard domains {foreign}; expected only ai.onnx ops")
    current = ai_onnx_opset(model)
    if current != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as exc:
            raise ModelError(f"cannot convert the model from opset {current} to {opset}: {exc}") from exc
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    # The lowest IR version that carries the opset: readable by the widest range of onnxruntime builds.
    model.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    model.producer_name = PRODUCER_NAME
    model.producer_version = PRODUCER_VERSION
    model.domain = ""
    model.model_version = 0
    model.doc_string = ""
    model.graph.doc_string = ""
    if name is not None:
        model.graph.name = name
    for node in model.graph.node:
        node.doc_string = ""
    canonical_names(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"converted model fails the ONNX checker: {exc}") from exc
    for value in list(model.graph.input) + list(model.graph.output):
        elem = value.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise ModelError(
                f"{value.name}: expected a float32 input/output, got {onnx.TensorProto.DataType.Name(elem)}"
            )
    return model


_COUNTER = re.compile(r"__\d+")


def canonical_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Renumber converter-generated names (``Conv__1762``, ``const_fold_opt__803``) by graph position.

    tf2onnx numbers the tensors and nodes it creates with a process-wide counter, and the order of
    its optimizer passes depends on set iteration (so on ``PYTHONHASHSEED``): the same model would
    get different names, and different bytes, on each run. Renumbering in node order makes the
    names a function of the graph alone. Graph inputs and outputs keep their names.
    """
    graph = model.graph
    keep = {v.name for v in list(graph.input) + list(graph.output)}
    mapping: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep or not _COUNTER.search(name):
            return name
        if name not in mapping:
            mapping[name] = _COUNTER.sub("", name) + f"__{len(mapping)}"
        return mapping[name]

    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for i, node in enumerate(graph.node):
        if _COUNTER.search(node.name) or not node.name:
            node.name = f"{node.op_type}__n{i}"
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for value in graph.value_info:
        value.name = rename(value.name)
    inits = sorted(graph.initializer, key=lambda t: t.name)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


def make_batch_dynamic(model: onnx.ModelProto, dim_name: str = BATCH_DIM) -> onnx.ModelProto:
    """Name the leading dimension of every graph input and output ``dim_name`` when it is not fixed.

    Converters leave unknown batch dims as ``-1`` or generated names (``unk__123``); one shared name
    tells onnxruntime and readers that inputs and outputs share the batch size. Fixed dims stay fixed.
    """
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dims[0].Clear()
            dims[0].dim_param = dim_name
    return model


def batch_is_dynamic(model: onnx.ModelProto) -> bool:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def try_dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make the leading dim symbolic when the fixed batch only appears in ``Reshape`` targets.

    A ``Reshape`` whose constant target starts with the fixed batch is given ``0`` there ("copy the
    input's dim"), which is exact as long as the reshaped tensor still has the batch as its first dim;
    the result is checked against the fixed model, row for row, at batch 1 and twice the fixed batch.
    """
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value"):
        return model
    fixed = dims[0].dim_value
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    inits = {t.name: t for t in candidate.graph.initializer}
    for node in candidate.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        target = numpy_helper.to_array(inits[node.input[1]]).copy()
        if target.ndim == 1 and target.size and target[0] == fixed:
            target[0] = 0
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(target.astype(np.int64), node.input[1]))
    for value in list(candidate.graph.input) + list(candidate.graph.output):
        vdims = value.type.tensor_type.shape.dim
        if vdims and vdims[0].HasField("dim_value") and vdims[0].dim_value == fixed:
            vdims[0].Clear()
            vdims[0].dim_param = BATCH_DIM
    del candidate.graph.value_info[:]
    return candidate if _same_rows(model, candidate, fixed) else model


def _same_rows(fixed_model: onnx.ModelProto, dynamic_model: onnx.ModelProto, fixed: int) -> bool:
    """Does the rewritten model give, row for row, what the fixed-batch model gives (batches 1 and 2x)?"""
    import onnxruntime as ort

    inp = fixed_model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).uniform(-1, 1, size=[2 * fixed, *shape[1:]]).astype(np.float32)
    try:
        ref = ort.InferenceSession(fixed_model.SerializeToString(), providers=["CPUExecutionProvider"])
        dyn = ort.InferenceSession(dynamic_model.SerializeToString(), providers=["CPUExecutionProvider"])
        want = [
            np.concatenate(parts)
            for parts in zip(
                ref.run(None, {inp.name: x[:fixed]}), ref.run(None, {inp.name: x[fixed:]}), strict=True
            )
        ]
        got_all = dyn.run(None, {inp.name: x})
        got_one = dyn.run(None, {inp.name: x[:1]})
    except Exception:  # onnxruntime rejects the rewritten graph: keep the fixed batch
        return False
    return all(
        w.shape == a.shape and np.allclose(w, a, atol=1e-5) and np.allclose(w[:1], o, atol=1e-5)
        for w, a, o in zip(want, got_all, got_one, strict=True)
    )


def convert(
    path: str | Path | onnx.ModelProto, *, dynamic_batch: bool = True, opset: int = TARGET_OPSET
) -> onnx.ModelProto:
    """ONNX passthrough: load, validate and convert to ``opset`` (float32 inputs and outputs required).

    With ``dynamic_batch``, a fixed batch of 1 is made symbolic where the graph allows it
    (:func:`try_dynamic_batch`).
    """
    model = load_onnx(path)
    if not model.graph.input:
        raise ModelError("ONNX model has no graph inputs; expected one image input")
    initializers = {t.name for t in model.graph.initializer}
    real_inputs = [v for v in model.graph.input if v.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    model = make_batch_dynamic(finalize(model, opset=opset))
    return try_dynamic_batch(model) if dynamic_batch else model
