"""Keras models (``.keras``, ``.h5``, a SavedModel folder, or a model object) to ONNX, through tf2onnx.

The model is traced as a ``tf.function`` with a dynamic batch dimension and its frozen graph converted,
so Keras 3 models and legacy ``tf_keras`` models go through the same path. Files are loaded with
Keras 3 first and with ``tf_keras`` (Keras 2) when Keras 3 cannot read them (older ``.h5`` files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from uncnn_rt.converters import onnx_source
from uncnn_rt.converters.tfjs import import_tf2onnx, run_tf2onnx
from uncnn_rt.runtime.errors import InputError, ModelError

INPUT_NAME = "input"


def load_model(path: str | Path, *, safe_mode: bool = True) -> Any:
    """Load a Keras model file or a SavedModel folder (returns a Keras model or a loaded SavedModel).

    ``safe_mode=False`` lets Keras 3 deserialise ``Lambda`` layers (FaceNet's residual scaling is
    written with them); that runs code stored in the file, so use it only for files you trust.
    """
    src = Path(path)
    import_tf2onnx()  # tensorflow with the numpy shims, and a clear error without the extra
    import tensorflow as tf

    if src.is_dir():
        if not (src / "saved_model.pb").is_file():
            raise InputError(f"{src}: a folder must be a TensorFlow SavedModel (no saved_model.pb inside)")
        try:
            return tf.saved_model.load(str(src))
        except Exception as exc:
            raise ModelError(f"{src}: TensorFlow could not load this SavedModel: {exc}") from exc
    if not src.is_file():
        raise InputError(f"{src}: no such Keras model file")
    if src.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise InputError(f"{src}: expected a .keras or .h5 file or a SavedModel folder, got '{src.suffix}'")
    import keras

    errors = []
    try:
        return keras.saving.load_model(str(src), compile=False, safe_mode=safe_mode)
    except Exception as exc:  # keras raises ValueError/TypeError/OSError for files it cannot read
        errors.append(f"keras {keras.__version__}: {exc}")
    if src.suffix.lower() != ".keras":
        try:
            import tf_keras

            return tf_keras.models.load_model(str(src), compile=False)
        except ImportError:
            errors.append("tf_keras is not installed")
        except Exception as exc:
            errors.append(f"tf_keras: {exc}")
    hint = " (Lambda layers need safe_mode=False)" if safe_mode and "Lambda" in " ".join(errors) else ""
    raise ModelError(f"{src}: cannot load the Keras model{hint}: " + "; ".join(errors))


def _serving_function(model: Any, input_shape: tuple[int, ...] | None) -> tuple[Any, Any]:
    """A ``tf.function`` calling ``model`` in inference mode, and its one-input signature."""
    import tensorflow as tf

    signatures = getattr(model, "signatures", None)
    if signatures is not None and not callable(getattr(model, "predict", None)):
        # A plain SavedModel: use its serving signature, which already fixes the input spec.
        if "serving_default" not in signatures:
            raise ModelError(f"SavedModel has no serving_default signature (has {sorted(signatures)})")
        fn = signatures["serving_default"]
        specs = [s for s in fn.structured_input_signature[1].values()]
        if len(specs) != 1:
            raise ModelError(f"expected a SavedModel signature with one input, got {len(specs)}")
        spec = specs[0]
        return tf.function(lambda x: fn(**{spec.name: x})), tf.TensorSpec(spec.shape, tf.float32, INPUT_NAME)
    inputs = getattr(model, "inputs", None)
    if input_shape is None:
        if not inputs or len(inputs) != 1:
            raise ModelError("expected a Keras model with exactly one input (or pass input_shape)")
        input_shape = tuple(int(d) if d is not None else -1 for d in inputs[0].shape[1:])
        if any(d < 0 for d in input_shape):
            raise InputError(f"the model's input shape {inputs[0].shape} is not fixed; pass input_shape")
    spec = tf.TensorSpec((None, *input_shape), tf.float32, name=INPUT_NAME)
    return tf.function(lambda x: model(x, training=False)), spec


def _renames(input_names: list[str], output_names: list[str]) -> dict[str, str]:
    """Plain names for the graph's tensors: ``input``, and ``output`` (or ``output_<i>`` for several)."""
    renames = {input_names[0]: INPUT_NAME}
    if len(output_names) == 1:
        renames[output_names[0]] = "output"
    else:
        renames.update({name: f"output_{i}" for i, name in enumerate(output_names)})
    return renames


def convert(
    source: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    safe_mode: bool = True,
    opset: int = onnx_source.TARGET_OPSET,
) -> onnx.ModelProto:
    """Convert a Keras model (object, ``.keras``/``.h5`` file or SavedModel folder) to forward ONNX.

    ``input_shape`` is the per-sample input shape (no batch, e.g. ``(160, 160, 3)``) when the model
    does not fix it. The ONNX input is ``input`` with a dynamic batch; the output is ``output`` (or
    ``output_0``, ``output_1``, ... in the model's order).
    """
    tf2onnx = import_tf2onnx()
    model = load_model(source, safe_mode=safe_mode) if isinstance(source, str | Path) else source
    fn, spec = _serving_function(model, input_shape)
    try:
        concrete = fn.get_concrete_function(spec)
        input_names = [t.name for t in concrete.inputs if t.dtype.name != "resource"]
        output_names = [t.name for t in concrete.outputs if t.dtype.name != "resource"]
        frozen = tf2onnx.tf_loader.from_function(concrete, input_names, output_names)
        proto = run_tf2onnx(
            tf2onnx,
            frozen,
            name="keras_model",
            opset=opset,
            input_names=input_names,
            output_names=output_names,
            tensors_to_rename=_renames(input_names, output_names),
        )
    except (InputError, ModelError):
        raise
    except Exception as exc:  # tf tracing and tf2onnx raise many exception types
        raise ModelError(f"tf2onnx could not convert this Keras model: {exc}") from exc
    return onnx_source.make_batch_dynamic(onnx_source.finalize(proto, name="keras_model", opset=opset))
