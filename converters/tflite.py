"""TensorFlow Lite flatbuffers (``.tflite``) to ONNX, through tf2onnx's TFLite reader.

TFLite models carry a fixed batch size (expo's MobileFaceNet declares ``[2, 112, 112, 3]``). When every
op of the converted graph is batch-agnostic apart from ``Reshape`` targets that repeat the fixed batch,
those targets are rewritten to ``0`` (copy the input's dim) and the batch is made dynamic; otherwise
the fixed batch is kept and callers feed that many images.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from uncnn_rt.converters import onnx_source
from uncnn_rt.converters.tfjs import import_tf2onnx, run_tf2onnx
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
        proto = run_tf2onnx(
            tf2onnx,
            None,
            name=src.stem,
            tflite_path=str(src),
            opset=opset,
            output_names=outputs,
            dequantize=True,
        )
    except Exception as exc:  # tf2onnx raises many exception types from deep inside
        raise ModelError(f"{src}: tf2onnx could not convert this TFLite model: {exc}") from exc
    proto = onnx_source.finalize(proto, name=src.stem, opset=opset)
    if dynamic_batch:
        proto = onnx_source.try_dynamic_batch(proto)
    return proto
