"""TensorFlow Lite flatbuffers (``.tflite``) to ONNX, through tf2onnx's TFLite reader.

TFLite models carry a fixed batch size (expo's MobileFaceNet declares ``[2, 112, 112, 3]``). When every
op of the converted graph is batch-agnostic apart from ``Reshape`` targets that repeat the fixed batch,
those targets are rewritten to ``0`` (copy the input's dim) and the batch is made dynamic; otherwise
the fixed batch is kept and callers feed that many images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from uncnn_rt.converters import onnx_source
from uncnn_rt.converters.tfjs import import_tf2onnx
from uncnn_rt.runtime.errors import InputError, ModelError

TFLITE_MAGIC = b"TFL3"


def convert(
    path: str | Path,
    *,
    outputs: list[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = onnx_source.TARGET_OPSET,
) -> onnx.ModelProto:
    """Convert a ``.tflite`` model to a forward ONNX model (float32 models; quantized ones are dequantized).

    ``outputs`` optionally names the TFLite output tensors to keep. With ``dynamic_batch`` the fixed
    TFLite batch is replaced by a symbolic one where the graph allows it (see the module docstring).
    """
    src = Path(path)
    if not src.is_file():
        raise InputError(f"{src}: no such TFLite file")
    with src.open("rb") as fh:
        head = fh.read(8)
    if head[4:8] != TFLITE_MAGIC:
        raise InputError(f"{src}: not a TFLite flatbuffer (expected the 'TFL3' identifier at byte 4)")
    tf2onnx = import_tf2onnx()
    try:
        # _convert_common rather than from_tflite: from_tflite sets continue_on_error, which would
        # leave unsupported TFLite ops in the graph instead of failing here.
        proto, _ = tf2onnx.convert._convert_common(
            None, name=src.stem, tflite_path=str(src), opset=opset, output_names=outputs, dequantize=True
        )
    except Exception as exc:  # tf2onnx raises many exception types from deep inside
        raise ModelError(f"{src}: tf2onnx could not convert this TFLite model: {exc}") from exc
    proto = onnx_source.finalize(proto, name=src.stem, opset=opset)
    if dynamic_batch:
        proto = try_dynamic_batch(proto)
    return proto


def try_dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make the leading dim symbolic when the fixed batch only appears in ``Reshape`` targets.

    A ``Reshape`` whose constant target starts with the fixed batch is given ``0`` there ("copy the
    input's dim"), which is exact as long as the reshaped tensor still has the batch as its first dim;
    the result is checked by running batch sizes 1 and the original batch and comparing rows.
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
            vdims[0].dim_param = onnx_source.BATCH_DIM
    del candidate.graph.value_info[:]
    return candidate if _same_rows(model, candidate, fixed) else model


def _same_rows(fixed_model: onnx.ModelProto, dynamic_model: onnx.ModelProto, fixed: int) -> bool:
    import onnxruntime as ort

    inp = fixed_model.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).uniform(-1, 1, size=shape).astype(np.float32)
    try:
        ref = ort.InferenceSession(fixed_model.SerializeToString(), providers=["CPUExecutionProvider"])
        dyn = ort.InferenceSession(dynamic_model.SerializeToString(), providers=["CPUExecutionProvider"])
        want = ref.run(None, {inp.name: x})
        got_full = dyn.run(None, {inp.name: x})
        got_one = dyn.run(None, {inp.name: x[:1]})
    except Exception:  # onnxruntime rejects the rewritten graph: keep the fixed batch
        return False
    return all(
        np.allclose(w, f, atol=1e-5) and np.allclose(w[:1], o, atol=1e-5)
        for w, f, o in zip(want, got_full, got_one)
    )
