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

The faces of a photo are attacked together, one batch per step through each recognizer
(:class:`_BatchRunner`), each face with its own reference, budget, momentum, early stop and cap.
``Q`` rounds to whole grey levels, so the loop sees exactly the uint8 pixels that are saved. The
untargeted objective is each recognizer's cosine similarity to the face's own clean embedding
(descended); with a target identity it is the similarity to the target's embedding (ascended).
Grey photos get the same delta on R, G and B, so they stay grey.

**Modes** are visibility caps (DESIGN.md, "Visibility"). Each face region (the detector's box grown
by a quarter of its side, :func:`visibility.face_region`) may change at most as much, in FLIP and in
mean CIEDE2000, as the photo's own JPEG re-encode at the mode's quality changes it there; the cap is
held inside the loop and checked on the pixels as the output file stores them (``saved``):

======  ===================================  ====  =====  ==========================================
mode    cap per face region                  eps   steps  recipe
======  ===================================  ====  =====  ==========================================
low     JPEG q85 re-encode                   12    16     MI, jitter p 0.5, EOT JPEG 70..95, steps from 3
mid     JPEG q75 re-encode, CIEDE2000 <= 1.3 16    18     MI, jitter p 0.5, EOT JPEG 70..95, steps from 4
high    2x the JPEG q75 re-encode's figures  24    40     as mid, steps from 5, 3 refinement rounds
======  ===================================  ====  =====  ==========================================

Where the budget goes: the change is grey (the same step on R, G and B: colour carried a third of the
visibility of earlier cloaks and little of their protection), per photo pixel (FLIP's contrast
sensitivity filters hide fine texture; smooth, low-frequency shifts on skin are what people see
first: at the same FLIP, a coarse grid with some colour protected 3 of 43 leave-one-out probes where
per-pixel grey steps protected 14, ``bench/RESULTS.md``, run 15), and shaped by a luminance
just-noticeable-difference model (:func:`visibility.luminance_jnd`: hair, beard, brows, edges and dark
areas take up to the whole eps, smooth mid-grey skin 30% of it). The step size shrinks from the mode's
first step to 30% of it along a cosine.

Every mode stops a face early once every white-box recognizer is past its threshold by
``stop_margin`` (checked every ``check_every`` steps on the exact uint8 pixels), and spends each step
on one recognizer, drawn in proportion to how far it is from its threshold (a stochastic ensemble:
the momentum sums them). Figures of each mode on the colour set: ``README.md`` and ``bench/RESULTS.md``.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import image_ops, visibility, zoo
from uncnn_rt.runtime.align import (
    CANONICAL_SIZE,
    transform_for_blazeface,
    transform_for_box,
    transform_for_whole_image,
)
from uncnn_rt.runtime.attacks import (
    EOT,
    MIFGSM,
    AttackResult,
    BoundCap,
    Downscale,
    InputDiversity,
    Jpeg,
    LinearMap,
    PastThresholds,
    PerImage,
    PerImageCap,
    Resize,
    Transform,
    TranslationInvariance,
    Victim,
    VisibilityCap,
)
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.imageio import LoadedImage, LossyOutput
from uncnn_rt.runtime.sessions import AttackSession, open_session
from uncnn_rt.runtime.warp import Box, Warp, feather_mask

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
        cap_jpeg: each face's visibility cap is this JPEG quality's re-encode of the same face: the
            cloak's FLIP and CIEDE2000 mean on the face region (:func:`visibility.face_region`) are at
            most ``cap_scale`` times the re-encode's (None: no cap).
        cap_scale: see ``cap_jpeg``.
        cap_ciede2000: a limit on the face region's CIEDE2000 mean besides the re-encode's, or None.
        cap_every: steps between holds of the cap (the result always meets it).
        chroma: the chroma part's share of the luminance part's step and budget (0: the same change on
            R, G and B; see :class:`~uncnn_rt.runtime.attacks.GradientAttack`).
        jnd_floor: shape the budget by the luminance just-noticeable difference
            (:func:`visibility.luminance_jnd`): each pixel's share is its JND over the face's 90th
            percentile, clipped to ``[jnd_floor, 1]``; None: no JND shaping.
        scatter: weight of each face's own random direction in every recognizer's embedding space
            (:func:`scatter_directions`): an untargeted cloak then also moves towards it, so that one
            person's cloaked photos scatter instead of moving away from their clean embeddings
            together, and still match each other (P3 of ``uncnn-rt eval``). 0: off.
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
    cap_jpeg: int | None = None
    cap_scale: float = 1.0
    cap_ciede2000: float | None = None
    cap_every: int = 4
    chroma: float = 1.0
    jnd_floor: float | None = None
    scatter: float = 0.0

    def describe(self) -> str:
        parts = [f"eps {self.eps:g}", f"{self.steps} steps"]
        if self.cap_jpeg is not None:
            scale = "" if self.cap_scale == 1 else f"{self.cap_scale:g}x "
            de = "" if self.cap_ciede2000 is None else f", CIEDE2000 <= {self.cap_ciede2000:g}"
            parts.append(f"visible at most as {scale}JPEG q{self.cap_jpeg}{de}")
        if self.ssim_min is not None:
            parts.append(f"SSIM >= {self.ssim_min:g}")
        if self.scatter > 0:
            parts.append(f"scatter {self.scatter:g}")
        return f"{self.mode}: " + ", ".join(parts)

    @property
    def cap_label(self) -> str | None:
        """The cap in words (``JPEG q75``, ``2x JPEG q75``), or None without one."""
        if self.cap_jpeg is None:
            return None
        return ("" if self.cap_scale == 1 else f"{self.cap_scale:g}x ") + f"JPEG q{self.cap_jpeg}"


# The modes' shared basis. Under an SSIM floor, a perturbation on a grid 4 crop pixels coarse (averaged
# with one 8 pixels coarse) afforded twice the L-inf budget and transferred further (bench/RESULTS.md,
# runs 8-14). Under a visibility cap it is the worst shape: FLIP and people see smooth shifts on skin
# first, and at the same FLIP the coarse grid (with a 25% chroma share) protected 3 of 43 leave-one-out
# probes of the colour set, per-pixel grey steps 14 (run 15). The step shrinks along a cosine from the
# mode's first step to 30% of it.
SCHEDULE: Final = "cosine"
SCHEDULE_FLOOR: Final = 0.3
# The budget's shape (run 15): grey steps only (a chroma share of 0.3 protected 5 of 43 probes where grey
# protected 9, at the same FLIP), and each pixel's share of eps its luminance JND over the face's 90th
# percentile, at least 30% (without the JND shaping: 12 of 43 where it gave 14).
CHROMA: Final = 0.0
JND_FLOOR: Final = 0.3


def _mode(name: str, **specific: Any) -> CloakSettings:
    """A mode on the shared basis (per-pixel grey steps shaped by the JND, cosine schedule) with its own
    budget, cap and rounds."""
    return CloakSettings(
        name,
        schedule=SCHEDULE,
        schedule_floor=SCHEDULE_FLOOR,
        chroma=CHROMA,
        jnd_floor=JND_FLOOR,
        **specific,
    )


MODES: Final[dict[str, CloakSettings]] = {
    "low": _mode("low", eps=12.0, steps=16, ssim_min=None, step_size=3.0, cap_jpeg=85),
    # 18 + 8 steps, checked every 6: the same protection under the cap as 24 + 12 checked every 3
    # (19 against 17 of 43 white-box probes, 10 against 7 leave-one-out), in 0.75x the time
    # (bench/RESULTS.md, run 16).
    "mid": _mode(
        "mid",
        eps=16.0,
        steps=18,
        ssim_min=None,
        step_size=4.0,
        stop_margin=0.08,
        check_every=6,
        refine_steps=8,
        cap_jpeg=75,
        cap_ciede2000=1.3,
    ),
    "high": _mode(
        "high",
        eps=24.0,
        steps=40,
        ssim_min=None,
        step_size=5.0,
        stop_margin=0.1,
        refine_rounds=3,
        cap_jpeg=75,
        cap_scale=2.0,
    ),
}
DEFAULT_MODE: Final = "mid"


def settings_for(
    mode: str | CloakSettings = DEFAULT_MODE,
    *,
    eps: float | None = None,
    steps: int | None = None,
    ssim_min: float | None = None,
    coarse: float | None = None,
    cap: str | None = None,
    scatter: float | None = None,
) -> CloakSettings:
    """A mode's settings (a name of :data:`MODES`, or settings) with explicit overrides (``ssim_min <= 0``
    turns the floor off; ``coarse`` replaces the mode's grids by one, 1 stepping per photo pixel;
    ``cap`` is :func:`parse_cap`'s text, ``none`` turning the visibility cap off; ``scatter`` the weight of
    each face's own random direction, 0 off)."""
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
    if cap is not None:
        quality, scale = parse_cap(cap)
        settings = replace(
            settings,
            cap_jpeg=quality,
            cap_scale=scale,
            cap_ciede2000=None if quality is None else settings.cap_ciede2000,
        )
    if scatter is not None:
        if not 0 <= scatter <= 10 or math.isnan(scatter):
            raise InputError(f"scatter must be in 0..10, got {scatter}")
        settings = replace(settings, scatter=float(scatter))
    if (eps, steps, ssim_min, coarse, cap, scatter) != (None,) * 6 and not settings.mode.endswith("(custom)"):
        settings = replace(settings, mode=f"{settings.mode} (custom)")
    return settings


def parse_cap(text: str) -> tuple[int | None, float]:
    """``none`` -> no cap; ``jpeg75`` -> at most the q75 re-encode; ``2xjpeg75`` -> twice its figures."""
    t = text.strip().lower()
    if t == "none":
        return None, 1.0
    scale = 1.0
    if "x" in t.split("jpeg")[0]:
        head, _, t = t.partition("x")
        try:
            scale = float(head)
        except ValueError:
            scale = math.nan
    quality = t.removeprefix("jpeg")
    if not quality.isdigit() or not 1 <= int(quality) <= 95 or not 0 < scale < math.inf:
        raise InputError(
            f"a visibility cap is none, jpegQ (Q in 1..95) or Kxjpeg Q (e.g. 2xjpeg75), got {text!r}"
        )
    return int(quality), scale


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
    """SSIM of the face region (``visible_region``), cloaked against the original."""
    visible_region: Box | None = None
    """The face region the visibility figures are taken on (:func:`visible_region`)."""
    visibility: visibility.Visibility | None = None
    """FLIP, CIEDE2000, SSIM and PSNR of the face region, cloaked against the original."""
    limits: FaceLimits | None = None
    """The face's visibility cap, when the mode has one."""

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
    seed: int = 0
    """The seed of every random draw (scatter directions, jitter, EOT): the same seed repeats the cloak."""
    output_quality: int | None = None
    """The quality the output must be written at for the caps to hold (:func:`room_for_the_cloak`), or
    None: the format's default for this photo (also when the output is lossless)."""

    @property
    def passed(self) -> bool:
        return all(face.passed for face in self.faces)


@dataclass(frozen=True)
class CloakProgress:
    """A progress event: ``face`` of ``faces`` (1-based) is at ``step`` of at most ``steps``; with
    ``batch`` > 1, faces ``face`` to ``face + batch - 1`` are attacked together."""

    face: int
    faces: int
    step: int
    steps: int
    batch: int = 1

    @property
    def label(self) -> str:
        """``face 2/3`` or, for a batch, ``faces 1-6/6``."""
        if self.batch <= 1:
            return f"face {self.face}/{self.faces}"
        return f"faces {self.face}-{self.face + self.batch - 1}/{self.faces}"


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
        from uncnn_rt.runtime.detect import FaceDetector
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
# the visibility cap of a face


MIN_CAP: Final = visibility.Visibility(0.01, 0.25, 0.0, 1.0, math.inf)
"""The least cap a face gets, for faces so flat that their JPEG re-encode is all but lossless."""


ENCODER_SHARE: Final = 0.5
"""Most of a face's cap (FLIP and CIEDE2000 each) that the output encoder's own loss may take: a lossy
output whose round trip of the clean photo takes more is written at a higher quality
(:func:`room_for_the_cloak`)."""
OUTPUT_QUALITIES: Final = (90, 95, 98, 100)
"""The higher qualities :func:`room_for_the_cloak` tries, in order."""


BATCH_FACES: Final = 8
"""Most faces one batched attack call takes (:class:`_BatchRunner`)."""
BATCH_PIXELS: Final = 1_500_000
"""Most pixels (faces times the largest region's area) of one batched attack call. The loop keeps
about a dozen float32 copies of its images, so a batch stays near 200 MB whatever the photo holds."""


SEARCH_PIXELS: Final = 60_000
"""The in-loop cap samples a face region larger than this on every ``stride``-th row and column, so
that one evaluation costs about as much as on a region of this size; the result is checked on every
pixel."""


@dataclass(frozen=True)
class FaceLimits:
    """A face's visibility cap: its region in the photo and the FLIP and CIEDE2000-mean limits there,
    with the JPEG re-encode figures they come from."""

    region: Box
    flip: float
    ciede2000: float
    reference: visibility.Visibility
    """The figures of the re-encode the cap is taken from (the photo's own JPEG at ``cap_jpeg``)."""


def face_limits(original: Uint8Array, region: Box, settings: CloakSettings) -> FaceLimits | None:
    """The cap of the face whose region (:func:`visibility.face_region`) is ``region``, or None when the
    mode has no cap."""
    if settings.cap_jpeg is None:
        return None
    finer = tuple(q for q in visibility.JPEG_LADDER if q > settings.cap_jpeg)
    stride = visibility.search_stride(region.height, region.width, SEARCH_PIXELS)
    ladder = visibility.region_ladder(original, region, (settings.cap_jpeg, *finer), stride=stride)
    ladder = visibility.envelope(ladder)
    ref = ladder[settings.cap_jpeg]
    flip = max(settings.cap_scale * ref.flip, MIN_CAP.flip)
    de = max(settings.cap_scale * ref.ciede2000_mean, MIN_CAP.ciede2000_mean)
    if settings.cap_ciede2000 is not None:
        de = min(de, settings.cap_ciede2000)
    return FaceLimits(region, flip, de, ref)


def scatter_rng(seed: int, photo: Uint8Array, face: int) -> np.random.Generator:
    """The random source of a face's scatter directions: the run's seed, the photo's pixels and the
    face's number, so that every photo (and face) of a run gets its own directions, and a run repeats
    only with its seed."""
    return np.random.default_rng([seed, zlib.crc32(np.ascontiguousarray(photo).data), face])


def scatter_directions(clean: dict[str, Float32Array], rng: np.random.Generator) -> dict[str, Float32Array]:
    """Per recognizer, a random unit direction orthogonal to the face's clean embedding.

    Moving towards it leaves the clean embedding as moving away from it does, but each photo goes its
    own way: random directions in a space of 128-1024 dimensions are nearly orthogonal to one another,
    so one person's cloaks move apart instead of together. A tracker cannot predict them without the
    run's seed."""
    out = {}
    for name, e in clean.items():
        unit = np.asarray(e, np.float64) / max(float(np.linalg.norm(e)), 1e-12)
        draw = rng.standard_normal(unit.shape[0])
        d = draw - float(draw @ unit) * unit
        out[name] = np.asarray(d / max(float(np.linalg.norm(d)), 1e-12), dtype=np.float32)
    return out


def room_for_the_cloak(original: Uint8Array, limits: Sequence[FaceLimits], saved: LossyOutput) -> LossyOutput:
    """``saved`` at the lowest quality, its own or one of :data:`OUTPUT_QUALITIES` above it, whose round
    trip of the clean photo takes at most :data:`ENCODER_SHARE` of every face's cap (else the highest).

    A cap is the photo's own JPEG re-encode at the mode's quality (and at most a CIEDE2000 mean of 1.3
    in ``mid``). Written at a quality near that one, or a noisy photo written at q95, the file's own
    encoding loss can take all of it: the cloak would have to be 0. Measured on strided samples of
    each face region, like the in-loop cap."""
    trial = saved
    for quality in (saved.quality, *(q for q in OUTPUT_QUALITIES if q > saved.quality)):
        trial = saved.at(quality)
        if all(_encoder_fits(original, trial, lim) for lim in limits):
            return trial
    return trial


def _encoder_fits(original: Uint8Array, saved: LossyOutput, limits: FaceLimits) -> bool:
    """Whether ``saved``'s loss on the clean face region takes at most ENCODER_SHARE of its cap; only
    the region's JPEG window is encoded (:func:`visibility.jpeg_window`), not the whole photo."""
    window, inner = visibility.jpeg_window(original.shape, limits.region)
    crop = np.ascontiguousarray(original[window.slices])
    stride = visibility.search_stride(inner.height, inner.width, SEARCH_PIXELS)
    flip, de = visibility.colour_difference(crop[inner.slices], saved(crop)[inner.slices], stride=stride)
    return flip <= ENCODER_SHARE * limits.flip and de <= ENCODER_SHARE * limits.ciede2000


@dataclass(frozen=True)
class FaceCap(VisibilityCap):
    """The cap of :class:`FaceLimits` for an attack on a photo region: FLIP and CIEDE2000 mean of the
        face's box (``face``, in the attacked images' coordinates), each over its limit; at most 1 holds.

        The in-loop score computes CIEDE2000 in float32, the exact one in float64; FLIP is the same in both
        (:class:`visibility.FlipReference`, float32; ``tests/test_visibility.py`` holds it to NVIDIA's
    reference within a relative 2e-3).
    """

    face: Box
    flip: float
    ciede2000: float
    saved: Callable[[Uint8Array], Uint8Array] | None = field(default=None, compare=False)
    """The output encoder's round trip, applied to the attacked region before measuring (its blocks
    start on the JPEG grid, so they are the saved photo's), so the cap holds on the file as saved."""
    extent: tuple[int, int] | None = None
    """The attacked region's own ``H x W`` when its images come padded in a batch of larger ones
    (:class:`~uncnn_rt.runtime.attacks.PerImage`): the padding is cut off before ``saved``."""
    exponent: float = 0.85  # FLIP grows about as c^0.7 (its colour error's power), CIEDE2000 as c

    def bind(self, x0: Float32Array) -> BoundCap:
        return _BoundFaceCap(self, x0)


class _BoundFaceCap(BoundCap):
    def __init__(self, cap: FaceCap, x0: Float32Array) -> None:
        self.cap, self.exponent = cap, cap.exponent
        self.stride = visibility.search_stride(cap.face.height, cap.face.width, SEARCH_PIXELS)
        refs = [image_ops.to_uint8(x[cap.face.slices]) for x in x0]
        self.exact_flips = [visibility.FlipReference(r) for r in refs]
        self.fast_flips = (
            self.exact_flips
            if self.stride == 1
            else [visibility.FlipReference(r, stride=self.stride) for r in refs]
        )
        self.labs = [visibility.srgb_to_lab(r) for r in refs]
        s = self.stride
        self.labs_fast = [lab[::s, ::s].astype(np.float32) for lab in self.labs]

    def _ratio(self, flip: float, de: NDArray[np.floating]) -> float:
        return max(flip / self.cap.flip, float(de.mean(dtype=np.float64)) / self.cap.ciede2000)

    def _face(self, image: Float32Array) -> Uint8Array:
        if self.cap.extent is not None:
            image = image[: self.cap.extent[0], : self.cap.extent[1]]
        pixels = image_ops.to_uint8(image)
        if self.cap.saved is not None:
            pixels = self.cap.saved(pixels)
        return pixels[self.cap.face.slices]

    def fast(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        s, out = self.stride, np.empty(len(idx))
        for k, i in enumerate(idx):
            test = self._face(images[k])
            lab = visibility.srgb_to_lab(test[::s, ::s]).astype(np.float32)
            out[k] = self._ratio(self.fast_flips[i].mean(test), visibility.ciede2000(self.labs_fast[i], lab))
        return out

    def exact(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        out = np.empty(len(idx))
        for k, i in enumerate(idx):
            test = self._face(images[k])
            lab = visibility.srgb_to_lab(test)
            out[k] = self._ratio(self.exact_flips[i].mean(test), visibility.ciede2000(self.labs[i], lab))
        return out


def _within(outer: Box, inner: Box) -> Box:
    """``inner`` clipped to ``outer``, in ``outer``'s coordinates."""
    top, left = max(inner.top, outer.top) - outer.top, max(inner.left, outer.left) - outer.left
    bottom, right = min(inner.bottom, outer.bottom) - outer.top, min(inner.right, outer.right) - outer.left
    return Box(top, left, max(bottom, top + 1), max(right, left + 1))


def _box_ramp(shape: tuple[int, int], box: Box, width: float) -> Float32Array:
    """1 inside ``box`` (in an array of ``shape``), falling linearly to 0 over ``width`` pixels inside its
    edges: the perturbation stays inside the measured face region, with no hard edge of its own."""
    rows, cols = np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32)
    w = max(float(width), 1.0)
    ry = np.clip(np.minimum(rows - box.top + 0.5, box.bottom - rows - 0.5) / w, 0.0, 1.0)
    rx = np.clip(np.minimum(cols - box.left + 0.5, box.right - cols - 0.5) / w, 0.0, 1.0)
    return np.asarray(ry[:, None] * rx[None, :], dtype=np.float32)


def visible_region(site: FaceSite, region: Box, shape: tuple[int, ...]) -> Box:
    """Where a face's visibility is measured and capped: its detection box grown as
    :func:`visibility.face_region` does, or, for the whole image (no detection), the attacked region."""
    if site.box is None:
        return region
    return visibility.face_region(site.box, shape)


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
    cap: str | None = None,
    face: int | None = None,
    largest: bool = False,
    no_align: bool = False,
    target: dict[str, Float32Array] | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    saved: Callable[[Uint8Array], Uint8Array] | None = None,
    faces_per_batch: int | None = None,
) -> CloakResult:
    """Cloak the faces of a decoded photo; see the module docstring for the method and the modes.

    Args:
        loaded: the photo (:func:`uncnn_rt.runtime.imageio.load_image`).
        recognizers: the white-box ensemble (attack graphs of face models with thresholds).
        detector: finds faces and landmarks; not needed with ``no_align``.
        mode: ``low``, ``mid`` or ``high``; ``eps``, ``steps``, ``ssim_min`` and ``cap`` override its
            values (``ssim_min <= 0``: no floor; ``cap="none"``: no visibility cap).
        face: cloak only this face (0-based, faces ordered left to right); ``largest``: only the
            largest. Default: every face.
        no_align: treat the centred square of the whole image as the face (a chip or portrait).
        target: per recognizer name, a unit embedding ``[D]`` to move the faces towards
            (:func:`target_embeddings`); default untargeted (away from each face's own embedding).
        seed: seed of every random draw; equal seeds give equal results.
        progress: called after each attack step.
        saved: the pixels as the output file will hold them (encoded and decoded, e.g. a JPEG's); the
            visibility figures and caps are checked on them. Default: the pixels as they are (lossless).
        faces_per_batch: most faces attacked together in one batched attack call (each keeps its own
            reference, budget, momentum, early stop and cap; :class:`_BatchRunner`); 1 attacks them one
            after another. Default :data:`BATCH_FACES`, within :data:`BATCH_PIXELS`.

    Raises:
        NoFaceError: no face found (and not ``no_align``).
        InputError: bad arguments, or a target lacking a recognizer's embedding.
    """
    start = time.perf_counter()
    settings = settings_for(mode, eps=eps, steps=steps, ssim_min=ssim_min, cap=cap)
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
    visible = {i: visible_region(sites[i], regions[i], original.shape) for i in chosen}
    limits = {i: face_limits(original, visible[i], settings) for i in chosen}
    output_quality = None
    if isinstance(saved, LossyOutput):
        roomy = room_for_the_cloak(original, [lim for lim in limits.values() if lim is not None], saved)
        if roomy.quality != saved.quality:
            saved, output_quality = roomy, roomy.quality

    photo = original.copy()
    rng = np.random.default_rng(seed)
    attack = _attack(settings)
    targeted = target is not None
    clean = {i: embed(original, sites[i], recognizers) for i in chosen}
    aimed = None if target is None else {n: np.asarray(target[n], np.float32) for n in names}
    references = {i: clean[i] if aimed is None else aimed for i in chosen}
    # Per face, its share of the budget on its region: every pixel belongs to at most one face.
    owned = {}
    for i in chosen:
        mask = _exclusive_mask(i, chosen, warps, regions[i], settings)
        owned[i] = _shaped(mask, original, regions[i], visible[i], settings)
    run = _BatchRunner(
        attack, settings, recognizers, original, targeted=targeted, saved=saved, rng=rng,
        luminance_only=loaded.is_grayscale, progress=progress, faces_per_batch=faces_per_batch,
    )  # fmt: skip
    steers: dict[int, dict[str, Float32Array] | None] = dict.fromkeys(chosen)
    if settings.scatter > 0 and not targeted:
        for i in chosen:
            directions = scatter_directions(clean[i], scatter_rng(seed, original, i))
            steers[i] = {n: -np.float32(settings.scatter) * d for n, d in directions.items()}
    jobs = [
        _Job(i, warps[i], regions[i], owned[i], limits[i], references[i], steer=steers[i]) for i in chosen
    ]
    outcomes, steps_run = {}, dict.fromkeys(chosen, 0)
    for job, (_, outcome, taken) in run(jobs, photo, settings.steps):
        outcomes[job.face], steps_run[job.face] = outcome, taken

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
        jobs = []
        for i, moved in redo:
            warp = Warp(moved.crop_to_photo, (height, width), size)
            region = _union(regions[i], region_box(warp, height, width))
            fresh = _shaped(face_mask(warp, region, settings.feather), original, region, visible[i], settings)
            earlier = _paste(owned[i], regions[i], region)
            mine = np.maximum(earlier, fresh)
            for j in chosen:
                if j != i and _overlaps(regions[j], region):
                    mine[_paste(owned[j], regions[j], region) > 0] = 0.0
            jobs.append(
                _Job(i, warp, region, mine, limits[i], references[i], prior=earlier > 0, steer=steers[i])
            )
            owned[i], regions[i] = mine, region
        for job, (_, outcome, taken) in run(jobs, photo, settings.refine_steps):
            outcomes[job.face], steps_run[job.face] = outcome, steps_run[job.face] + taken

    if settings.ssim_min is not None and any(
        _overlaps(regions[i], regions[j]) for a, i in enumerate(chosen) for j in chosen[a + 1 :]
    ):
        photo = _hold_ssim_together(original, photo, [regions[i] for i in chosen], settings.ssim_min)
    shown = photo if saved is None else saved(photo)
    figures = {i: visibility.measure(original[visible[i].slices], shown[visible[i].slices]) for i in chosen}
    if any(exceeds(figures[i], limits[i]) for i in chosen):
        held = [lim for lim in limits.values() if lim is not None]
        photo = _hold_caps_together(original, photo, held, saved)
        shown = photo if saved is None else saved(photo)
        figures = {
            i: visibility.measure(original[visible[i].slices], shown[visible[i].slices]) for i in chosen
        }
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
                ssim=figures[i].ssim,
                visible_region=visible[i],
                visibility=figures[i],
                limits=limits[i],
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
        seed=seed,
        output_quality=output_quality,
    )


@dataclass(frozen=True)
class _Job:
    """One face's share of an attack call: where it is attacked, with what budget, against what."""

    face: int
    """Index of the face in the photo's detections."""
    warp: Warp
    region: Box
    mask: Float32Array
    """``[h, w]`` on ``region``: the face's share of the budget (0 where another face owns the pixel)."""
    limits: FaceLimits | None
    references: dict[str, Float32Array]
    prior: NDArray[np.bool_] | None = None
    """Where, on ``region``, the face's perturbation so far lies; the attack continues from it."""
    steer: dict[str, Float32Array] | None = None
    """Per recognizer, the face's scatter term (:func:`scatter_directions`), or None."""


_Done = tuple[Uint8Array, tuple[ModelOutcome, ...], int]
"""A job's result: its region's cloaked pixels, each recognizer's outcome, the steps it took."""


class _BatchRunner:
    """Runs the faces of a photo through the attack in batches: one call per batch, every face's crop
    through each recognizer in one run per step.

    Faces of one batch have regions of different sizes; each comes padded to the batch's largest
    (edge pixels, zero budget) in the top-left corner of its image, and reaches the models through its
    own crop warp (:class:`~uncnn_rt.runtime.attacks.PerImage`). The loop already keeps everything per
    image: reference, budget, momentum, early stop, verdict; the visibility cap is each face's own
    (:class:`~uncnn_rt.runtime.attacks.PerImageCap`). What a batch shares is the step's random draws
    (one alignment jitter, one JPEG quality, one recognizer). Batches run one after another, each from
    the photo as the batches before it left it; within a batch every face starts from the same photo.

    A coarse grid (its step converts per face to photo pixels) and an SSIM floor (padding would count
    in it) keep one face per call.
    """

    def __init__(
        self,
        attack: MIFGSM,
        settings: CloakSettings,
        recognizers: Sequence[AttackSession],
        original: Uint8Array,
        *,
        targeted: bool,
        saved: Callable[[Uint8Array], Uint8Array] | None,
        rng: np.random.Generator,
        luminance_only: bool,
        progress: ProgressCallback | None,
        faces_per_batch: int | None,
    ) -> None:
        if faces_per_batch is not None and faces_per_batch < 1:
            raise InputError(f"faces_per_batch must be >= 1, got {faces_per_batch}")
        self.attack, self.settings, self.recognizers, self.original = attack, settings, recognizers, original
        self.targeted, self.saved, self.rng = targeted, saved, rng
        self.luminance_only, self.progress = luminance_only, progress
        batchable = settings.ssim_min is None and settings.coarse <= 1.0 and not settings.scales
        self.most = (BATCH_FACES if faces_per_batch is None else faces_per_batch) if batchable else 1

    def batches(self, jobs: Sequence[_Job]) -> list[list[_Job]]:
        """Jobs packed in order into batches of at most ``most`` faces and :data:`BATCH_PIXELS` padded
        pixels (a batch always takes at least one face)."""
        out: list[list[_Job]] = []
        for job in jobs:
            if out:
                last = [*out[-1], job]
                h, w = max(j.region.height for j in last), max(j.region.width for j in last)
                if len(last) <= self.most and len(last) * h * w <= BATCH_PIXELS:
                    out[-1] = last
                    continue
            out.append([job])
        return out

    def __call__(self, jobs: Sequence[_Job], photo: Uint8Array, steps: int) -> list[tuple[_Job, _Done]]:
        """Attack ``jobs`` for at most ``steps`` steps each, batch after batch: each batch starts from
        ``photo`` as the batches before it left it, and pastes its faces' regions into it."""
        done: list[tuple[_Job, _Done]] = []
        batches = self.batches(jobs)
        first = 1
        for batch in batches:
            results = self._run(batch, photo, steps, first, len(jobs))
            for job, result in zip(batch, results, strict=True):
                photo[job.region.slices] = result[0]
                done.append((job, result))
            first += len(batch)
        return done

    def _run(self, batch: list[_Job], photo: Uint8Array, steps: int, first: int, faces: int) -> list[_Done]:
        settings, attack = self.settings, replace(self.attack, steps=steps)
        starts, priors = [], []
        for job in batch:
            pixels = photo[job.region.slices].astype(np.float32)
            prior = None
            if job.prior is not None:
                prior = (pixels - self.original[job.region.slices]) * job.prior[..., None]
            starts.append(pixels if prior is None else pixels - prior)
            priors.append(prior)
        single = len(batch) == 1
        if single:
            job = batch[0]
            attack = _on_face(attack, settings, job.warp, job.region, job.limits, self.saved)
            input_map: LinearMap = CropMap(job.warp, job.region)
            shape = (job.region.height, job.region.width)
        else:
            extents = [(j.region.height, j.region.width) for j in batch]
            input_map = PerImage([CropMap(j.warp, j.region) for j in batch], extents)
            shape = input_map.size
            caps = tuple(
                _face_cap(j.region, j.limits, self.saved, extent=(j.region.height, j.region.width))
                for j in batch
            )
            attack = replace(attack, cap=None if all(c is None for c in caps) else PerImageCap(caps))
        init = None
        if any(p is not None for p in priors):
            init = np.stack(
                [
                    _pad(np.zeros_like(s) if p is None else p, shape, "constant")
                    for s, p in zip(starts, priors, strict=True)
                ]
            )
        steered = any(j.steer is not None for j in batch)

        def steer(name: str) -> Float32Array | None:
            if not steered:
                return None
            zero = np.zeros_like(batch[0].references[name])
            return np.stack([zero if j.steer is None else j.steer[name] for j in batch])

        victims = [
            Victim(r, np.stack([j.references[r.name] for j in batch]), name=r.name, steer=steer(r.name))
            for r in self.recognizers
        ]
        progress = self.progress

        def report(step: int) -> None:
            if progress is not None:
                progress(CloakProgress(first, faces, step, steps, batch=len(batch)))

        result = attack(
            np.stack([_pad(s, shape, "edge") for s in starts]),
            victims,
            targeted=self.targeted,
            mask=np.stack([_pad(j.mask, shape, "constant") for j in batch]),
            quantize=True,
            stop_when=PastThresholds(targeted=self.targeted, margin=settings.stop_margin),
            seed=self.rng,
            input_map=input_map,
            luminance_only=self.luminance_only,
            on_step=report,
            init=init,
        )
        images = result.to_uint8()
        return [
            (
                images[k, : j.region.height, : j.region.width],
                _outcomes(result, self.recognizers, k),
                int(result.steps[k]),
            )
            for k, j in enumerate(batch)
        ]


def _pad(values: NDArray[Any], shape: tuple[int, int], how: str) -> NDArray[Any]:
    """``values`` (``[h, w]`` or ``[h, w, C]``) padded at the bottom and right to ``shape``: repeating the
    edge pixels (``edge``) or with zeros (``constant``)."""
    rows, cols = shape[0] - values.shape[0], shape[1] - values.shape[1]
    if rows == 0 and cols == 0:
        return values
    width = ((0, rows), (0, cols)) + ((0, 0),) * (values.ndim - 2)
    return np.asarray(np.pad(values, width, mode=how))  # type: ignore[call-overload]


def _outcomes(
    result: AttackResult, recognizers: Sequence[AttackSession], k: int = 0
) -> tuple[ModelOutcome, ...]:
    return tuple(
        ModelOutcome(
            name=r.name,
            threshold=r.info.threshold,
            similarity=float(result.objective[r.name][k]),
            passed=bool(result.success[r.name][k]) if r.name in result.success else False,
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
        chroma=settings.chroma,
        cap_every=settings.cap_every,
    )


def _on_face(
    attack: MIFGSM,
    settings: CloakSettings,
    warp: Warp,
    region: Box,
    limits: FaceLimits | None,
    saved: Callable[[Uint8Array], Uint8Array] | None = None,
) -> MIFGSM:
    """The attack with its coarse grid converted from crop pixels to this face's photo pixels, and
    this face's visibility cap on the attacked ``region`` (measured after ``saved``)."""
    cap = _face_cap(region, limits, saved)
    if cap is not None:
        attack = replace(attack, cap=cap)
    if settings.coarse <= 1.0 and not settings.scales:
        return attack
    scale = _crop_scale(warp)
    return replace(
        attack,
        coarse=max(1.0, settings.coarse * scale),
        scales=tuple(max(1.0, c * scale) for c in settings.scales),
    )


def _face_cap(
    region: Box,
    limits: FaceLimits | None,
    saved: Callable[[Uint8Array], Uint8Array] | None,
    *,
    extent: tuple[int, int] | None = None,
) -> FaceCap | None:
    """The cap of :class:`FaceLimits` on an attack of ``region`` (None without limits)."""
    if limits is None:
        return None
    return FaceCap(_within(region, limits.region), limits.flip, limits.ciede2000, saved, extent=extent)


def _shaped(
    mask: Float32Array, original: Uint8Array, region: Box, seen: Box, settings: CloakSettings
) -> Float32Array:
    """A face's mask on ``region`` shaped by the mode: kept inside the measured face region ``seen``
    (with a cap), times the texture or JND share of the budget."""
    pixels = original[region.slices]
    if settings.cap_jpeg is not None:
        inner = _within(region, seen)
        mask = mask * _box_ramp(mask.shape, inner, settings.feather * 0.5 * max(inner.height, inner.width))
    if settings.texture_floor < 1:
        mask = mask * texture_weight(
            pixels, settings.texture_floor, within=mask, quantile=settings.texture_quantile
        )
    if settings.jnd_floor is not None:
        jnd = visibility.luminance_jnd(pixels)
        inside = jnd[mask > 0.5]
        reference = float(np.quantile(inside, 0.9)) if inside.size else float(jnd.max(initial=1.0))
        mask = mask * np.clip(jnd / max(reference, 1e-6), settings.jnd_floor, 1.0)
    return np.asarray(mask, dtype=np.float32)


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


def exceeds(figures: visibility.Visibility, limits: FaceLimits | None) -> bool:
    """Whether a face's figures exceed its cap (never without one)."""
    return limits is not None and (figures.flip > limits.flip or figures.ciede2000_mean > limits.ciede2000)


def _hold_caps_together(
    original: Uint8Array,
    photo: Uint8Array,
    limits: Sequence[FaceLimits],
    saved: Callable[[Uint8Array], Uint8Array] | None,
) -> Uint8Array:
    """Scale the whole perturbation down (bisection on a common factor) when a face region exceeds its
    cap on the photo as it will be saved: the encoder's own loss (a JPEG output's), faces whose regions
    overlap, and refinement rounds change pixels that each face's attack held its cap without. Checked
    on the exact uint8 pixels of the saved file (``saved``)."""

    def over(candidate: Uint8Array) -> bool:
        if saved is not None:
            candidate = saved(candidate)
        for lim in limits:
            flip, de = visibility.colour_difference(original[lim.region.slices], candidate[lim.region.slices])
            if de > lim.ciede2000 or flip > lim.flip:
                return True
        return False

    if not over(photo):
        return photo
    delta = photo.astype(np.float32) - original
    lo, hi = 0.0, 1.0
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if not over(_scaled(original, delta, mid)) else (lo, mid)
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
