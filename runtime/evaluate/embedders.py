"""Faces and face recognizers as the evaluation sees them.

A *face finder* gives the faces of a photo, each with its crop transform; an :class:`Embedder` gives
unit embeddings of faces and carries its match threshold. Shipped recognizers and attack graphs are
:class:`SessionEmbedder`; any other ONNX face model is an :class:`OnnxEmbedder`, read as its
:class:`OnnxPreprocessing` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol

import numpy as np

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.arrays import Float32Array, Float64Array, Uint8Array
from uncnn_rt.runtime.attacks import Resize
from uncnn_rt.runtime.contract import CANONICAL_SIZE, META_KIND, META_THRESHOLD
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.geometry.align import canonical_to_arcface112
from uncnn_rt.runtime.geometry.faces import Detector, FaceSite, find_faces, sites_from_detections
from uncnn_rt.runtime.geometry.warp import Warp, invert_affine
from uncnn_rt.runtime.sessions import AttackSession, open_session, plain_session, run_chunked

FaceFinder = Callable[[Uint8Array], Sequence[FaceSite]]
"""The faces of a photo ``[H, W, 3]``, each with its crop transform (empty when none is found)."""


def whole_image_faces(rgb: Uint8Array) -> list[FaceSite]:
    """Aligned chips: the centred square of the whole image is the face."""
    return find_faces(rgb, None, no_align=True)


def detected_faces(detector: Detector) -> FaceFinder:
    """Faces found by ``detector``, aligned on their landmarks, left to right."""

    def finder(rgb: Uint8Array) -> list[FaceSite]:
        return sites_from_detections(detector.detect(rgb), CANONICAL_SIZE)

    return finder


def main_face(sites: Sequence[FaceSite]) -> FaceSite | None:
    """The largest face (the subject of a one-person photo), or None."""
    return max(sites, key=lambda s: s.area) if sites else None


@dataclass(frozen=True)
class FaceView:
    """A face to embed: the photo and where the face is in it."""

    rgb: Uint8Array = field(repr=False)
    site: FaceSite


class Embedder(Protocol):
    """A face recognizer as evaluation sees it: unit embeddings of faces, and a match threshold."""

    @property
    def name(self) -> str: ...

    @property
    def threshold(self) -> float: ...

    @property
    def duplicate_of(self) -> str | None:
        """The name of a model this one is the same network as, or None."""
        ...

    def embed(self, faces: Sequence[FaceView]) -> Float32Array:
        """``[N, D]`` unit embeddings."""
        ...


class SessionEmbedder:
    """A face-model attack graph (a shipped recognizer, or one built by ``uncnn-rt convert grad``)."""

    def __init__(
        self, session: AttackSession, *, threshold: float | None = None, duplicate_of: str | None = None
    ) -> None:
        chosen = session.info.threshold if threshold is None else threshold
        if session.info.kind != "face":
            raise ModelError(f"{session.path}: a {session.info.kind} model, evaluation needs a face model")
        if chosen is None:
            raise InputError(f"{session.path}: the model has no match threshold; give one (--threshold)")
        self.session = session
        self._threshold = float(chosen)
        self._duplicate_of = duplicate_of

    @property
    def name(self) -> str:
        return self.session.name

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def duplicate_of(self) -> str | None:
        return self._duplicate_of

    def embed(self, faces: Sequence[FaceView]) -> Float32Array:
        size = self.session.info.canonical_size
        if not faces:
            return np.zeros((0, self.session.info.embedding_dim), np.float32)
        # One batch per crop size (the same warp as cloak.embed, run as one onnxruntime call).
        out = np.empty((len(faces), self.session.info.embedding_dim), np.float32)
        by_size: dict[int, list[int]] = {}
        for i, f in enumerate(faces):
            by_size.setdefault(f.site.size, []).append(i)
        for crop, members in by_size.items():
            crops = np.stack(
                [
                    Warp(faces[i].site.crop_to_photo, faces[i].rgb.shape, crop).apply(faces[i].rgb)
                    for i in members
                ]
            )
            if crop != size:
                crops = Resize((crop, crop), (size, size)).forward(crops)
            out[members] = self.session.features(crops)
        return out


WINDOWS: Final = ("arcface", "full")


@dataclass(frozen=True)
class OnnxPreprocessing:
    """How a plain ONNX face model wants its input.

    ``window`` frames the model's input in the canonical crop: ``arcface`` (the 5-point ArcFace
    112 x 112 framing, taken from the photo itself, so it may reach past the canonical crop),
    ``full`` (the canonical crop), or ``(top, left, bottom, right)`` fractions of the canonical crop.
    The crop is resampled to ``size`` (default: the model's fixed input size), put in ``channel_order``,
    normalised as ``(pixel - mean) / std`` in 0..255 units, and laid out as the model's input says
    (NCHW when its channel axis is 1, else NHWC).

    Not :class:`~uncnn_rt.runtime.contract.Preprocessing`, which converters fold into an attack graph
    and which works on the canonical crop's own pixels: the ``arcface`` window is a similarity
    transform that reaches past that crop (it needs forehead the crop does not hold), so the face is
    resampled straight from the photo; the size and layout may be left to the model's input; and the
    defaults are those of ArcFace-style models, ``(pixel - 127.5) / 127.5``.
    """

    window: str | tuple[float, float, float, float] = "arcface"
    size: int | None = None
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    channel_order: Literal["RGB", "BGR"] = "RGB"


class OnnxEmbedder:
    """A plain ONNX face model (no attack-graph metadata): embeddings L2-normalised from its first output.

    Raises:
        ModelError: the file cannot be loaded or its input is not one RGB image batch.
        InputError: the input size is dynamic and no ``size`` was given.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threshold: float,
        preprocessing: OnnxPreprocessing = OnnxPreprocessing(),
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._session = plain_session(self.path, device=device)
        inputs = self._session.get_inputs()
        shape = list(inputs[0].shape)
        if len(inputs) != 1 or len(shape) != 4 or 3 not in (shape[1], shape[3]):
            raise ModelError(
                f"{self.path}: expected one image input [N, 3, H, W] or [N, H, W, 3], got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        self._input = inputs[0].name
        self._nchw = shape[1] == 3
        spatial = shape[2:4] if self._nchw else shape[1:3]
        fixed = [d for d in spatial if isinstance(d, int) and d > 0]
        if preprocessing.size is not None:
            self.size = int(preprocessing.size)
        elif len(fixed) == 2 and fixed[0] == fixed[1]:
            self.size = int(fixed[0])
        else:
            raise InputError(
                f"{self.path}: input {shape} has no fixed square size; give one (--evaluator-size)"
            )
        self._batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.preprocessing = preprocessing
        self._threshold = float(threshold)
        self._name = name or self.path.stem

    @property
    def name(self) -> str:
        return self._name

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def duplicate_of(self) -> str | None:
        return None

    def input_matrix(self, site: FaceSite) -> Float64Array:
        """2x3 map from the model's ``size x size`` input pixels to photo coordinates."""
        n, s = self.size, site.size
        window = self.preprocessing.window
        if window == "arcface":
            to_canonical = invert_affine(canonical_to_arcface112(s)) @ _scale3(112.0 / n, 112.0 / n)
        else:
            top, left, bottom, right = (0.0, 0.0, 1.0, 1.0) if isinstance(window, str) else window
            to_canonical = np.array(
                [[s * (right - left) / n, 0.0, s * left], [0.0, s * (bottom - top) / n, s * top]]
            )
        return np.asarray(site.crop_to_photo @ np.vstack([to_canonical, [0.0, 0.0, 1.0]]), np.float64)

    def preprocess(self, faces: Sequence[FaceView]) -> Float32Array:
        p = self.preprocessing
        crops = np.stack(
            [Warp(self.input_matrix(f.site), f.rgb.shape, self.size).apply(f.rgb) for f in faces]
        )
        if p.channel_order == "BGR":
            crops = crops[..., ::-1]
        scaled = (crops - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
        if self._nchw:
            scaled = scaled.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(scaled, dtype=np.float32)

    def embed(self, faces: Sequence[FaceView]) -> Float32Array:
        if not faces:
            return np.zeros((0, 0), np.float32)

        def first_output(feeds: dict[str, Float32Array]) -> list[Float32Array]:
            out = np.asarray(self._session.run(None, feeds)[0], np.float32)
            return [out.reshape(feeds[self._input].shape[0], -1)]

        (features,) = run_chunked(first_output, {self._input: self.preprocess(faces)}, self._batch)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return np.asarray(features / np.maximum(norms, 1e-12), np.float32)


def _scale3(sx: float, sy: float) -> Float64Array:
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def open_evaluator(
    path: str | Path,
    *,
    threshold: float | None = None,
    preprocessing: OnnxPreprocessing = OnnxPreprocessing(),
    device: str = "auto",
) -> Embedder:
    """A user's face model as an evaluator.

    An attack graph (``uncnn-rt convert grad``; its metadata carries the preprocessing and, usually,
    the threshold) is used as it is. Any other ONNX file is a plain model, read with ``preprocessing``;
    it needs ``threshold``.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: evaluator model not found")
    metadata = dict(plain_session(file, device="cpu").get_modelmeta().custom_metadata_map)
    if META_KIND in metadata:
        if threshold is None and META_THRESHOLD not in metadata:
            raise InputError(f"{file}: the attack graph has no threshold; give one (--threshold)")
        return SessionEmbedder(open_session(file, device=device), threshold=threshold)
    if threshold is None:
        raise InputError(f"{file}: a plain ONNX model needs a match threshold (--threshold)")
    return OnnxEmbedder(file, threshold=threshold, preprocessing=preprocessing, device=device)


def shipped_embedders(sessions: Sequence[AttackSession]) -> list[Embedder]:
    """Embedders over shipped recognizers, with the manifest's ``duplicate_of`` notes."""
    duplicates = {e.name: e.raw.get("duplicate_of") for e in catalog.load_manifest()}
    return [SessionEmbedder(s, duplicate_of=duplicates.get(s.name)) for s in sessions]
