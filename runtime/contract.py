"""The attack-graph contract shared by converters (which emit it) and runtime (which consumes it).

Every victim model ships as one ONNX file made of standard ``ai.onnx`` ops:

inputs
    ``image``      float32 ``[N, S, S, 3]``, RGB, values 0..255 (the canonical crop)
    ``reference``  float32 ``[N, D]`` (unit embedding for face models, class weights for classifiers)
outputs
    ``features``   float32 ``[N, D]`` (L2-normalised embedding, or log-softmax for classifiers)
    ``objective``  float32 ``[N]`` = ``sum(features * reference, axis=1)``
    ``grad``       float32 ``[N, S, S, 3]`` = d objective / d image

Untargeted attacks descend the objective; targeted attacks ascend it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Final, Literal

INPUT_IMAGE: Final = "image"
INPUT_REFERENCE: Final = "reference"
OUTPUT_FEATURES: Final = "features"
OUTPUT_OBJECTIVE: Final = "objective"
OUTPUT_GRAD: Final = "grad"

ModelKind = Literal["face", "classifier"]
KINDS: Final[tuple[str, ...]] = ("face", "classifier")
CANONICAL_SIZE: Final = 224
"""Side of the canonical face crop every face model is framed in (BlazeFace's six landmarks at fixed
places; :mod:`uncnn_rt.runtime.geometry.align`); a model's own input size is resampled from it."""

# Keys of the ONNX ``metadata_props`` every attack graph carries. Values are strings;
# structured values (preprocessing, labels) are JSON.
META_NAME: Final = "uncnn.name"
META_KIND: Final = "uncnn.kind"
META_CANONICAL_SIZE: Final = "uncnn.canonical_size"
META_NATIVE_SIZE: Final = "uncnn.native_size"
META_PREPROCESSING: Final = "uncnn.preprocessing"
META_EMBEDDING_DIM: Final = "uncnn.embedding_dim"
META_THRESHOLD: Final = "uncnn.threshold"
META_LABELS: Final = "uncnn.labels"
META_CONTRACT_VERSION: Final = "uncnn.contract_version"
CONTRACT_VERSION: Final = "1"


@dataclass(frozen=True)
class Preprocessing:
    """How a source model expects its input, folded into the attack graph by the converters.

    The canonical crop (``[N, S, S, 3]`` RGB 0..255) is cut to the window ``crop`` (fractions
    ``top, left, bottom, right`` of the crop), resized to ``native_size`` with ``resize``, reordered to
    ``channel_order``, normalised as ``(pixel - mean) / std`` per channel (0..255 units), and laid out
    as ``layout``.
    """

    native_size: tuple[int, int]
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    resize: Literal["bilinear", "area"] = "bilinear"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"preprocessing must be a JSON object, got {type(raw).__name__}")
        return cls(
            native_size=_pair(raw["native_size"]),
            layout=raw.get("layout", "NHWC"),
            channel_order=raw.get("channel_order", "RGB"),
            mean=_triple(raw.get("mean", (0.0, 0.0, 0.0))),
            std=_triple(raw.get("std", (1.0, 1.0, 1.0))),
            crop=_quad(raw.get("crop", (0.0, 0.0, 1.0, 1.0))),
            resize=raw.get("resize", "bilinear"),
        )


def _numbers(v: object, n: int) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise ValueError(f"expected a list of {n} numbers, got {v!r}")
    return [float(x) for x in v]


def _pair(v: object) -> tuple[int, int]:
    a, b = _numbers(v, 2)
    return int(a), int(b)


def _triple(v: object) -> tuple[float, float, float]:
    a, b, c = _numbers(v, 3)
    return a, b, c


def _quad(v: object) -> tuple[float, float, float, float]:
    a, b, c, d = _numbers(v, 4)
    return a, b, c, d
