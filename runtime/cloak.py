"""Cloak the faces of a photo: detect, align, perturb at the photo's native resolution.

Data flow (see ``DESIGN.md``, "Data flow of cloak")::

    faces   = detector(photo)                         (or the whole image with no_align)
    M_k     = similarity transform, canonical crop -> photo, from face k's landmarks
    for each face k:
        region  = the crop's footprint in the photo, feathered (times a texture weight in low mode)
        delta   lives in the photo's pixel grid, inside the region's box
        step:   crop = W_k (x + Q(delta))              W_k: bilinear warp, a linear map (Warp)
                g    = W_k^T (gradient of the crops: MI, alignment jitter (DI), EOT over JPEG,
                              one recognizer per step drawn by its distance from its threshold)
                delta <- project(delta + alpha * mask * sign(momentum(g)))
                         (L-inf eps * mask, pixel range, SSIM floor of the region)

``Q`` rounds to whole grey levels, so the loop sees exactly the uint8 pixels that are saved. The
untargeted objective is each recognizer's cosine similarity to the face's own clean embedding
(descended); with a target identity it is the similarity to the target's embedding (ascended).
Grey photos get the same delta on R, G and B, so they stay grey.

**Modes** (eps in 0..255 grey levels; the SSIM floor holds on each face's region, and so on the
whole photo):

======  ====  =====  =======  =============================================================
mode    eps   steps  SSIM >=  recipe
======  ====  =====  =======  =============================================================
low     12    16     0.95     MI, jitter p 0.5, EOT JPEG 70..95, steps from 3, budget halved on flat skin
mid     16    24     0.90     MI, jitter p 0.5, EOT JPEG 70..95, steps from 4
high    24    40     0.85     MI, jitter p 0.5, EOT JPEG 70..95, steps from 5, 3 refinement rounds
======  ====  =====  =======  =============================================================

Every mode takes its steps on a grid 4 canonical-crop pixels coarse, upsampled bilinearly to the
photo (``coarse``): a smooth perturbation, which spends SSIM on local brightness rather than on
local contrast and structure and transfers better to recognizers outside the ensemble. Each step is
averaged with one on a grid 8 crop pixels coarse (``scales``), and the step size shrinks from the
mode's first step to 30% of it along a cosine (``schedule``), which transfers better still at the same
SSIM (to 0, small faces in group photos lost some white-box protection; run 14).

Every mode stops a face early once every white-box recognizer is past its threshold by
``stop_margin`` (checked every ``check_every`` steps on the exact uint8 pixels), and spends each step
on one recognizer, drawn in proportion to how far it is from its threshold (a stochastic ensemble:
the momentum sums them). Measured on this project's 2-core CPU with the four default recognizers
(see ``bench/cloak_latency.py``): a step of ``mid`` on a 1080p portrait costs about 0.07 s, and the
whole cloak about 2.4 s. Against the white-box recognizers ``mid`` protects 84% of the dev chips (P1
of ``uncnn-rt eval``) and leaves 87-96% of the group photos' faces under each one's threshold
(``bench/RESULTS.md``, run 14); ``high`` protects 96% of the chips.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from . import image_ops, zoo
from .align import CANONICAL_SIZE, transform_for_blazeface, transform_for_box, transform_for_whole_image
from .attacks import (
    EOT,
    MIFGSM,
    AttackResult,
    Downscale,
    InputDiversity,
    Jpeg,
    LinearMap,
    PastThresholds,
    Resize,
    Transform,
    TranslationInvariance,
    Victim,
)
from .errors import InputError, ModelError
from .imageio import LoadedImage
from .sessions import AttackSession, open_session
from .warp import Box, Warp, feather_mask

Float32Array = NDArray[np.float32]
Float64Array = NDArray[np.float64]
Uint8Array = NDArray[np.uint8]

FEATHER: Final = 0.1
"""Soft edge of a face region, as a fraction of the canonical crop's side in photo pixels."""
SSIM_MARGIN: Final = 10
"""Pixels around a face's warp box kept in its region, so every SSIM window that sees a changed
pixel lies inside the region (two window radii of the 11-tap Gaussian)."""
JPEG_BLOCK: Final = 16
"""Regions start on this grid, so EOT's JPEG blocks fall where the saved file's do."""
TEXTURE_RADIUS: Final = 3
TEXTURE_STD: Final = 12.0
"""Local luminance standard deviation (0..255, over a 7x7 window) at which a pixel gets its full budget;
flatter pixels get a share ``std / TEXTURE_STD``, down to the mode's ``texture_floor``."""
MATCH_IOU: Final = 0.3
"""A re-detected face is the same face when the boxes overlap at least this much."""
BOX_SCALE: Final = 1.5
"""Crop side over box side when a detection has no landmarks (BlazeFace boxes run brow to chin)."""


class NoFaceError(InputError):
    """No face was found in a photo that was to be cloaked or compared."""


@dataclass(frozen=True)
class CloakSettings:
    """The budget and recipe of one cloak.

    Attributes:
        mode: ``low``, ``mid`` or ``high`` (the table in the module docstring), or ``custom``.
        eps: L-inf budget per pixel and channel, in 0..255 units (scaled per pixel by the region mask).
        steps: most attack steps per face in the first pass (each refinement round adds at most
            ``refine_steps``, capped at ``steps`` when ``steps`` is overridden).
        ssim_min: SSIM floor of each face region (hence of the whole photo), or None.
        step_size: grey levels per step (before the mask scales it).
        momentum: MI-FGSM decay.
        diversity: probability of an alignment jitter (:class:`AlignmentJitter`, DI for aligned faces)
            at each gradient evaluation (0: off).
        eot_quality: JPEG qualities EOT draws from each step, or None (off).
        smoothing: TI radius in crop pixels (0: off).
        texture_floor: smallest share of eps in flat areas (1: a uniform budget inside the region).
        stop_margin: stop a face once every recognizer is past its threshold by this much.
        check_every: steps between early-stop checks (each costs a forward pass of every model).
        ssim_every: steps between SSIM-floor checks (the result always meets the floor).
        coarse: the perturbation's grid step in canonical-crop pixels: steps are taken on a grid this
            coarse and upsampled bilinearly to the photo (1: per photo pixel; see
            :class:`~uncnn_rt.runtime.attacks.GradientAttack`).
        scales: more grids (canonical-crop pixels) whose steps are averaged with ``coarse``'s.
        schedule: ``constant`` or ``cosine`` step size, the cosine ending at ``schedule_floor`` times the
            first step (:class:`~uncnn_rt.runtime.attacks.GradientAttack`).
        eot_downscale: EOT also draws a downscale by a factor in this range (and back), or None (every
            mode: the probe of ``bench/RESULTS.md`` run 13 found it lowers transfer).
    """

    mode: str
    eps: float
    steps: int
    ssim_min: float | None
    step_size: float
    momentum: float = 1.0
    diversity: float = 0.5
    eot_quality: tuple[int, int] | None = (70, 95)
    smoothing: int = 0
    texture_floor: float = 1.0
    texture_quantile: float | None = 0.5
    feather: float = FEATHER
    feather_inside: bool = True
    stop_margin: float = 0.05
    check_every: int = 3
    ssim_every: int = 3
    models_per_step: int | None = 1
    refine_rounds: int = 1
    refine_steps: int = 12
    coarse: float = 1.0
    scales: tuple[float, ...] = ()
    schedule: str = "constant"
    schedule_floor: float = 0.0
    eot_downscale: tuple[float, float] | None = None

    def describe(self) -> str:
        ssim = "none" if self.ssim_min is None else f"{self.ssim_min:g}"
        return f"{self.mode}: eps {self.eps:g}, {self.steps} steps, SSIM >= {ssim}"


# The modes' perturbation grid, in canonical-crop pixels: smooth over about 4 crop pixels, such a
# perturbation costs less SSIM per grey level and moves recognizers left out of the ensemble further
# (bench/RESULTS.md, "coarse grid"), so each mode affords a larger L-inf budget at the same SSIM floor.
COARSE: Final = 4.0
# Every mode also averages each step with one on a grid 8 crop pixels coarse, and shrinks its step along a
# cosine from the mode's first step to 30% of it. With a larger first step this took mid's leave-one-out
# P1 from 28.9% to 42.1% at the same SSIM 0.90 (bench/RESULTS.md, run 13); ending at 30% rather than 0
# gave the small faces of group photos back their white-box protection (run 14).
SCALES: Final = (8.0,)
SCHEDULE: Final = "cosine"
SCHEDULE_FLOOR: Final = 0.3


def _mode(name: str, **specific: Any) -> CloakSettings:
    """A mode on the shared basis (grids, cosine schedule and its floor) with its own budget and floor."""
    return CloakSettings(
        name, coarse=COARSE, scales=SCALES, schedule=SCHEDULE, schedule_floor=SCHEDULE_FLOOR, **specific
    )


MODES: Final[dict[str, CloakSettings]] = {
    "low": _mode("low", eps=12.0, steps=16, ssim_min=0.95, step_size=3.0, texture_floor=0.5),
    "mid": _mode("mid", eps=16.0, steps=24, ssim_min=0.90, step_size=4.0, stop_margin=0.08),
    "high": _mode("high", eps=24.0, steps=40, ssim_min=0.85, step_size=5.0, stop_margin=0.1, refine_rounds=3),
}
DEFAULT_MODE: Final = "mid"


def settings_for(
    mode: str | CloakSettings = DEFAULT_MODE,
    *,
    eps: float | None = None,
    steps: int | None = None,
    ssim_min: float | None = None,
    coarse: float | None = None,
) -> CloakSettings:
    """A mode's settings (a name of :data:`MODES`, or settings) with explicit overrides (``ssim_min <= 0``
    turns the floor off; ``coarse`` replaces the mode's grids by one, 1 stepping per photo pixel)."""
    if isinstance(mode, CloakSettings):
        settings = mode
    elif mode in MODES:
        settings = MODES[mode]
    else:
        raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if eps is not None:
        if not 0 <= eps <= 255 or math.isnan(eps):
            raise InputError(f"eps must be in 0..255 (grey levels), got {eps}")
        # The step keeps its share of the budget, so a larger eps is reached in as many steps.
        settings = replace(settings, eps=float(eps), step_size=settings.step_size * eps / settings.eps)
    if steps is not None:
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        # A refinement round continues the attack; it never takes more steps than the user allowed.
        settings = replace(settings, steps=int(steps), refine_steps=min(settings.refine_steps, int(steps)))
    if ssim_min is not None:
        if not ssim_min <= 1 or math.isnan(ssim_min):
            raise InputError(f"ssim_min must be <= 1, got {ssim_min}")
        settings = replace(settings, ssim_min=float(ssim_min) if ssim_min > 0 else None)
    if coarse is not None:
        if not 1 <= coarse <= 64:
            raise InputError(f"coarse must be in 1..64 (canonical-crop pixels), got {coarse}")
        # One grid instead of the mode's two: --coarse 1 means a per-pixel perturbation.
        settings = replace(settings, coarse=float(coarse), scales=())
    if (eps, steps, ssim_min, coarse) != (None, None, None, None) and not settings.mode.endswith("(custom)"):
        settings = replace(settings, mode=f"{settings.mode} (custom)")
    return settings


class DetectedFace(Protocol):
    """What a detector reports per face (``uncnn_rt.runtime.detect.Face``)."""

    @property
    def box(self) -> tuple[float, float, float, float]: ...

    @property
    def landmarks(self) -> NDArray[np.float32]: ...

    @property
    def score(self) -> float: ...


class Detector(Protocol):
    """Anything with ``detect(rgb [H, W, 3] uint8) -> faces`` (``uncnn_rt.runtime.detect.FaceDetector``)."""

    def detect(self, rgb: Uint8Array) -> Sequence[DetectedFace]: ...


@dataclass(frozen=True)
class FaceSite:
    """One face to cloak (or compare): where it is and the crop that frames it.

    ``crop_to_photo`` maps canonical-crop coordinates (side ``size``) to photo coordinates.
    ``box``, ``landmarks`` and ``score`` are None for the whole image (``no_align``).
    """

    crop_to_photo: Float64Array
    size: int
    box: tuple[float, float, float, float] | None = None
    landmarks: Float32Array | None = field(default=None, repr=False)
    score: float | None = None

    @property
    def area(self) -> float:
        if self.box is None:
            return math.inf
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)


@dataclass(frozen=True)
class ModelOutcome:
    """One recognizer's view of one cloaked face, on the exact uint8 pixels handed to the encoder."""

    name: str
    threshold: float | None
    similarity: float
    """Cosine similarity of the cloaked face to the reference (own clean embedding, or the target's)."""
    passed: bool
    """Below the threshold (untargeted) or above it (targeted); False when the model has no threshold."""


@dataclass(frozen=True)
class CloakedFace:
    """One face of a :class:`CloakResult`."""

    number: int
    """1-based, faces ordered left to right (then top to bottom)."""
    site: FaceSite
    region: Box
    """The pixels the perturbation may touch lie inside this box."""
    steps: int
    clean: dict[str, Float32Array] = field(repr=False)
    """Per recognizer, the face's clean unit embedding ``[D]``."""
    references: dict[str, Float32Array] = field(repr=False)
    """Per recognizer, the attack's reference ``[D]``: ``clean`` untargeted, the target's when targeted."""
    outcomes: tuple[ModelOutcome, ...]
    linf: int
    """Largest change of any pixel and channel in the region, in grey levels."""
    ssim: float
    """SSIM of the face region, cloaked against the original."""

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)


@dataclass(frozen=True)
class CloakResult:
    """The cloaked pixels and what the attack saw of each face."""

    image: Uint8Array = field(repr=False)
    """``[H, W, 3]`` uint8, the input's size; equal to the input outside the face regions."""
    faces: tuple[CloakedFace, ...]
    settings: CloakSettings
    targeted: bool
    no_align: bool
    models: tuple[str, ...]
    crop_size: int
    seconds: float

    @property
    def passed(self) -> bool:
        return all(face.passed for face in self.faces)


@dataclass(frozen=True)
class CloakProgress:
    """A progress event: ``face`` of ``faces`` (1-based) is at ``step`` of at most ``steps``."""

    face: int
    faces: int
    step: int
    steps: int


ProgressCallback = Callable[[CloakProgress], None]


# ---------------------------------------------------------------------------------------------------
# models


def default_recognizer_names() -> list[str]:
    """The shipped face recognizers flagged for the default ensemble."""
    return [e.name for e in zoo.load_manifest() if e.kind == "face" and e.in_default_ensemble]


def load_recognizers(names: Sequence[str] | None = None, *, device: str = "auto") -> list[AttackSession]:
    """Open the named shipped face recognizers (default: the default ensemble).

    Raises:
        InputError: a name is not a shipped face recognizer.
        ModelError: no recognizer is shipped, or a file is missing or broken.
    """
    entries = {e.name: e for e in zoo.load_manifest() if e.kind == "face"}
    if names is None:
        chosen = [e for e in entries.values() if e.in_default_ensemble]
        if not chosen:
            raise ModelError(
                "no face recognizers are shipped in this installation (build the zoo: "
                "python -m uncnn_rt.converters.zoo build)"
            )
    else:
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise InputError(
                f"unknown recognizer(s) {', '.join(unknown)}; shipped: {', '.join(sorted(entries)) or 'none'}"
            )
        if not names:
            raise InputError("give at least one recognizer name")
        chosen = [entries[n] for n in dict.fromkeys(names)]
    return [open_session(e.path, device=device) for e in chosen]


def load_detector(*, device: str = "auto") -> Detector:
    """The shipped BlazeFace detector (:class:`uncnn_rt.runtime.detect.FaceDetector`)."""
    try:
        from .detect import FaceDetector
    except ImportError as exc:  # the detector module ships with the face pipeline
        raise ModelError(f"the face detector is not available in this installation ({exc})") from exc
    detector: Detector = FaceDetector(device=device)
    return detector


def crop_size_for(recognizers: Sequence[AttackSession]) -> int:
    """Side of the crop the photo is warped to: the largest canonical size among the recognizers."""
    if not recognizers:
        raise InputError("at least one recognizer is needed")
    return max(r.info.canonical_size for r in recognizers)


# ---------------------------------------------------------------------------------------------------
# faces


def find_faces(
    rgb: Uint8Array,
    detector: Detector | None,
    *,
    size: int = CANONICAL_SIZE,
    no_align: bool = False,
    name: str = "image",
) -> list[FaceSite]:
    """The faces of a photo, left to right, each with its crop transform; ``no_align``: the whole image.

    Raises:
        NoFaceError: the detector found nothing.
    """
    height, width = rgb.shape[:2]
    if no_align:
        return [FaceSite(transform_for_whole_image(height, width, size), size)]
    if detector is None:
        raise InputError("face detection needs a detector (or use no_align)")
    sites = sites_from_detections(detector.detect(rgb), size)
    if not sites:
        raise NoFaceError(f"no face found in {name}; use --no-align to cloak the whole image")
    return sites


def sites_from_detections(found: Sequence[DetectedFace], size: int) -> list[FaceSite]:
    """Detected faces as :class:`FaceSite` s (landmarks -> similarity transform), left to right.

    Six BlazeFace landmarks give the transform; a face without them is framed from its box.
    """
    sites = []
    for face in found:
        x0, y0, x1, y1 = (float(v) for v in face.box)
        landmarks = None if face.landmarks is None else np.asarray(face.landmarks, dtype=np.float32)
        if landmarks is not None and landmarks.shape == (6, 2):
            matrix = transform_for_blazeface(landmarks, size)
        else:
            matrix = transform_for_box((x0, y0, x1, y1), size, box_scale=BOX_SCALE)
        sites.append(FaceSite(matrix, size, (x0, y0, x1, y1), landmarks, float(face.score)))
    sites.sort(key=_centre)
    return sites


def _centre(site: FaceSite) -> tuple[float, float]:
    assert site.box is not None
    return (site.box[0] + site.box[2]) / 2, (site.box[1] + site.box[3]) / 2


def select_faces(sites: Sequence[FaceSite], *, face: int | None = None, largest: bool = False) -> list[int]:
    """Indices (into ``sites``) of the faces to cloak: all, the ``face``-th (0-based), or the largest."""
    if face is not None and largest:
        raise InputError("give either a face number or largest, not both")
    if face is not None:
        if not 0 <= face < len(sites):
            raise InputError(
                f"face {face + 1} asked, but {len(sites)} face(s) were found (numbered left to right)"
            )
        return [face]
    if largest:
        return [max(range(len(sites)), key=lambda i: sites[i].area)]
    return list(range(len(sites)))


def embed(
    rgb: NDArray[np.generic], site: FaceSite, recognizers: Sequence[AttackSession]
) -> dict[str, Float32Array]:
    """Each recognizer's unit embedding ``[D]`` of the face at ``site`` in ``rgb`` ``[H, W, 3]``."""
    crop = Warp(site.crop_to_photo, rgb.shape, site.size).apply(rgb)[None]
    return {r.name: _features(r, crop)[0] for r in recognizers}


def _features(session: AttackSession, crops: Float32Array) -> Float32Array:
    size = session.info.canonical_size
    if crops.shape[1:3] != (size, size):
        crops = Resize(crops.shape[1:3], (size, size)).forward(crops)
    return session.features(crops)


def target_embeddings(
    target: LoadedImage,
    recognizers: Sequence[AttackSession],
    detector: Detector | None,
    *,
    no_align: bool = False,
) -> dict[str, Float32Array]:
    """The reference of a targeted cloak: the largest face of ``target`` as each recognizer embeds it."""
    size = crop_size_for(recognizers)
    sites = find_faces(target.rgb, detector, size=size, no_align=no_align, name=target.name)
    site = sites[select_faces(sites, largest=True)[0]]
    return embed(target.rgb, site, recognizers)


# ---------------------------------------------------------------------------------------------------
# the photo-region -> crop map


class CropMap(LinearMap):
    """A face's crop warp as a map of photo regions: ``[N, h, w, C]`` (``region``) -> ``[N, S, S, C]``.

    The warp reads only its own box, which lies inside ``region``; the adjoint is zero outside it.
    """

    def __init__(self, warp: Warp, region: Box) -> None:
        inner = warp.box
        if not (
            region.top <= inner.top
            and region.left <= inner.left
            and inner.bottom <= region.bottom
            and inner.right <= region.right
        ):
            raise InputError(f"the warp's box {inner} is not inside the region {region}")
        self.warp, self.region = warp, region
        self._rows = slice(inner.top - region.top, inner.bottom - region.top)
        self._cols = slice(inner.left - region.left, inner.right - region.left)

    def forward(self, images: Float32Array) -> Float32Array:
        self._check(images, (self.region.height, self.region.width))
        return np.stack([self.warp.apply_region(image[self._rows, self._cols]) for image in images])

    def adjoint(self, grad: Float32Array) -> Float32Array:
        self._check(grad, (self.warp.size, self.warp.size))
        out = np.zeros((grad.shape[0], self.region.height, self.region.width, grad.shape[3]), np.float32)
        for i, g in enumerate(grad):
            out[i, self._rows, self._cols] = self.warp.adjoint(g)
        return out

    @staticmethod
    def _check(images: Float32Array, hw: tuple[int, int]) -> None:
        if images.ndim != 4 or images.shape[1:3] != hw:
            raise InputError(f"expected [N, {hw[0]}, {hw[1]}, C], got {list(images.shape)}")


def region_box(warp: Warp, height: int, width: int) -> Box:
    """The warp's box grown by :data:`SSIM_MARGIN` and snapped outwards to the JPEG grid, in the photo."""
    b = warp.box
    top = max(0, (b.top - SSIM_MARGIN) // JPEG_BLOCK * JPEG_BLOCK)
    left = max(0, (b.left - SSIM_MARGIN) // JPEG_BLOCK * JPEG_BLOCK)
    bottom = min(height, -(-(b.bottom + SSIM_MARGIN) // JPEG_BLOCK) * JPEG_BLOCK)
    right = min(width, -(-(b.right + SSIM_MARGIN) // JPEG_BLOCK) * JPEG_BLOCK)
    return Box(top, left, bottom, right)


def _crop_scale(warp: Warp) -> float:
    """Photo pixels per crop pixel."""
    return float(math.sqrt(abs(np.linalg.det(warp.matrix[:, :2]))))


def face_mask(warp: Warp, region: Box, feather: float = FEATHER, inside: bool = True) -> Float32Array:
    """The feathered footprint of the crop in the photo, evaluated on ``region``: ``[h, w]`` in [0, 1]."""
    width = feather * warp.size * _crop_scale(warp)
    return feather_mask(
        warp.photo_shape, warp.footprint(), width, grow_px=0.0 if inside else width, within=region
    )


def local_contrast(rgb: NDArray[np.generic]) -> Float64Array:
    """Standard deviation of luminance over the 7x7 window around each pixel, ``[h, w]`` (0..255 units)."""
    luma = np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    r = TEXTURE_RADIUS
    padded = np.pad(luma, r, mode="reflect") if min(luma.shape) > r else np.pad(luma, r, mode="edge")
    n = (2 * r + 1) ** 2
    mean = _box_sum(padded, r) / n
    mean_sq = _box_sum(padded * padded, r) / n
    return np.asarray(np.sqrt(np.maximum(mean_sq - mean * mean, 0.0)), dtype=np.float64)


def texture_weight(
    rgb: NDArray[np.generic],
    floor: float,
    *,
    within: NDArray[np.floating] | None = None,
    quantile: float | None = None,
) -> Float32Array:
    """A per-pixel share of the budget, ``[h, w]`` in ``[floor, 1]``, from the local luminance contrast.

    A change of a few grey levels is invisible in hair, eyes and edges and visible on smooth skin or
    sky (contrast masking; the same reason SSIM falls fastest in flat areas). The share is the local
    contrast (:func:`local_contrast`) over a reference contrast, clipped: :data:`TEXTURE_STD`, or with
    ``quantile`` that quantile of the contrast where ``within`` (the face mask) exceeds 0.5, so that a
    smooth photo (an upscaled one) still gives its most textured pixels the whole budget.
    """
    if floor >= 1:
        return np.ones(rgb.shape[:2], np.float32)
    contrast = local_contrast(rgb)
    reference = TEXTURE_STD
    if quantile is not None:
        inside = contrast[within > 0.5] if within is not None else contrast.ravel()
        if inside.size:
            reference = min(TEXTURE_STD, max(float(np.quantile(inside, quantile)), 1.0))
    return np.clip(contrast / reference, floor, 1.0).astype(np.float32)


def _box_sum(padded: Float64Array, r: int) -> Float64Array:
    """Sums over the ``(2r+1)^2`` windows of an array padded by ``r`` (integral image)."""
    k = 2 * r + 1
    c = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1))
    c[1:, 1:] = padded.cumsum(0).cumsum(1)
    return np.asarray(c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k], dtype=np.float64)


class CropWarp(LinearMap):
    """A warp of square crops ``[N, S, S, C]`` onto crops of the same size (each image alike)."""

    def __init__(self, warp: Warp) -> None:
        self.warp = warp

    def forward(self, images: Float32Array) -> Float32Array:
        return np.stack([self.warp.apply(np.ascontiguousarray(image, dtype=np.float32)) for image in images])

    def adjoint(self, grad: Float32Array) -> Float32Array:
        return np.stack([self.warp.adjoint_photo(g) for g in grad])


@dataclass(frozen=True, kw_only=True)
class AlignmentJitter(InputDiversity):
    """Input diversity for aligned faces: a random small similarity transform of the crop.

    Xie et al.'s DI (CVPR 2019) shrinks the input and pads it with black; for a face crop the nearer
    change is the one a recognizer's own pipeline makes: another detector (or the same one on the
    cloaked photo) puts the landmarks a little elsewhere, so the crop is scaled, shifted and rotated a
    little. Each draw (with ``probability``) resamples the crop bilinearly about its centre with a scale
    in ``1 +- scale``, a rotation in ``+-rotation`` degrees and a shift in ``+-shift`` of the side; the
    map is linear with an exact adjoint (:class:`~uncnn_rt.runtime.warp.Warp`), edges are replicated.
    """

    scale: float = 0.05
    rotation: float = 4.0
    shift: float = 0.03

    def sample(self, size: tuple[int, int], rng: np.random.Generator) -> LinearMap | None:
        if rng.random() >= self.probability:
            return None
        side = size[0]
        if size[1] != side:
            raise InputError(f"alignment jitter needs square crops, got {size}")
        factor = 1.0 + float(rng.uniform(-self.scale, self.scale))
        angle = math.radians(float(rng.uniform(-self.rotation, self.rotation)))
        shift = rng.uniform(-self.shift, self.shift, size=2) * side
        a = factor * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        centre = np.array([side / 2, side / 2])
        matrix = np.concatenate([a, (centre + shift - a @ centre)[:, None]], axis=1)
        return CropWarp(Warp(matrix, (side, side), side, antialias=False))


# ---------------------------------------------------------------------------------------------------
# the cloak


def cloak_image(
    loaded: LoadedImage,
    *,
    recognizers: Sequence[AttackSession],
    detector: Detector | None = None,
    mode: str | CloakSettings = DEFAULT_MODE,
    eps: float | None = None,
    steps: int | None = None,
    ssim_min: float | None = None,
    face: int | None = None,
    largest: bool = False,
    no_align: bool = False,
    target: dict[str, Float32Array] | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> CloakResult:
    """Cloak the faces of a decoded photo; see the module docstring for the method and the modes.

    Args:
        loaded: the photo (:func:`uncnn_rt.runtime.imageio.load_image`).
        recognizers: the white-box ensemble (attack graphs of face models with thresholds).
        detector: finds faces and landmarks; not needed with ``no_align``.
        mode: ``low``, ``mid`` or ``high``; ``eps``, ``steps``, ``ssim_min`` override its values
            (``ssim_min <= 0``: no floor).
        face: cloak only this face (0-based, faces ordered left to right); ``largest``: only the
            largest. Default: every face.
        no_align: treat the centred square of the whole image as the face (a chip or portrait).
        target: per recognizer name, a unit embedding ``[D]`` to move the faces towards
            (:func:`target_embeddings`); default untargeted (away from each face's own embedding).
        seed: seed of every random draw; equal seeds give equal results.
        progress: called after each attack step.

    Raises:
        NoFaceError: no face found (and not ``no_align``).
        InputError: bad arguments, or a target lacking a recognizer's embedding.
    """
    start = time.perf_counter()
    settings = settings_for(mode, eps=eps, steps=steps, ssim_min=ssim_min)
    size = crop_size_for(recognizers)
    names = [r.name for r in recognizers]
    if len(set(names)) != len(names):
        raise InputError(f"recognizers need distinct names, got {names}")
    if target is not None:
        missing = [n for n in names if n not in target]
        if missing:
            raise InputError(f"the target has no embedding for {', '.join(missing)}")
    original = loaded.rgb
    height, width = original.shape[:2]
    sites = find_faces(original, detector, size=size, no_align=no_align, name=loaded.name)
    chosen = select_faces(sites, face=face, largest=largest)
    warps = {i: Warp(sites[i].crop_to_photo, (height, width), size) for i in chosen}
    regions = {i: region_box(warps[i], height, width) for i in chosen}

    photo = original.copy()
    rng = np.random.default_rng(seed)
    attack = _attack(settings)
    targeted = target is not None
    owned: dict[int, Float32Array] = {}  # per face, its share of the budget on its region
    clean, references, outcomes, steps_run = {}, {}, {}, {}
    for order, i in enumerate(chosen):
        mask = _exclusive_mask(i, chosen, warps, regions[i], settings)
        if settings.texture_floor < 1:
            mask *= texture_weight(
                original[regions[i].slices],
                settings.texture_floor,
                within=mask,
                quantile=settings.texture_quantile,
            )
        owned[i] = mask
        clean[i] = embed(original, sites[i], recognizers)
        references[i] = clean[i] if target is None else {n: np.asarray(target[n], np.float32) for n in names}
        victims = [Victim(r, references[i][r.name][None], name=r.name) for r in recognizers]
        result = _on_face(attack, settings, warps[i])(
            photo[regions[i].slices][None].astype(np.float32),
            victims,
            targeted=targeted,
            mask=mask,
            quantize=True,
            stop_when=PastThresholds(targeted=targeted, margin=settings.stop_margin),
            seed=rng,
            input_map=CropMap(warps[i], regions[i]),
            luminance_only=loaded.is_grayscale,
            on_step=_reporter(progress, order + 1, len(chosen), settings.steps),
        )
        photo[regions[i].slices] = result.to_uint8()[0]
        outcomes[i], steps_run[i] = _outcomes(result, recognizers), int(result.steps[0])

    # Recognizers align the cloaked photo themselves, and landmarks found on it differ a little from the
    # clean photo's. Each refinement round re-detects the faces as the verify step will and continues the
    # attack, from the perturbation so far, on faces that fall short under their new alignment.
    for _ in range(settings.refine_rounds):
        if no_align or detector is None:
            break
        found = sites_from_detections(detector.detect(photo), size)
        redo = []
        for i in chosen:
            match = _best_match(sites[i], found)
            if match is None:
                continue
            moved = FaceSite(match.crop_to_photo, size, match.box, match.landmarks, match.score)
            if not _past_margin(photo, moved, recognizers, references[i], targeted, settings.stop_margin):
                redo.append((i, moved))
        if not redo:
            break
        for order, (i, moved) in enumerate(redo):
            warp = Warp(moved.crop_to_photo, (height, width), size)
            region = _union(regions[i], region_box(warp, height, width))
            mine = np.maximum(_paste(owned[i], regions[i], region), face_mask(warp, region, settings.feather))
            for j in chosen:
                if j != i and _overlaps(regions[j], region):
                    mine[_paste(owned[j], regions[j], region) > 0] = 0.0
            own = (photo[region.slices].astype(np.float32) - original[region.slices]) * (
                _paste(owned[i], regions[i], region)[..., None] > 0
            )
            victims = [Victim(r, references[i][r.name][None], name=r.name) for r in recognizers]
            result = _on_face(replace(attack, steps=settings.refine_steps), settings, warp)(
                (photo[region.slices] - own)[None].astype(np.float32),
                victims,
                targeted=targeted,
                mask=mine,
                quantize=True,
                stop_when=PastThresholds(targeted=targeted, margin=settings.stop_margin),
                seed=rng,
                input_map=CropMap(warp, region),
                luminance_only=loaded.is_grayscale,
                on_step=_reporter(progress, order + 1, len(redo), settings.refine_steps),
                init=own[None],
            )
            photo[region.slices] = result.to_uint8()[0]
            owned[i], regions[i] = mine, region
            outcomes[i], steps_run[i] = _outcomes(result, recognizers), steps_run[i] + int(result.steps[0])

    if settings.ssim_min is not None and any(
        _overlaps(regions[i], regions[j]) for a, i in enumerate(chosen) for j in chosen[a + 1 :]
    ):
        photo = _hold_ssim_together(original, photo, [regions[i] for i in chosen], settings.ssim_min)
    faces = []
    for i in chosen:
        before, after = original[regions[i].slices], photo[regions[i].slices]
        faces.append(
            CloakedFace(
                number=i + 1,
                site=sites[i],
                region=regions[i],
                steps=steps_run[i],
                clean=clean[i],
                references=references[i],
                outcomes=outcomes[i],
                linf=int(np.abs(after.astype(np.int16) - before).max(initial=0)),
                ssim=float(image_ops.ssim(before[None], after[None])[0])
                if min(regions[i].height, regions[i].width) >= 11
                else 1.0,
            )
        )
    return CloakResult(
        image=photo,
        faces=tuple(faces),
        settings=settings,
        targeted=targeted,
        no_align=no_align,
        models=tuple(names),
        crop_size=size,
        seconds=time.perf_counter() - start,
    )


def _reporter(progress: ProgressCallback | None, face: int, faces: int, steps: int) -> Callable[[int], None]:
    def report(done: int) -> None:
        if progress is not None:
            progress(CloakProgress(face, faces, done, steps))

    return report


def _outcomes(result: AttackResult, recognizers: Sequence[AttackSession]) -> tuple[ModelOutcome, ...]:
    return tuple(
        ModelOutcome(
            name=r.name,
            threshold=r.info.threshold,
            similarity=float(result.objective[r.name][0]),
            passed=bool(result.success[r.name][0]) if r.name in result.success else False,
        )
        for r in recognizers
    )


def _best_match(site: FaceSite, found: Sequence[FaceSite]) -> FaceSite | None:
    """The detection overlapping ``site`` most, if its box IoU reaches :data:`MATCH_IOU`."""
    if site.box is None:
        return None
    best = max(found, key=lambda other: box_iou(site.box, other.box), default=None)  # type: ignore[arg-type]
    return best if best is not None and box_iou(site.box, best.box) >= MATCH_IOU else None  # type: ignore[arg-type]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _past_margin(
    photo: Uint8Array,
    site: FaceSite,
    recognizers: Sequence[AttackSession],
    references: dict[str, Float32Array],
    targeted: bool,
    margin: float,
) -> bool:
    """Whether every recognizer with a threshold is past it by ``margin`` on the face at ``site``."""
    seen = embed(photo, site, recognizers)
    for r in recognizers:
        threshold = r.info.threshold
        if threshold is None:
            continue
        similarity = float(seen[r.name] @ references[r.name])
        if (similarity <= threshold + margin) if targeted else (similarity >= threshold - margin):
            return False
    return True


def _union(a: Box, b: Box) -> Box:
    return Box(min(a.top, b.top), min(a.left, b.left), max(a.bottom, b.bottom), max(a.right, b.right))


def _paste(values: Float32Array, source: Box, target: Box) -> Float32Array:
    """``values`` laid out on ``source``, read on ``target`` (zero where ``source`` does not reach)."""
    out = np.zeros((target.height, target.width), np.float32)
    top, left = max(source.top, target.top), max(source.left, target.left)
    bottom, right = min(source.bottom, target.bottom), min(source.right, target.right)
    if top < bottom and left < right:
        out[top - target.top : bottom - target.top, left - target.left : right - target.left] = values[
            top - source.top : bottom - source.top, left - source.left : right - source.left
        ]
    return out


def _attack(settings: CloakSettings) -> MIFGSM:
    diversity = AlignmentJitter(probability=settings.diversity) if settings.diversity > 0 else None
    transforms: list[Transform] = [] if settings.eot_quality is None else [Jpeg(settings.eot_quality)]
    if settings.eot_downscale is not None:
        transforms.append(Downscale(settings.eot_downscale))
    eot = EOT(transforms=tuple(transforms)) if transforms else None
    smoothing = TranslationInvariance(radius=settings.smoothing) if settings.smoothing > 0 else None
    return MIFGSM(
        eps=settings.eps,
        steps=settings.steps,
        step_size=settings.step_size,
        momentum=settings.momentum,
        # From the clean image the cosine objective sits at its maximum (zero gradient); DI and EOT
        # move the point where the gradient is taken, otherwise start from a random point.
        random_start=diversity is None and eot is None,
        ssim_floor=settings.ssim_min,
        diversity=diversity,
        eot=eot,
        smoothing=smoothing,
        check_every=settings.check_every,
        ssim_every=settings.ssim_every,
        focus_margin=settings.stop_margin,
        victims_per_step=settings.models_per_step,
        schedule=settings.schedule,
        schedule_floor=settings.schedule_floor,
    )


def _on_face(attack: MIFGSM, settings: CloakSettings, warp: Warp) -> MIFGSM:
    """The attack with its coarse grid converted from crop pixels to this face's photo pixels."""
    if settings.coarse <= 1.0 and not settings.scales:
        return attack
    scale = _crop_scale(warp)
    return replace(
        attack,
        coarse=max(1.0, settings.coarse * scale),
        scales=tuple(max(1.0, c * scale) for c in settings.scales),
    )


def _exclusive_mask(
    index: int, chosen: Sequence[int], warps: dict[int, Warp], region: Box, settings: CloakSettings
) -> Float32Array:
    """Face ``index``'s mask on ``region``, zero where another chosen face's mask is larger (ties: the
    earlier face), so that every pixel belongs to at most one face and the L-inf budget holds."""
    mine = face_mask(warps[index], region, settings.feather, settings.feather_inside)
    for j in chosen:
        if j == index or not _overlaps(warps[j].box, region):
            continue
        theirs = face_mask(warps[j], region, settings.feather, settings.feather_inside)
        mine = np.where((theirs > mine) | ((theirs == mine) & (j < index)), np.float32(0.0), mine)
    return np.asarray(mine, dtype=np.float32)


def _overlaps(a: Box, b: Box) -> bool:
    return a.top < b.bottom and b.top < a.bottom and a.left < b.right and b.left < a.right


def _hold_ssim_together(
    original: Uint8Array, photo: Uint8Array, regions: Sequence[Box], floor: float
) -> Uint8Array:
    """Scale the whole perturbation down (bisection on a common factor, truncating towards the original)
    when overlapping face regions pushed a region's SSIM, or the photo's, under the floor. Each face's
    attack held the floor against the photo it started from; with disjoint regions that is the original.
    """

    def worst(candidate: Uint8Array) -> float:
        scores = [image_quality(original, candidate)[0]]
        scores += [
            float(image_ops.ssim(original[r.slices][None], candidate[r.slices][None])[0])
            for r in regions
            if min(r.height, r.width) >= 11
        ]
        return min(scores)

    if worst(photo) >= floor:
        return photo
    delta = photo.astype(np.float32) - original
    lo, hi = 0.0, 1.0
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst(_scaled(original, delta, mid)) >= floor else (lo, mid)
    return _scaled(original, delta, lo)


def _scaled(original: Uint8Array, delta: Float32Array, factor: float) -> Uint8Array:
    return np.asarray(np.clip(np.trunc(delta * factor) + original, 0, 255), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# whole-image quality, computed where the images differ


def changed_box(a: NDArray[np.generic], b: NDArray[np.generic]) -> Box | None:
    """The smallest box holding every pixel where ``a`` and ``b`` ``[H, W, C]`` differ, or None."""
    diff = np.any(a != b, axis=2)
    rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
    if rows.size == 0:
        return None
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def image_quality(
    original: NDArray[np.generic], other: NDArray[np.generic], *, strip: int = 128
) -> tuple[float, float]:
    """Whole-image ``(SSIM, PSNR)`` of ``other`` against ``original`` (``[H, W, 3]``, 0..255).

    SSIM equals :func:`image_ops.ssim` on the whole image, but only windows that see a changed pixel are
    computed (unchanged windows score exactly 1), in strips of rows, so a 12 MP photo needs tens of MB.
    """
    a, b = np.asarray(original), np.asarray(other)
    if a.shape != b.shape or a.ndim != 3:
        raise InputError(f"quality needs two [H, W, C] images of one shape, got {a.shape} and {b.shape}")
    box = changed_box(a, b)
    if box is None:
        return 1.0, math.inf
    height, width = a.shape[:2]
    sq = 0.0
    for r in range(box.top, box.bottom, strip):
        d = a[r : min(r + strip, box.bottom), box.left : box.right].astype(np.float64)
        d -= b[r : min(r + strip, box.bottom), box.left : box.right]
        sq += float(np.square(d).sum())
    mse = sq / a.size
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    radius = 5  # the 11-tap window of image_ops.ssim
    if min(height, width) < 2 * radius + 1:
        return 1.0 - float(mse > 0), psnr
    # Window centres that can see a change, within the valid range [radius, H - radius).
    c_top, c_bottom = max(radius, box.top - radius), min(height - radius, box.bottom + radius)
    c_left, c_right = max(radius, box.left - radius), min(width - radius, box.right + radius)
    total = (height - 2 * radius) * (width - 2 * radius) * a.shape[2]
    counted = 0
    summed = 0.0
    cols = slice(c_left - radius, c_right + radius)
    for r in range(c_top, c_bottom, strip):
        r_end = min(r + strip, c_bottom)
        rows = slice(r - radius, r_end + radius)
        n = (r_end - r) * (c_right - c_left) * a.shape[2]
        summed += float(image_ops.ssim(a[None, rows, cols], b[None, rows, cols])[0]) * n
        counted += n
    return (summed + (total - counted)) / total, psnr
