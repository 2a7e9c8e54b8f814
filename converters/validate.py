"""Checks that an attack graph computes what its source model computes, and that its gradient is right.

Two checks, both on a sample image:

* features: the source model run on the sample (preprocessed in numpy with the same crop/resize
  matrices, colour order and normalisation) equals the attack graph's ``features`` after the head;
* gradient: a directional finite difference of ``objective`` along ``v = sign(grad)`` (the FGSM
  direction, where the derivative ``<grad, v> = |grad|_1`` is large, so float32 round-off does not
  drown it) matches ``<grad, v>`` (central differences, step ``h`` pixel units, on onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from uncnn_rt.converters.calibrate import preprocess
from uncnn_rt.runtime import contract as C
from uncnn_rt.runtime.errors import ModelError


@dataclass(frozen=True)
class ValidationReport:
    features_max_abs_error: float
    grad_directional: float
    finite_difference: float
    grad_relative_error: float

    @property
    def ok(self) -> bool:
        return self.features_max_abs_error < 1e-3 and self.grad_relative_error < 2e-2

    def describe(self) -> str:
        return (
            f"features max |error| {self.features_max_abs_error:.2e}; "
            f"<grad, v> {self.grad_directional:.5g} vs finite difference {self.finite_difference:.5g} "
            f"(relative error {self.grad_relative_error:.2e})"
        )


def sample_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth, deterministic RGB test image ``[size, size, 3]`` in 0..255 (no data files needed)."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    rng = np.random.default_rng(seed)
    channels = [
        127 + 100 * np.sin(2 * np.pi * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0.3, 2.0, (3, 3))
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.float32)


def _head(raw: np.ndarray, kind: str, outputs: str) -> np.ndarray:
    z = raw.reshape(raw.shape[0], -1).astype(np.float64)
    if kind == "face":
        return z / np.sqrt((z * z).sum(axis=1, keepdims=True) + 1e-12)
    if outputs == "probabilities":
        return np.log(z + 1e-12)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def validate_attack_graph(
    attack: onnx.ModelProto,
    source: onnx.ModelProto,
    *,
    image: np.ndarray | None = None,
    outputs: str | None = None,
    h: float = 0.25,
    seed: int = 0,
) -> ValidationReport:
    """Run both checks; ``image`` is ``[S, S, 3]`` RGB 0..255 (a smooth synthetic one by default)."""
    meta = {p.key: p.value for p in attack.metadata_props}
    try:
        kind = meta[C.META_KIND]
        size = int(meta[C.META_CANONICAL_SIZE])
        pre = C.Preprocessing.from_json(meta[C.META_PREPROCESSING])
    except KeyError as exc:
        raise ModelError(f"attack graph lacks metadata {exc}") from exc
    outputs = outputs or ("embedding" if kind == "face" else "logits")
    sample = (image if image is not None else sample_image(size, seed)).astype(np.float32)[None]
    if sample.shape[1:] != (size, size, 3):
        raise ModelError(f"sample image must be {size}x{size}x3, got {sample.shape[1:]}")

    providers = ["CPUExecutionProvider"]
    src = ort.InferenceSession(source.SerializeToString(), providers=providers)
    data_inputs = [i for i in src.get_inputs()]
    expected = _head(src.run(None, {data_inputs[0].name: preprocess(sample, pre)})[0], kind, outputs)

    sess = ort.InferenceSession(attack.SerializeToString(), providers=providers)
    dim = expected.shape[1]
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal((1, dim)).astype(np.float32)
    if kind == "face":
        reference /= np.linalg.norm(reference)
    feats, _, grad = sess.run(None, {C.INPUT_IMAGE: sample, C.INPUT_REFERENCE: reference})
    feat_err = float(np.abs(feats.astype(np.float64) - expected).max())

    v = np.sign(grad).astype(np.float32)

    def objective(x: np.ndarray) -> float:
        return float(sess.run([C.OUTPUT_OBJECTIVE], {C.INPUT_IMAGE: x, C.INPUT_REFERENCE: reference})[0][0])

    fd = (objective(sample + h * v) - objective(sample - h * v)) / (2 * h)
    directional = float((grad.astype(np.float64) * v).sum())
    rel = abs(directional - fd) / max(abs(directional), abs(fd), 1e-12)
    return ValidationReport(feat_err, directional, fd, rel)
