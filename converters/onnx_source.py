"""ONNX passthrough, and the finishing step every source converter applies to its output.

A user's own ONNX export (any face model) is validated, brought to :data:`TARGET_OPSET`, and given fixed
producer fields so that the same source always serialises to the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import version_converter

from uncnn_rt.runtime.errors import InputError, ModelError

TARGET_OPSET = 17
PRODUCER_NAME = "uncnn-rt"
PRODUCER_VERSION = "1"
BATCH_DIM = "N"


def load_onnx(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX file (or pass a ``ModelProto`` through), raising :class:`InputError` / :class:`ModelError`."""
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


def finalize(model: onnx.ModelProto, *, name: str | None = None, opset: int = TARGET_OPSET) -> onnx.ModelProto:
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


def convert(path: str | Path | onnx.ModelProto, *, opset: int = TARGET_OPSET) -> onnx.ModelProto:
    """ONNX passthrough: load, validate and convert to ``opset`` (float32 inputs and outputs required)."""
    model = load_onnx(path)
    if not model.graph.input:
        raise ModelError("ONNX model has no graph inputs; expected one image input")
    initializers = {t.name for t in model.graph.initializer}
    real_inputs = [v for v in model.graph.input if v.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    return make_batch_dynamic(finalize(model, opset=opset))
