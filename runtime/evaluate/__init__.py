"""Measure protection the way ``DESIGN.md`` ("Evaluation protocol") defines it.

**Dataset.** One folder per identity, at least 2 photos each. Every clean photo is embedded by every
evaluator (a face recognizer with a match threshold); the clean embeddings form the gallery.

**Recognized.** A probe is recognized when its nearest *other* gallery photo (cosine similarity) is of
the same identity and the similarity is at least the evaluator's threshold. Only probes that are
recognized when clean are *eligible*: protection is counted over them and nothing else.

**P1, probe cloaked** (the LinkedIn case): the cloaked photo ``i`` is searched against every clean
photo except the clean original of ``i``. Protection = share of eligible probes no longer recognized.

**P2, gallery cloaked** (the scraping case): the clean photo ``i`` is searched against a gallery in
which the *other photos of i's identity are their cloaked versions* and everyone else's photos are
clean (the person cloaked every photo they uploaded; nobody else did). Protection = share of eligible
probes no longer recognized. P2 needs every photo of an identity cloaked, so ``limit`` takes whole
identities; the photos of the other identities stay in the gallery, clean.

**Conditions.** The cloaked photo is first encoded as ``uncnn-rt cloak`` would save it (the input's
format; lossless for PNG, quality 95 4:4:4 for JPEG) and decoded: *as saved*. Then, as upload
platforms do, *JPEG q75* (Pillow, default 4:2:0 chroma) of the saved pixels, and a *downscale* of the
saved pixels by 50% and back up to the photo's size (Pillow bilinear both ways, antialiased going
down). Each transformed photo is embedded afresh through the same face pipeline as the clean photos
(whole image for aligned chips; re-detection and re-alignment otherwise). Only the cloaked photos are
transformed; the clean gallery is left as it is. The *control* figures apply the same transform to
the uncloaked photo, so protection that the transform alone would cause is visible.

A cloaked face the detector no longer finds cannot be matched: as a P1 probe it counts as protected,
as a P2 gallery photo it is missing; ``lost`` counts these faces.

**Attacks and evaluators.** *White-box*: photos cloaked with the whole ensemble, scored on each member.
*Leave-one-out*: for each member ``m``, photos cloaked with the ensemble without ``m``, scored on ``m``.
*External*: every other evaluator (shipped recognizers outside the ensemble, a user's ONNX model),
scored on the white-box cloaks, i.e. on what a user of the ensemble actually publishes. An external
model that is the same network as an ensemble member (``duplicate_of``) is flagged: it is not an
independent check.

**Group photos** have no identity labels; their report is *self-protection*: per detected face, the
cloaked face's similarity to the same face's clean embedding, protected when below the threshold.

Everything here is injectable: the cloak function, the embedders and the face finder, so the protocol
can be tested on synthetic data where the answer is known.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from uncnn_rt.runtime import catalog, image_ops, visibility
from uncnn_rt.runtime.arrays import Float32Array, Float64Array, Uint8Array
from uncnn_rt.runtime.attacks import Resize
from uncnn_rt.runtime.cloak import CloakSettings, Detector, cloak_image
from uncnn_rt.runtime.cloak.regions import visible_region
from uncnn_rt.runtime.contract import CANONICAL_SIZE, META_KIND, META_THRESHOLD
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.geometry.align import canonical_to_arcface112
from uncnn_rt.runtime.geometry.faces import FaceSite, find_faces, rematch, sites_from_detections
from uncnn_rt.runtime.geometry.warp import Box, Warp, invert_affine
from uncnn_rt.runtime.imageio import (
    IMAGE_SUFFIXES,
    LoadedImage,
    encode_image,
    load_image,
    lossy_round_trip,
    output_format,
)
from uncnn_rt.runtime.sessions import AttackSession, open_session, resolve_device, stop_spinning
from uncnn_rt.runtime.visibility import image_quality

SCHEMA: Final = "uncnn-rt.eval/1"
AS_SAVED: Final = "as_saved"
PROTOCOLS: Final = ("p1", "p2", "p3")
Kind = Literal["white-box", "leave-one-out", "external"]
SCORE_KINDS: Final[tuple[Kind, ...]] = ("white-box", "leave-one-out", "external")
WHITE_BOX_LABEL: Final = "white-box"

_WORD: Final = {"p1": "protected", "p2": "protected", "p3": "unlinked"}
"""What a probe that the protocol no longer matches is called in reports."""

PROTOCOL_TEXT: Final = {
    "recognized": "the nearest other gallery photo (cosine) is the same identity and its similarity is at "
    "least the evaluator's threshold; protection counts only probes recognized when clean",
    "p1": "probe cloaked: the cloaked photo vs every clean photo except its own clean original",
    "p2": "gallery cloaked: the clean photo vs a gallery where the other photos of its identity are "
    "their cloaked versions and everyone else's are clean",
    "p3": "linkability: the cloaked photo vs everyone else's cloaked photos (a tracker that collects only "
    "cloaked photos); a probe counts as unlinked when its nearest cloaked photo is not the same identity "
    "at the threshold; under a condition both sides are transformed",
    "conditions": "the cloaked photo as saved (input's format), then JPEG of the saved pixels, then a "
    "downscale of the saved pixels and back to full size (bilinear); each re-embedded through the same "
    "face pipeline; only cloaked photos are transformed",
    "control": "the same transforms applied to uncloaked photos: protection the transform alone causes",
    "white-box": "cloaked with the whole ensemble, scored on each member",
    "leave-one-out": "cloaked with the ensemble minus one member, scored on that member",
    "external": "scored on the white-box cloaks; not in the ensemble (duplicate_of: same network as a "
    "member, not an independent check)",
    "quality": "SSIM and PSNR of the whole saved photo against the original; L-inf of the cloak's pixels "
    "(before encoding: the budget used)",
    "visibility": "FLIP (67 pixels per degree), CIEDE2000 mean and 95th percentile, SSIM and PSNR of each "
    "face region (the face box grown by a quarter of its side on each side; the whole image for aligned "
    "chips) of the saved photo against the original: median and worst over the photos; photo_visibility: "
    "the same of the whole photo; jpeg_ladder: the same figures of the clean photos' own JPEG q95/q85/q75 "
    "re-encodes, on the face regions",
}


# ---------------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class Photo:
    """One labelled photo of a dataset."""

    identity: str
    image: LoadedImage = field(repr=False)

    @property
    def name(self) -> str:
        return self.image.name


@dataclass(frozen=True)
class Dataset:
    """Labelled photos, grouped by identity (sorted by identity, then file name)."""

    root: Path
    photos: tuple[Photo, ...]
    warnings: tuple[str, ...] = ()

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.identity for p in self.photos))

    @property
    def labels(self) -> NDArray[np.intp]:
        index = {name: i for i, name in enumerate(self.identities)}
        return np.array([index[p.identity] for p in self.photos], dtype=np.intp)


def identities_folder(root: Path) -> Path:
    """The folder holding the identity folders: ``root/identities`` when present, else ``root``."""
    nested = root / "identities"
    return nested if nested.is_dir() else root


def group_photos_folder(root: Path) -> Path | None:
    """``root/photos`` (group photos without identity labels) when present."""
    folder = root / "photos"
    return folder if folder.is_dir() else None


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_dataset(root: str | Path) -> Dataset:
    """Read ``root`` (or ``root/identities``): one sub-folder per identity with at least 2 photos.

    Folders with fewer photos and unreadable images are skipped with a warning.

    Raises:
        InputError: not a folder, or fewer than 2 usable identities.
    """
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"{base}: expected a folder with one sub-folder per identity")
    folder = identities_folder(base)
    photos: list[Photo] = []
    warnings: list[str] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        loaded: list[Photo] = []
        for path in image_files(sub):
            try:
                loaded.append(Photo(sub.name, load_image(path)))
            except InputError as exc:
                warnings.append(f"skipped {path}: {exc}")
        if len(loaded) < 2:
            warnings.append(f"skipped identity {sub.name!r}: {len(loaded)} usable photo(s), 2 needed")
            continue
        photos += loaded
    found = len({p.identity for p in photos})
    if found < 2:
        raise InputError(
            f"{folder}: {found} identity folder(s) with at least 2 photos; the protocol needs at least 2 "
            "identities (one sub-folder per person)"
        )
    return Dataset(base, tuple(photos), tuple(warnings))


def load_group_photos(folder: str | Path, *, limit: int | None = None) -> tuple[list[LoadedImage], list[str]]:
    """The images of ``folder`` (not recursive), at most ``limit``; unreadable ones as warnings."""
    photos: list[LoadedImage] = []
    warnings: list[str] = []
    for path in image_files(Path(folder)):
        if limit is not None and len(photos) >= limit:
            break
        try:
            photos.append(load_image(path))
        except InputError as exc:
            warnings.append(f"skipped {path}: {exc}")
    return photos, warnings


def probe_indices(dataset: Dataset, limit: int | None) -> list[int]:
    """The photos to cloak: all, or whole identities (in order) up to ``limit`` photos, at least one."""
    if limit is None:
        return list(range(len(dataset.photos)))
    if limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    chosen: list[int] = []
    for identity in dataset.identities:
        members = [i for i, p in enumerate(dataset.photos) if p.identity == identity]
        if chosen and len(chosen) + len(members) > limit:
            break
        chosen += members
    return chosen


# ---------------------------------------------------------------------------------------------------
# faces and embedders

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
        placement = resolve_device(device)
        try:
            self._session = ort.InferenceSession(
                str(self.path),
                sess_options=stop_spinning(ort.SessionOptions()),
                providers=list(placement.providers),
                provider_options=placement.provider_options(),
            )
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses for any load failure
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({exc})") from exc
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
        x = self.preprocess(faces)
        step = self._batch or x.shape[0]
        pieces = []
        for start in range(0, x.shape[0], step):
            chunk = x[start : start + step]
            pad = step - chunk.shape[0]
            if pad:  # a fixed batch dimension: pad with copies, then trim
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
            out = np.asarray(self._session.run(None, {self._input: chunk})[0], np.float32)
            pieces.append(out.reshape(step, -1)[: step - pad])
        features = np.concatenate(pieces)
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
    try:
        meta = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses for any load failure
        raise ModelError(f"{file}: onnxruntime cannot load it ({exc})") from exc
    metadata = dict(meta.custom_metadata_map)
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


# ---------------------------------------------------------------------------------------------------
# conditions


PhotoTransform = Callable[[Uint8Array], Uint8Array]


@dataclass(frozen=True)
class Condition:
    """A re-encoding of the saved cloaked photo (``as_saved`` is the saved photo itself)."""

    name: str
    description: str
    apply: PhotoTransform = field(repr=False, compare=False)


def jpeg_condition(quality: int) -> Condition:
    def apply(rgb: Uint8Array) -> Uint8Array:
        return image_ops.to_uint8(image_ops.jpeg(rgb[None], quality)[0])

    return Condition(f"jpeg{quality}", f"JPEG quality {quality}", apply)


def downscale_condition(factor: float) -> Condition:
    def apply(rgb: Uint8Array) -> Uint8Array:
        return image_ops.to_uint8(image_ops.downscale(rgb[None], factor)[0])

    return Condition(f"downscale{round(factor * 100)}", f"downscale to {factor:g}x and back", apply)


def as_saved_condition() -> Condition:
    return Condition(AS_SAVED, "as saved", lambda rgb: rgb)


def default_conditions(jpeg_quality: int = 75, downscale: float = 0.5) -> tuple[Condition, ...]:
    return as_saved_condition(), jpeg_condition(jpeg_quality), downscale_condition(downscale)


def saved_pixels(pixels: Uint8Array, like: LoadedImage, quality: int | None = None) -> Uint8Array:
    """``pixels`` encoded as ``uncnn-rt cloak`` saves them for ``like`` (its format, at ``quality`` when
    the cloak chose one), and decoded."""
    data = encode_image(pixels, like, fmt=output_format(like), quality=quality)
    return load_image(data, name=like.name).rgb


# ---------------------------------------------------------------------------------------------------
# the protocol, on embeddings


@dataclass(frozen=True)
class Rate:
    """``hits`` of ``total``; ``rate`` None when there is nothing to count."""

    hits: int
    total: int

    @property
    def rate(self) -> float | None:
        return None if self.total == 0 else self.hits / self.total

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.hits + other.hits, self.total + other.total)

    def to_dict(self, word: str = "protected") -> dict[str, Any]:
        return {word: self.hits, "of": self.total, "rate": _round(self.rate)}


def recognized(
    similarities: Float64Array,
    probe_labels: NDArray[np.intp],
    gallery_labels: NDArray[np.intp],
    threshold: float,
) -> NDArray[np.bool_]:
    """Per probe row: the best gallery column is the same identity and reaches ``threshold``.

    Excluded pairs (the probe itself, missing faces) carry ``-inf`` or NaN and never match.
    """
    sims = np.where(np.isnan(similarities), -np.inf, similarities)
    if sims.shape[1] == 0:
        return np.zeros(sims.shape[0], np.bool_)
    best = np.argmax(sims, axis=1)
    top = sims[np.arange(sims.shape[0]), best]
    return np.asarray((gallery_labels[best] == probe_labels) & (top >= threshold), np.bool_)


@dataclass(frozen=True)
class ProtocolOutcome:
    """Per probe (the ``probes`` given), which passed each test."""

    probes: tuple[int, ...]
    eligible: NDArray[np.bool_]
    """Recognized when clean (and a face was found in the clean photo)."""
    p1_recognized: NDArray[np.bool_]
    p2_recognized: NDArray[np.bool_]
    p3_recognized: NDArray[np.bool_]
    """The cloaked probe matched the same identity among the other cloaked photos (linked)."""
    lost: NDArray[np.bool_]
    """No face found in the cloaked photo."""
    self_similarity: Float64Array
    """Cosine of the cloaked probe to its own clean embedding (NaN when lost)."""

    def protection(self, protocol: str) -> Rate:
        still = {"p1": self.p1_recognized, "p2": self.p2_recognized, "p3": self.p3_recognized}[protocol]
        return Rate(int(np.sum(self.eligible & ~still)), int(np.sum(self.eligible)))


def run_protocols(
    clean: Float32Array,
    cloaked: Float32Array,
    labels: NDArray[np.intp],
    threshold: float,
    probes: Sequence[int],
) -> ProtocolOutcome:
    """P1, P2 and P3 for ``probes`` (indices into the dataset).

    Args:
        clean: ``[N, D]`` unit embeddings of the clean photos (NaN rows: no face found).
        cloaked: ``[N, D]`` of the cloaked photos; needed for every photo of every probe's identity
            (NaN rows: no face found in the cloaked photo).
        labels: ``[N]`` identity index per photo.
        threshold: the evaluator's match threshold (a similarity at or above it matches).
    """
    index = np.asarray(probes, dtype=np.intp)
    c = np.asarray(clean, np.float64)
    x = np.asarray(cloaked, np.float64)
    rows = np.arange(index.size)
    own = labels[index]
    same = own[:, None] == labels[None, :]

    def excluding_self(sims: Float64Array) -> Float64Array:
        sims = sims.copy()
        sims[rows, index] = -np.inf
        return sims

    clean_sims = excluding_self(c[index] @ c.T)
    baseline = recognized(clean_sims, own, labels, threshold)
    eligible = baseline & np.isfinite(c[index]).all(axis=1)
    p1 = recognized(excluding_self(x[index] @ c.T), own, labels, threshold)
    p2 = recognized(excluding_self(np.where(same, c[index] @ x.T, clean_sims)), own, labels, threshold)
    # Photos never cloaked (NaN rows, e.g. identities left out by a limit) are not in P3's gallery.
    p3 = recognized(excluding_self(x[index] @ x.T), own, labels, threshold)
    lost = np.asarray(~np.isfinite(x[index]).all(axis=1), np.bool_)
    self_similarity = np.einsum("nd,nd->n", x[index], c[index])
    return ProtocolOutcome(tuple(int(i) for i in index), eligible, p1, p2, p3, lost, self_similarity)


# ---------------------------------------------------------------------------------------------------
# reports


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


@dataclass(frozen=True)
class ConditionScore:
    """One evaluator on one attack's cloaks, under one condition."""

    p1: Rate
    p2: Rate
    lost: int
    self_similarity: float | None
    """Mean cosine of the eligible cloaked probes to their own clean embeddings."""
    p3: Rate = Rate(0, 0)
    """Probes unlinked: not matched to their identity among the other cloaked photos."""

    def rate(self, protocol: str) -> Rate:
        return {"p1": self.p1, "p2": self.p2, "p3": self.p3}[protocol]

    def to_dict(self) -> dict[str, Any]:
        return {
            "p1": self.p1.to_dict(),
            "p2": self.p2.to_dict(),
            "p3": self.p3.to_dict("unlinked"),
            "lost_faces": self.lost,
            "mean_self_similarity": _round(self.self_similarity),
        }


@dataclass(frozen=True)
class Score:
    """One evaluator scored on one attack: white-box, leave-one-out or external."""

    evaluator: str
    kind: Kind
    attack: str
    threshold: float
    eligible: int
    conditions: dict[str, ConditionScore]
    duplicate_of: str | None = None

    @property
    def independent(self) -> bool:
        return self.kind != "white-box" and self.duplicate_of is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluator": self.evaluator,
            "kind": self.kind,
            "attack": self.attack,
            "threshold": _round(self.threshold),
            "duplicate_of": self.duplicate_of,
            "independent": self.independent,
            "eligible": self.eligible,
            "conditions": {name: c.to_dict() for name, c in self.conditions.items()},
        }


@dataclass(frozen=True)
class AttackQuality:
    """What one attack cost: SSIM and PSNR of the saved photos against the originals (a JPEG input's
    re-encoding included, as the user gets it), the L-inf of the cloak's own pixels, and time."""

    attack: str
    ensemble: tuple[str, ...]
    photos: int
    ssim_mean: float
    ssim_min: float
    psnr_mean: float
    linf_max: int
    linf_mean: float
    seconds_per_photo: float
    steps_mean: float | None
    faces: tuple[visibility.Visibility, ...] = field(default=(), repr=False)
    """Per cloaked face, its face region's figures (saved against the original)."""
    whole: tuple[visibility.Visibility, ...] = field(default=(), repr=False)
    """Per cloaked photo, the whole photo's figures (saved against the original)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "visibility": summarise_visibility(self.faces),
            "photo_visibility": summarise_visibility(self.whole),
            "attack": self.attack,
            "ensemble": list(self.ensemble),
            "photos": self.photos,
            "ssim_mean": _round(self.ssim_mean),
            "ssim_min": _round(self.ssim_min),
            "psnr_mean": _round(self.psnr_mean, 3),
            "linf_max": self.linf_max,
            "linf_mean": _round(self.linf_mean, 3),
            "seconds_per_photo": _round(self.seconds_per_photo, 3),
            "steps_mean": _round(self.steps_mean, 2),
        }


def summarise_visibility(faces: Sequence[visibility.Visibility]) -> dict[str, Any] | None:
    """Median and worst of each face figure over ``faces`` (worst: largest FLIP and CIEDE2000, smallest
    SSIM and PSNR), or None for none."""
    if not faces:
        return None

    def stats(values: list[float], larger_is_worse: bool) -> dict[str, float | None]:
        finite = [v for v in values if math.isfinite(v)]
        worst = (max(finite) if larger_is_worse else min(finite)) if finite else None
        return {"median": _round(float(np.median(values)), 5), "worst": _round(worst, 5)}

    return {
        "faces": len(faces),
        "flip": stats([f.flip for f in faces], True),
        "ciede2000_mean": stats([f.ciede2000_mean for f in faces], True),
        "ciede2000_p95": stats([f.ciede2000_p95 for f in faces], True),
        "ssim": stats([f.ssim for f in faces], False),
        "psnr": stats([f.psnr for f in faces], False),
    }


def face_figures(original: Uint8Array, saved: Uint8Array, site: FaceSite | None) -> visibility.Visibility:
    """The visibility figures of the face region of ``site`` (the whole image without one)."""
    return visibility.measure(*_face_pixels(original, saved, site))


def _face_region(rgb: Uint8Array, site: FaceSite | None) -> Box:
    whole = Box(0, 0, rgb.shape[0], rgb.shape[1])
    return whole if site is None else visible_region(site, whole, rgb.shape)


def _face_pixels(
    original: Uint8Array, other: Uint8Array, site: FaceSite | None
) -> tuple[Uint8Array, Uint8Array]:
    region = _face_region(original, site)
    return original[region.slices], other[region.slices]


def ladder_figures(
    photos: Sequence[tuple[Uint8Array, FaceSite | None]], qualities: Sequence[int] = visibility.JPEG_LADDER
) -> dict[int, tuple[visibility.Visibility, ...]]:
    """Per JPEG quality, the face figures of each clean photo's own re-encode (the whole photo is
    re-encoded; the figures are taken on its face region)."""
    out: dict[int, list[visibility.Visibility]] = {q: [] for q in qualities}
    for rgb, site in photos:
        for q, figures in visibility.region_ladder(rgb, _face_region(rgb, site), qualities).items():
            out[q].append(figures)
    return {q: tuple(v) for q, v in out.items()}


@dataclass(frozen=True)
class Sample:
    """A face before and after the white-box cloak (as saved), for the before/after strip."""

    name: str
    original: Uint8Array = field(repr=False)
    cloaked: Uint8Array = field(repr=False)
    ssim: float


def pooled(scores: Sequence[Score], condition: str, protocol: str) -> Rate:
    """The sum of protected and of eligible probes over ``scores`` (a probe-weighted mean)."""
    total = Rate(0, 0)
    for s in scores:
        c = s.conditions[condition]
        total = total + c.rate(protocol)
    return total


@dataclass(frozen=True)
class GroupScore:
    """Self-protection of the faces of group photos for one evaluator on one attack, one condition."""

    protected: Rate
    mean_similarity: float | None
    not_redetected: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "protected": self.protected.to_dict(),
            "mean_similarity": _round(self.mean_similarity),
            "not_redetected": self.not_redetected,
        }


@dataclass(frozen=True)
class GroupEvaluatorScore:
    """One evaluator on one attack's cloaks of the group photos."""

    evaluator: str
    kind: Kind
    attack: str
    threshold: float
    conditions: dict[str, GroupScore]
    duplicate_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "evaluator": self.evaluator,
            "kind": self.kind,
            "attack": self.attack,
            "threshold": _round(self.threshold),
            "duplicate_of": self.duplicate_of,
            "conditions": {name: c.to_dict() for name, c in self.conditions.items()},
        }


@dataclass(frozen=True)
class GroupReport:
    """Self-protection on group photos: per face, cloaked vs its own clean embedding."""

    photos: int
    faces: int
    scores: tuple[GroupEvaluatorScore, ...]
    quality: tuple[AttackQuality, ...]
    warnings: tuple[str, ...] = ()
    jpeg_ladder: dict[int, tuple[visibility.Visibility, ...]] = field(default_factory=dict, repr=False)
    """Per JPEG quality, the face figures of the photos' own clean re-encodes, per face."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "photos": self.photos,
            "faces": self.faces,
            "jpeg_ladder": {f"q{q}": summarise_visibility(v) for q, v in self.jpeg_ladder.items()},
            "quality": [q.to_dict() for q in self.quality],
            "scores": [s.to_dict() for s in self.scores],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class ModeReport:
    """Everything measured for one cloak mode."""

    mode: str
    settings: dict[str, Any]
    quality: tuple[AttackQuality, ...]
    scores: tuple[Score, ...]
    samples: tuple[Sample, ...] = field(default=(), repr=False)
    group: GroupReport | None = None

    def of_kind(self, kind: Kind, *, independent_only: bool = False) -> list[Score]:
        return [s for s in self.scores if s.kind == kind and (s.independent or not independent_only)]

    def quality_of(self, kind: Kind) -> list[AttackQuality]:
        attacks = {s.attack for s in self.of_kind(kind)}
        return [q for q in self.quality if q.attack in attacks]

    def summary(self, conditions: Sequence[str]) -> dict[str, Any]:
        """Pooled protection per kind (external: independent evaluators only), condition and protocol."""
        out: dict[str, Any] = {}
        for kind in SCORE_KINDS:
            scores = self.of_kind(kind, independent_only=kind == "external")
            if not scores:
                continue
            quality = self.quality_of(kind)
            out[kind] = {
                "evaluators": [s.evaluator for s in scores],
                "ssim_mean": _round(_weighted_ssim(quality)),
                "conditions": {
                    c: {p: pooled(scores, c, p).to_dict(_WORD[p]) for p in PROTOCOLS} for c in conditions
                },
            }
        return out

    def to_dict(self, conditions: Sequence[str]) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "settings": self.settings,
            "quality": [q.to_dict() for q in self.quality],
            "summary": self.summary(conditions),
            "scores": [s.to_dict() for s in self.scores],
            "group_photos": None if self.group is None else self.group.to_dict(),
        }


def _weighted_ssim(quality: Sequence[AttackQuality]) -> float | None:
    photos = sum(q.photos for q in quality)
    return None if photos == 0 else sum(q.ssim_mean * q.photos for q in quality) / photos


@dataclass(frozen=True)
class EvaluatorInfo:
    name: str
    threshold: float
    in_ensemble: bool
    duplicate_of: str | None
    baseline: Rate
    """Photos recognized when clean (of the photos with a face)."""
    no_face: int
    controls: dict[str, tuple[Rate, Rate, Rate]]
    """Per condition, (P1, P2) protection of the transform alone (uncloaked photos), over the probes."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": _round(self.threshold),
            "in_ensemble": self.in_ensemble,
            "duplicate_of": self.duplicate_of,
            "baseline": self.baseline.to_dict("recognized"),
            "no_face": self.no_face,
            "control": {
                c: {p: r.to_dict(_WORD[p]) for p, r in zip(PROTOCOLS, rates, strict=True)}
                for c, rates in self.controls.items()
            },
        }


@dataclass(frozen=True)
class EvalReport:
    """The whole evaluation: dataset, evaluators with their clean baselines, and one report per mode."""

    dataset: str
    identities: int
    photos: int
    probes: int
    ensemble: tuple[str, ...]
    transfer: bool
    aligned: bool
    conditions: tuple[Condition, ...]
    evaluators: tuple[EvaluatorInfo, ...]
    modes: tuple[ModeReport, ...]
    warnings: tuple[str, ...] = ()
    jpeg_ladder: dict[int, tuple[visibility.Visibility, ...]] = field(default_factory=dict, repr=False)
    """Per JPEG quality, the face figures of the cloaked photos' own clean re-encodes."""

    @property
    def condition_names(self) -> list[str]:
        return [c.name for c in self.conditions]

    def to_dict(self) -> dict[str, Any]:
        names = self.condition_names
        return {
            "schema": SCHEMA,
            "dataset": self.dataset,
            "identities": self.identities,
            "photos": self.photos,
            "probes": self.probes,
            "ensemble": list(self.ensemble),
            "transfer": self.transfer,
            "aligned": self.aligned,
            "protocol": dict(PROTOCOL_TEXT),
            "conditions": [{"name": c.name, "description": c.description} for c in self.conditions],
            "evaluators": [e.to_dict() for e in self.evaluators],
            "modes": [m.to_dict(names) for m in self.modes],
            "jpeg_ladder": {f"q{q}": summarise_visibility(v) for q, v in self.jpeg_ladder.items()},
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------------------
# cloak functions


@dataclass(frozen=True)
class Cloaked:
    """What a cloak function returns: the cloaked pixels, and the mean steps run per face if known."""

    image: Uint8Array = field(repr=False)
    steps: float | None = None
    quality: int | None = None
    """The quality the cloak must be saved at (:attr:`~.cloak.CloakResult.output_quality`), if it chose."""


class CloakFunction(Protocol):
    """Cloak ``photo`` with the recognizers named ``ensemble``; ``[H, W, 3]`` uint8 or :class:`Cloaked`."""

    def __call__(self, photo: LoadedImage, ensemble: tuple[str, ...]) -> Cloaked | Uint8Array: ...


def cloak_function(
    sessions: Mapping[str, AttackSession],
    settings: CloakSettings,
    *,
    detector: Detector | None = None,
    no_align: bool = False,
    largest: bool = False,
    seed: int = 0,
) -> CloakFunction:
    """The real cloak (:func:`~.cloak.cloak_image`) as a :class:`CloakFunction` over named sessions."""

    def run(photo: LoadedImage, ensemble: tuple[str, ...]) -> Cloaked:
        result = cloak_image(
            photo,
            recognizers=[sessions[n] for n in ensemble],
            detector=detector,
            mode=settings,
            no_align=no_align,
            largest=largest,
            seed=seed,
            saved=lossy_round_trip(photo, fmt=output_format(photo)),
        )
        steps = float(np.mean([f.steps for f in result.faces])) if result.faces else None
        return Cloaked(result.image, steps, result.output_quality)

    return run


def _as_cloaked(out: Cloaked | Uint8Array, like: LoadedImage) -> Cloaked:
    cloaked = out if isinstance(out, Cloaked) else Cloaked(np.asarray(out))
    if cloaked.image.shape != like.rgb.shape or cloaked.image.dtype != np.uint8:
        raise InputError(
            f"{like.name}: the cloak returned {cloaked.image.dtype} {list(cloaked.image.shape)}, expected "
            f"uint8 {list(like.rgb.shape)}"
        )
    return cloaked


@dataclass(frozen=True)
class Attack:
    """One set of cloaks: made with ``ensemble``, scored on ``scored`` as ``kind``."""

    label: str
    ensemble: tuple[str, ...]
    scored: tuple[tuple[str, Kind], ...]


def plan_attacks(
    ensemble: Sequence[str], evaluators: Sequence[str], *, transfer: bool = True
) -> list[Attack]:
    """The white-box attack (scored on the ensemble and on every external evaluator), then one
    leave-one-out attack per member (scored on that member) when ``transfer`` and the ensemble has 2+."""
    members = tuple(ensemble)
    if not members:
        raise InputError("the ensemble needs at least one recognizer")
    missing = [m for m in members if m not in evaluators]
    if missing:
        raise InputError(f"no evaluator for ensemble member(s) {', '.join(missing)}")
    scored: list[tuple[str, Kind]] = [(m, "white-box") for m in members]
    scored += [(e, "external") for e in evaluators if e not in members]
    attacks = [Attack(WHITE_BOX_LABEL, members, tuple(scored))]
    if transfer and len(members) > 1:
        for m in members:
            attacks.append(
                Attack(f"without {m}", tuple(x for x in members if x != m), ((m, "leave-one-out"),))
            )
    return attacks


# ---------------------------------------------------------------------------------------------------
# evaluation

ProgressFn = Callable[[str], None]
"""Called once per cloaked photo, with a short description of the work done."""


def _embed_all(
    embedders: Sequence[Embedder], images: Sequence[Uint8Array], sites: Sequence[FaceSite | None]
) -> dict[str, Float32Array]:
    """Per embedder, ``[N, D]`` with NaN rows where ``sites`` is None."""
    present = [i for i, s in enumerate(sites) if s is not None]
    views = [FaceView(images[i], s) for i, s in enumerate(sites) if s is not None]
    out = {}
    for e in embedders:
        got = e.embed(views) if views else None
        dim = got.shape[1] if got is not None else 1
        full = np.full((len(images), dim), np.nan, np.float32)
        if got is not None:
            full[present] = got
        out[e.name] = full
    return out


def _sample_crop(rgb: Uint8Array, site: FaceSite | None) -> Uint8Array:
    """The face region of ``rgb`` for the strip (:func:`face_figures`' region)."""
    return rgb[_face_region(rgb, site).slices]


def evaluate(
    dataset: Dataset,
    *,
    cloaks: Mapping[str, CloakFunction],
    embedders: Sequence[Embedder],
    ensemble: Sequence[str],
    transfer: bool = True,
    finder: FaceFinder = whole_image_faces,
    aligned: bool = True,
    conditions: Sequence[Condition] | None = None,
    limit: int | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    samples: int = 6,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Run the protocol of the module docstring on ``dataset``, once per mode.

    Args:
        cloaks: per mode label, the cloak function (called with each photo and an ensemble).
        embedders: every evaluator; the ensemble members must be among them (by name).
        ensemble: the recognizers of the white-box cloak.
        transfer: also run the leave-one-out attacks (one more cloak per member and photo).
        finder: the face pipeline; the largest face of each photo is its subject.
        aligned: recorded in the report (the finder decides).
        conditions: the transforms of the saved cloaked photo; the first must be ``as_saved``.
        limit: cloak at most this many photos (whole identities; all photos stay in the gallery).
        settings: per mode, its settings for the report.
        samples: faces kept per mode for the before/after strip (one per identity).
        progress: called after each cloaked photo.
    """
    conds = tuple(conditions) if conditions is not None else default_conditions()
    if not conds or conds[0].name != AS_SAVED:
        raise InputError("the first condition must be as_saved (the other transforms start from it)")
    by_name = {e.name: e for e in embedders}
    if len(by_name) != len(embedders):
        raise InputError(f"evaluators need distinct names, got {[e.name for e in embedders]}")
    attacks = plan_attacks(ensemble, list(by_name), transfer=transfer)
    probes = probe_indices(dataset, limit)
    labels = dataset.labels
    originals = [p.image.rgb for p in dataset.photos]
    sites = [main_face(finder(rgb)) for rgb in originals]
    clean = _embed_all(embedders, originals, sites)
    warnings = list(dataset.warnings)
    warnings += [
        f"no face found in {p.name}: left out"
        for p, s in zip(dataset.photos, sites, strict=True)
        if s is None
    ]

    # Controls: the same transforms on the uncloaked photos; rows whose pixels did not change (a
    # lossless save) keep their clean embeddings.
    control_views: dict[str, dict[str, Float32Array]] = {}
    for cond in conds:
        views = {name: e.copy() for name, e in clean.items()}
        changed, changed_sites = [], []
        for i in probes:
            t = cond.apply(saved_pixels(originals[i], dataset.photos[i].image))
            if not np.array_equal(t, originals[i]):
                changed.append((i, t))
                changed_sites.append(main_face(finder(t)))
        fresh = _embed_all(embedders, [t for _, t in changed], changed_sites)
        for name in views:
            for k, (i, _) in enumerate(changed):
                views[name][i] = fresh[name][k]
        control_views[cond.name] = views
    found = [i for i, s in enumerate(sites) if s is not None]
    evaluators = []
    for e in embedders:
        controls = {}
        for cond in conds:
            outcome = run_protocols(
                clean[e.name], control_views[cond.name][e.name], labels, e.threshold, probes
            )
            controls[cond.name] = (
                outcome.protection("p1"),
                outcome.protection("p2"),
                outcome.protection("p3"),
            )
        baseline = run_protocols(clean[e.name], clean[e.name], labels, e.threshold, found)
        evaluators.append(
            EvaluatorInfo(
                name=e.name,
                threshold=e.threshold,
                in_ensemble=e.name in ensemble,
                duplicate_of=e.duplicate_of,
                baseline=Rate(int(baseline.eligible.sum()), len(found)),
                no_face=len(originals) - len(found),
                controls=controls,
            )
        )

    cloaked_probes = [i for i in probes if sites[i] is not None]
    ladder = ladder_figures([(originals[i], sites[i]) for i in cloaked_probes])
    reports = []
    for mode, cloak in cloaks.items():
        reports.append(
            _evaluate_mode(
                mode,
                cloak,
                dataset=dataset,
                attacks=attacks,
                embedders=by_name,
                probes=[i for i in probes if sites[i] is not None],
                sites=sites,
                clean=clean,
                finder=finder,
                conditions=conds,
                settings=dict((settings or {}).get(mode, {})),
                samples=samples,
                progress=progress,
            )
        )
    return EvalReport(
        dataset=str(dataset.root),
        identities=len(dataset.identities),
        photos=len(dataset.photos),
        probes=len(probes),
        ensemble=tuple(ensemble),
        transfer=transfer,
        aligned=aligned,
        conditions=conds,
        evaluators=tuple(evaluators),
        modes=tuple(reports),
        warnings=tuple(warnings),
        jpeg_ladder=ladder,
    )


def _evaluate_mode(
    mode: str,
    cloak: CloakFunction,
    *,
    dataset: Dataset,
    attacks: Sequence[Attack],
    embedders: Mapping[str, Embedder],
    probes: Sequence[int],
    sites: Sequence[FaceSite | None],
    clean: Mapping[str, Float32Array],
    finder: FaceFinder,
    conditions: Sequence[Condition],
    settings: dict[str, Any],
    samples: int,
    progress: ProgressFn | None,
) -> ModeReport:
    labels = dataset.labels
    n = len(dataset.photos)
    quality = []
    scores = []
    kept: list[Sample] = []
    shown: set[str] = set()
    for attack in attacks:
        scored = [embedders[name] for name, _ in attack.scored]
        cloaked = {
            (e.name, c.name): np.full((n, clean[e.name].shape[1]), np.nan, np.float32)
            for e in scored
            for c in conditions
        }
        ssims, psnrs, linfs, seconds, steps = [], [], [], 0.0, []
        faces: list[visibility.Visibility] = []
        whole: list[visibility.Visibility] = []
        for i in probes:
            photo = dataset.photos[i]
            start = time.perf_counter()
            result = _as_cloaked(cloak(photo.image, attack.ensemble), photo.image)
            seconds += time.perf_counter() - start
            if result.steps is not None:
                steps.append(result.steps)
            saved = saved_pixels(result.image, photo.image, result.quality)
            ssim, psnr = image_quality(photo.image.rgb, saved)
            ssims.append(ssim)
            psnrs.append(psnr)
            faces.append(face_figures(photo.image.rgb, saved, sites[i]))
            whole.append(visibility.photo_figures(photo.image.rgb, saved, ssim=ssim, psnr=psnr))
            linfs.append(int(np.abs(result.image.astype(np.int16) - photo.image.rgb).max(initial=0)))
            if attack.label == WHITE_BOX_LABEL and len(kept) < samples and photo.identity not in shown:
                shown.add(photo.identity)
                kept.append(
                    Sample(
                        f"{photo.identity}: {Path(photo.name).name}",
                        _sample_crop(photo.image.rgb, sites[i]),
                        _sample_crop(saved, sites[i]),
                        ssim,
                    )
                )
            found = []
            for cond in conditions:
                view = cond.apply(saved)
                site = main_face(finder(view))
                if site is not None:
                    found.append((cond.name, FaceView(view, site)))
            for e in scored:
                embedded = e.embed([face for _, face in found])
                for k, (name, _) in enumerate(found):
                    cloaked[(e.name, name)][i] = embedded[k]
            if progress is not None:
                progress(f"{mode}, {attack.label}: {Path(photo.name).name}")
        quality.append(
            AttackQuality(
                attack=attack.label,
                ensemble=attack.ensemble,
                photos=len(probes),
                ssim_mean=float(np.mean(ssims)) if ssims else 1.0,
                ssim_min=float(np.min(ssims)) if ssims else 1.0,
                psnr_mean=float(np.mean([p for p in psnrs if math.isfinite(p)] or [math.inf])),
                linf_max=max(linfs, default=0),
                linf_mean=float(np.mean(linfs)) if linfs else 0.0,
                seconds_per_photo=seconds / max(len(probes), 1),
                steps_mean=float(np.mean(steps)) if steps else None,
                faces=tuple(faces),
                whole=tuple(whole),
            )
        )
        for name, kind in attack.scored:
            e = embedders[name]
            per = {}
            eligible = 0
            for cond in conditions:
                outcome = run_protocols(clean[name], cloaked[(name, cond.name)], labels, e.threshold, probes)
                eligible = int(outcome.eligible.sum())
                sims = outcome.self_similarity[outcome.eligible & ~outcome.lost]
                per[cond.name] = ConditionScore(
                    p1=outcome.protection("p1"),
                    p2=outcome.protection("p2"),
                    p3=outcome.protection("p3"),
                    lost=int((outcome.lost & outcome.eligible).sum()),
                    self_similarity=float(sims.mean()) if sims.size else None,
                )
            scores.append(Score(name, kind, attack.label, e.threshold, eligible, per, e.duplicate_of))
    return ModeReport(mode, settings, tuple(quality), tuple(scores), tuple(kept))


# ---------------------------------------------------------------------------------------------------
# group photos: self-protection


def evaluate_group_photos(
    photos: Sequence[LoadedImage],
    *,
    cloak: CloakFunction,
    embedders: Sequence[Embedder],
    ensemble: Sequence[str],
    finder: FaceFinder,
    transfer: bool = True,
    conditions: Sequence[Condition] | None = None,
    progress: ProgressFn | None = None,
) -> GroupReport:
    """Self-protection of every detected face of unlabelled photos.

    Each photo is cloaked whole (every face) per attack of :func:`plan_attacks`. In each condition the
    saved photo's faces are detected again and matched to the clean faces by box overlap (IoU >=
    ``MATCH_IOU``; a face not found again is embedded where it was, and counted in ``not_redetected``).
    A face is protected for an evaluator when its cloaked embedding's cosine to its clean embedding is
    below the evaluator's threshold.
    """
    conds = tuple(conditions) if conditions is not None else default_conditions()
    by_name = {e.name: e for e in embedders}
    attacks = plan_attacks(ensemble, list(by_name), transfer=transfer)
    warnings: list[str] = []
    faces_of = []
    for photo in photos:
        sites = list(finder(photo.rgb))
        if not sites:
            warnings.append(f"no face found in {photo.name}: left out")
        faces_of.append(sites)
    clean = [_embed_all(embedders, [p.rgb] * len(s), s) for p, s in zip(photos, faces_of, strict=True)]
    quality = []
    collected: dict[tuple[str, str, str], list[tuple[float, bool]]] = {}
    for attack in attacks:
        ssims, psnrs, linfs, seconds, steps, used = [], [], [], 0.0, [], 0
        faces: list[visibility.Visibility] = []
        whole: list[visibility.Visibility] = []
        for photo, sites, embedded in zip(photos, faces_of, clean, strict=True):
            if not sites:
                continue
            used += 1
            start = time.perf_counter()
            result = _as_cloaked(cloak(photo, attack.ensemble), photo)
            seconds += time.perf_counter() - start
            if result.steps is not None:
                steps.append(result.steps)
            saved = saved_pixels(result.image, photo, result.quality)
            ssim, psnr = image_quality(photo.rgb, saved)
            ssims.append(ssim)
            psnrs.append(psnr)
            faces += [face_figures(photo.rgb, saved, site) for site in sites]
            whole.append(visibility.photo_figures(photo.rgb, saved, ssim=ssim, psnr=psnr))
            linfs.append(int(np.abs(result.image.astype(np.int16) - photo.rgb).max(initial=0)))
            for cond in conds:
                view = cond.apply(saved)
                found = list(finder(view))
                matched = [rematch(site, found) for site in sites]
                for name, _kind in attack.scored:
                    e = by_name[name]
                    after = e.embed([FaceView(view, again.site) for again in matched])
                    for k, again in enumerate(matched):
                        sim = float(np.dot(after[k], embedded[name][k]))
                        key = (attack.label, name, cond.name)
                        collected.setdefault(key, []).append((sim, again.matched))
            if progress is not None:
                progress(f"group photos, {attack.label}: {Path(photo.name).name}")
        quality.append(
            AttackQuality(
                attack=attack.label,
                ensemble=attack.ensemble,
                photos=used,
                ssim_mean=float(np.mean(ssims)) if ssims else 1.0,
                ssim_min=float(np.min(ssims)) if ssims else 1.0,
                psnr_mean=float(np.mean([p for p in psnrs if math.isfinite(p)] or [math.inf])),
                linf_max=max(linfs, default=0),
                linf_mean=float(np.mean(linfs)) if linfs else 0.0,
                seconds_per_photo=seconds / max(used, 1),
                steps_mean=float(np.mean(steps)) if steps else None,
                faces=tuple(faces),
                whole=tuple(whole),
            )
        )
    scores = []
    for attack in attacks:
        for name, kind in attack.scored:
            e = by_name[name]
            per = {}
            for cond in conds:
                rows = collected.get((attack.label, name, cond.name), [])
                sims = np.array([s for s, _ in rows])
                per[cond.name] = GroupScore(
                    protected=Rate(int(np.sum(sims < e.threshold)), len(rows)),
                    mean_similarity=float(sims.mean()) if rows else None,
                    not_redetected=sum(not r for _, r in rows),
                )
            scores.append(GroupEvaluatorScore(name, kind, attack.label, e.threshold, per, e.duplicate_of))
    return GroupReport(
        photos=sum(1 for s in faces_of if s),
        faces=sum(len(s) for s in faces_of),
        scores=tuple(scores),
        quality=tuple(quality),
        warnings=tuple(warnings),
        jpeg_ladder=ladder_figures(
            [(p.rgb, site) for p, sites in zip(photos, faces_of, strict=True) for site in sites]
        ),
    )
