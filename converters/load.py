"""Any supported source model to a forward ONNX model, chosen by its file suffix.

Each converter module imports its framework (TensorFlow, tf2onnx, torch) only when it runs, so this table
can be imported by the CLI without any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from uncnn_rt.runtime.errors import InputError

if TYPE_CHECKING:
    import onnx

SOURCE_FORMATS: Final = (
    "ONNX (.onnx), TF.js graph model (model.json), TFLite (.tflite), "
    "Keras (.keras, .h5 or a SavedModel folder), TorchScript (.pt, .pth)"
)
"""The formats :func:`load_source` reads, as the CLI's help names them."""

InputShape = tuple[int, ...]


def from_onnx(path: Path) -> onnx.ModelProto:
    from uncnn_rt.converters import onnx_source

    return onnx_source.convert(path)


def from_tfjs(path: Path, *, outputs: list[str] | None = None) -> onnx.ModelProto:
    from uncnn_rt.converters import tfjs

    return tfjs.convert(path, outputs=outputs)


def from_tflite(path: Path) -> onnx.ModelProto:
    from uncnn_rt.converters import tflite

    return tflite.convert(path)


def from_keras(path: Path, *, input_shape: InputShape | None = None) -> onnx.ModelProto:
    """``input_shape`` without the batch, for models saved without a fixed one."""
    from uncnn_rt.converters import keras

    return keras.convert(path, input_shape=input_shape)


def from_torchscript(path: Path, *, input_shape: InputShape) -> onnx.ModelProto:
    """``input_shape`` with the batch: TorchScript files do not record it."""
    from uncnn_rt.converters import pytorch

    return pytorch.convert(path, input_shape=input_shape)


def _user_onnx(path: Path, input_shape: InputShape | None) -> onnx.ModelProto:
    # A user's file that does not parse is bad input (exit 2), not a broken shipped model (3).
    import onnx

    try:
        onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx its own: not ONNX either way
        raise InputError(f"{path}: not a readable ONNX model ({exc})") from exc
    return from_onnx(path)


def _keras(path: Path, input_shape: InputShape | None) -> onnx.ModelProto:
    return from_keras(path, input_shape=input_shape[1:] if input_shape else None)


def _torchscript(path: Path, input_shape: InputShape | None) -> onnx.ModelProto:
    if input_shape is None:
        raise InputError("a TorchScript model needs --input-shape, e.g. 1,3,112,112")
    return from_torchscript(path, input_shape=input_shape)


BY_SUFFIX: Final[dict[str, Callable[[Path, InputShape | None], onnx.ModelProto]]] = {
    ".keras": _keras,
    ".h5": _keras,
    ".json": lambda path, _: from_tfjs(path),
    ".tflite": lambda path, _: from_tflite(path),
    ".pt": _torchscript,
    ".pth": _torchscript,
    ".torchscript": _torchscript,
    ".onnx": _user_onnx,
}
"""The converter of each file suffix; a folder is a Keras SavedModel."""


def load_source(path: Path, input_shape: InputShape | None = None) -> onnx.ModelProto:
    """Convert the source model at ``path`` to a forward ONNX model, by its suffix.

    ``input_shape`` (with the batch) is required for TorchScript and used for Keras models saved without
    a fixed shape.

    Raises:
        InputError: an unsupported format, an unreadable ONNX file, or a TorchScript file without a shape.
    """
    suffix = path.suffix.lower()
    convert = _keras if path.is_dir() else BY_SUFFIX.get(suffix)
    if convert is None:
        raise InputError(
            f"{path}: unsupported model format {suffix or '(folder)'!r}; supported: {SOURCE_FORMATS}"
        )
    return convert(path, input_shape)
