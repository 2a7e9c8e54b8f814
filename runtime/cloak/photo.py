"""Cloak the faces of a photo: detect, align, perturb at the photo's native resolution.

Data flow (``ARCHITECTURE.md`` follows one photo through the modules)::

    faces   = detector(photo)                         (or the whole image with no_align)
    M_k     = similarity transform, canonical crop -> photo, from face k's landmarks
    for each face k:
        region  = the crop's footprint in the photo, feathered (times a texture weight in low mode)
        delta   lives in the photo's pixel grid, inside the region's box
        step:   crop = W_k (x + Q(delta))              W_k: bilinear warp, a linear map (Warp)
                g    = W_k^T (gradient of the crops: MI, alignment jitter (DI), EOT over JPEG,
                              one recognizer per step drawn by its distance from its threshold)
                delta <- project(delta + alpha * mask * G dir(G mask momentum(g)))
                         (G: a Gaussian half a crop pixel wide; dir: the momentum's shape at
                          unit RMS, or its sign; L-inf eps * mask, pixel range, the ceiling)

The faces of a photo are attacked together, one batch per step through each recognizer
(:class:`_BatchRunner`), each face with its own reference, budget, momentum, early stop and cap.
``Q`` rounds to whole grey levels, so the loop sees exactly the uint8 pixels that are saved. The
untargeted objective is each recognizer's cosine similarity to the face's own clean embedding
(descended); with a target identity it is the similarity to the target's embedding (ascended).
Grey photos get the same delta on R, G and B, so they stay grey.

**Modes** are protection levels (:mod:`.modes`, :mod:`.caps`): the margin past every recognizer's
threshold a face aims for, and a ceiling on how visible its change may be. The ceiling is a multiple of
the photo's own JPEG q75 re-encode on the face region (the detector's box grown by a quarter of its
side, :func:`visibility.face_region`), in FLIP and in mean CIEDE2000, held inside the loop and checked
on the pixels as the output file stores them (``saved``):

======  ===================================  ======  =====  ====================================
mode    ceiling per face region              margin  steps  refinement
======  ===================================  ======  =====  ====================================
low     the JPEG q75 re-encode               0.02    24     up to 3 rounds of 8 steps
mid     3x the q75 re-encode's figures       0.05    24     up to 3 + 3 rescue rounds of 8 steps
high    3x the q75 re-encode's figures       0.08    40     up to 3 rounds of 12 steps
======  ===================================  ======  =====  ====================================

Each face spends the least change it needs (``least``): the loop's share of the ceiling rises from 35%
to all of it over the first three quarters of the steps (``cap_start``), the face stops at the first
check past its margin, and the change is then shrunk (bisection on one factor) to the least share that
keeps every recognizer past its margin on the face as the verify step will see it, re-detected in the
saved file. A face still short of its margin at the whole change (its ceiling, its steps or the
per-pixel bound stopped it) is marked ``short`` and keeps all of it. The change is also pruned to the
pixels where it buys the most protection per unit of FLIP and scaled to its own least share
(``prune``, :func:`_payoff`); the face keeps that when it is the less visible. A short face tries the
same, and is no longer short when the pruned change reaches its margin. A face still short after both
runs the mode's rescue rounds (``rescue_rounds``): its attack continues from its whole change, and it is
shrunk and pruned again.

Where the budget goes: steps along the momentum's own shape (MI-FGM,
:class:`~uncnn_rt.runtime.attacks.MIFGM`), not its sign, which spends the same change on every pixel
and writes an edge at every change of sign; on a smooth basis half a canonical-crop pixel wide
(:class:`~uncnn_rt.runtime.attacks.Smooth`), so no step falls on the crop warp's block lattice, whose
sign steps came back as hard-edged squares; grey (the same step on R, G and B: colour carried a third
of the visibility of earlier cloaks and little of their protection); shaped by a luminance
just-noticeable-difference model (:func:`visibility.luminance_jnd`: hair, beard, brows, edges and
dark areas take up to the whole eps, smooth mid-grey skin 30% of it), eps being a per-pixel guard of
32 grey levels. The step size shrinks from the mode's first step to 30% of it along a cosine.
Figures: ``bench/RESULTS.md``, run 17.

Every mode stops a face early once every white-box recognizer is past its aim by ``success_margin``
(checked every ``check_every`` steps on the exact uint8 pixels), and spends each step on one
recognizer, drawn in proportion to how far it is from its aim (a stochastic ensemble: the momentum sums
them). The aim (:func:`aim_for`, ``CloakSettings.aim``) is what the untargeted objective, the similarity
to the face's own clean embedding, must fall below: the model's match threshold (``self``: the photo
the cloak was made from no longer matches it), or the threshold over the dev set's 95th percentile of
same-person similarities (``others``: the person's *other* photos no longer match it, which is what a
tracker holds and what ``uncnn-rt eval``'s P1 scores, estimated from the dev set's pairs; every mode
aims at ``self``, as run 31 of ``bench/RESULTS.md`` found ``others`` too weak on the colour set). Every
margin check and the verdict use it.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import catalog, visibility
from uncnn_rt.runtime.arrays import Float32Array, Uint8Array
from uncnn_rt.runtime.attacks import (
    EOT,
    MIFGM,
    MIFGSM,
    AttackResult,
    Downscale,
    Ensemble,
    Jpeg,
    LinearMap,
    Mirror,
    PastThresholds,
    PerImage,
    PerImageCap,
    Smooth,
    Transform,
    TranslationInvariance,
    Victim,
)
from uncnn_rt.runtime.cloak.caps import (
    FaceLimits,
    exceeds,
    face_cap,
    face_limits,
    hold_caps_together,
    hold_ssim_together,
    room_for_the_cloak,
)
from uncnn_rt.runtime.cloak.modes import (
    DEFAULT_MODE,
    CloakSettings,
    check_aim,
    settings_for,
)
from uncnn_rt.runtime.cloak.regions import (
    AlignmentJitter,
    CropMap,
    crop_scale,
    exclusive_mask,
    face_mask,
    overlaps,
    paste,
    region_box,
    shaped_mask,
    union,
    visible_region,
)
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.geometry.faces import (
    Detector,
    FaceSite,
    TooManyFacesError,
    crop_size_for,
    embed,
    features_of,
    find_faces,
    rematch,
    select_faces,
    sites_from_detections,
)
from uncnn_rt.runtime.geometry.warp import Box, Warp
from uncnn_rt.runtime.imageio import LoadedImage, LossyOutput
from uncnn_rt.runtime.sessions import AttackSession


@dataclass(frozen=True)
class ModelOutcome:
    """One recognizer's view of one cloaked face, on the exact uint8 pixels handed to the encoder."""

    name: str
    threshold: float | None
    """The similarity the verdict is taken at: the cloak's aim (:func:`aim_for`)."""
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
    short: bool = False
    """The face ended short of its margin on some recognizer at its whole change: its ceiling, its steps
    or the per-pixel bound stopped it (only known to a mode that spends the least visible change,
    :attr:`CloakSettings.least`; the report says whether it reached the ceiling)."""

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
    helpers: tuple[str, ...] = ()
    """The recognizers that steered the change without gating it (``cloak_image``'s ``helpers``); the
    verdict and :attr:`CloakedFace.outcomes` are ``models``' alone."""

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


CloakProgressCallback = Callable[[CloakProgress], None]


def aim_for(recognizer: AttackSession, aim: str, targeted: bool) -> float | None:
    """The similarity to a face's own clean embedding below which ``recognizer`` counts it protected.

    ``self``: the model's match threshold: the cloaked photo no longer matches the photo it was made
    from. ``others``: the threshold over how close the person's other photos come to this one
    (:func:`catalog.genuine_similarity`, the dev set's 95th percentile of same-person similarities
    ``rho``): a cloaked face whose embedding keeps a share ``s`` of its clean one has a similarity of
    about ``s * rho`` to another photo of the person when the change moves it in a direction that photo
    does not share, so below ``threshold / rho`` the person's other photos stop matching it. That is what a
    tracker needs (it holds other photos of the person, not this one) and what ``uncnn-rt eval``'s P1
    scores. It is an estimate from the dev set's pairs: on the colour set, whose photos of one person come
    closer to one another, ``others`` left 13-15% of the white-box pairs matched (``bench/RESULTS.md``,
    run 31), so no mode aims there; ``self`` is the bound for a photo as close as the original. A model
    without the figure, a targeted cloak (the target's own embedding is the reference) and a model that
    does not separate people (``rho`` at or below its threshold) keep the threshold.
    """
    threshold = recognizer.info.threshold
    if check_aim(aim) == "self" or threshold is None or targeted:
        return threshold
    rho = catalog.genuine_similarity(recognizer)
    if rho is None or not rho > threshold:
        return threshold
    return threshold / rho


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


BATCH_FACES: Final = 8
"""Most faces one batched attack call takes (:class:`_BatchRunner`)."""


BATCH_PIXELS: Final = 1_500_000
"""Most pixels (faces times the largest region's area) of one batched attack call. The loop keeps
about a dozen float32 copies of its images, so a batch stays near 200 MB whatever the photo holds."""


def photo_rng(seed: int, photo: Uint8Array, *stream: int) -> np.random.Generator:
    """A random source of one photo's cloak: the run's seed, a checksum of the photo's pixels and the
    numbers naming the stream (none for the attack's own draws; a face's number for its scatter
    directions; the face's number and 1 for its centroid views).

    Every photo of a run thus takes draws of its own (alignment jitter, JPEG EOT, victim draws, scatter
    directions) while a seed still repeats a cloak exactly. Started from the seed alone, every photo
    of a run took the same sequence of draws, and a sequence that happened to suit (or not) the
    recognizers moved the run's pooled figures together (bench/RESULTS.md, runs 24 and 25).

    The stream's length goes into the entropy before the stream: numpy's seed sequences ignore
    trailing zeros (``[s, c]`` and ``[s, c, 0]`` draw alike), so without it the attack's stream and face
    0's scatter directions would be one stream."""
    checksum = zlib.crc32(np.ascontiguousarray(photo).data)
    return np.random.default_rng([seed, checksum, len(stream), *stream])


def scatter_rng(seed: int, photo: Uint8Array, face: int) -> np.random.Generator:
    """The random source of a face's scatter directions: the run's seed, the photo's pixels and the
    face's number, so that every photo (and face) of a run gets its own directions, and a run repeats
    only with its seed."""
    return photo_rng(seed, photo, face)


def scatter_directions(clean: dict[str, Float32Array], rng: np.random.Generator) -> dict[str, Float32Array]:
    """Per recognizer, a random unit direction orthogonal to the face's clean embedding.

    Moving towards it leaves the clean embedding as moving away from it does, but each photo goes its
    own way: random directions in a space of 128-1024 dimensions are nearly orthogonal to one another,
    so one person's cloaks move apart instead of together. A tracker cannot predict them without the
    run's seed."""
    return {name: _orthogonal_unit(rng.standard_normal((e.shape[0],)), e) for name, e in clean.items()}


def _orthogonal_unit(direction: NDArray[np.float64], embedding: Float32Array) -> Float32Array:
    """The unit part of ``direction`` orthogonal to ``embedding``; zero where there is next to none (a
    direction along the embedding: moving away from it already moves towards the opposite)."""
    unit = np.asarray(embedding, np.float64) / max(float(np.linalg.norm(embedding)), 1e-12)
    d = direction - float(direction @ unit) * unit
    norm = float(np.linalg.norm(d))
    if norm <= 1e-6 * float(np.linalg.norm(direction)):
        return np.zeros(d.shape, np.float32)
    return np.asarray(d / norm, dtype=np.float32)


def far_directions(
    clean: Mapping[str, Float32Array], pool: Mapping[str, Float32Array]
) -> tuple[int, dict[str, Float32Array]]:
    """The identity of ``pool`` farthest from the face, and per recognizer the unit direction towards it
    orthogonal to the face's clean embedding.

    ``pool`` holds, per recognizer, the unit embeddings ``[K, D]`` of the same K identities in the same
    order. The farthest is the one of least cosine to the face averaged over the recognizers of
    ``clean``. Unlike :func:`scatter_directions`, the K directions are one person in every recognizer's
    space: a move towards that person is a move a recognizer the cloak never saw can share."""
    names = list(clean)
    missing = [n for n in names if n not in pool]
    if missing:
        raise InputError(f"the far-target pool has no embeddings for {', '.join(missing)}")
    sizes = {pool[n].shape[0] for n in names}
    if len(sizes) != 1 or 0 in sizes:
        raise InputError(f"the far-target pool needs the same K > 0 identities per recognizer, got {sizes}")
    cosines = np.mean(
        [np.asarray(pool[n], np.float64) @ np.asarray(clean[n], np.float64) for n in names], axis=0
    )
    k = int(np.argmin(cosines))
    return k, {n: _orthogonal_unit(np.asarray(pool[n][k], np.float64), clean[n]) for n in names}


def view_centroids(
    photo: Uint8Array,
    site: FaceSite,
    size: int,
    recognizers: Sequence[AttackSession],
    views: int,
    rng: np.random.Generator,
) -> dict[str, Float32Array]:
    """Per recognizer, the unit mean of the face's embeddings over ``views`` views of its crop: the crop
    itself, its mirror image, then alignment jitters (:class:`AlignmentJitter`, each with a chance of
    being mirrored too). An untargeted cloak steered away from this centroid moves away from the person
    as a recognizer that averages views (or aligns the face a little differently) sees them, not only
    from the one crop our own pipeline makes."""
    crop = Warp(site.crop_to_photo, photo.shape, size).apply(photo)[None]
    jitter = AlignmentJitter(probability=1.0, mirror=0.5)
    stack = [crop, Mirror().forward(crop)]
    while len(stack) < views:
        view = jitter.sample((size, size), rng)
        stack.append(crop if view is None else view.forward(crop))
    crops = np.concatenate(stack[: max(views, 1)])
    out = {}
    for r in recognizers:
        mean = features_of(r, crops).mean(axis=0)
        out[r.name] = np.asarray(mean / max(float(np.linalg.norm(mean)), 1e-12), dtype=np.float32)
    return out


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
    progress: CloakProgressCallback | None = None,
    saved: Callable[[Uint8Array], Uint8Array] | None = None,
    faces_per_batch: int | None = None,
    max_faces: int | None = None,
    ghosts: Mapping[str, AttackSession] | None = None,
    far_targets: Mapping[str, Float32Array] | None = None,
    helpers: Sequence[AttackSession] = (),
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
        max_faces: most faces this call cloaks (after ``face``/``largest`` chose), or None: no limit.
        far_targets: per recognizer, unit embeddings ``[K, D]`` of K other people, for the mode's
            ``far`` weight (:func:`far_directions`); ignored when ``far`` is 0 or targeted.
        helpers: recognizers that steer every face's change, each at the mode's ``helper_weight``
            times a full member's share of the steps, but gate nothing: the early stop, the refinement
            and least-visible margin checks and the verdict are ``recognizers``' alone, so a face never
            spends more to get past a helper (``Victim(gates=False)``). Their thresholds are not used;
            a ``target`` and ``far_targets`` need their embeddings too.

    Raises:
        NoFaceError: no face found (and not ``no_align``).
        TooManyFacesError: more faces chosen than ``max_faces``, before any attack step.
        InputError: bad arguments, or a target lacking a recognizer's embedding.
    """
    start = time.perf_counter()
    settings = settings_for(mode, eps=eps, steps=steps, ssim_min=ssim_min, cap=cap)
    targeted = target is not None
    aims = {r.name: aim_for(r, settings.aim, targeted) for r in recognizers}
    steering = _Steering(recognizers, helpers, settings.helper_weight, aims)
    size = crop_size_for(steering.all)
    names = [r.name for r in recognizers]
    every = [r.name for r in steering.all]
    if target is not None:
        missing = [n for n in every if n not in target]
        if missing:
            raise InputError(f"the target has no embedding for {', '.join(missing)}")
    original = loaded.rgb
    aimed = None if target is None else {n: np.asarray(target[n], np.float32) for n in every}
    sites = find_faces(original, detector, size=size, no_align=no_align, name=loaded.name)
    chosen = select_faces(sites, face=face, largest=largest)
    if max_faces is not None and len(chosen) > max_faces:
        raise TooManyFacesError(len(chosen), max_faces, loaded.name)
    faces = [_Face.of(i, sites[i], original, size, settings, steering.all, aimed) for i in chosen]
    _share_the_budget(faces, original, settings)
    output_quality = None
    if isinstance(saved, LossyOutput):
        roomy = room_for_the_cloak(original, [f.limits for f in faces if f.limits is not None], saved)
        if roomy.quality != saved.quality:
            saved, output_quality = roomy, roomy.quality
    if settings.scatter > 0 and not targeted:
        for f in faces:
            directions = scatter_directions(f.clean, scatter_rng(seed, original, f.index))
            f.add_steer({n: -np.float32(settings.scatter) * d for n, d in directions.items()})
    if settings.far > 0 and far_targets is not None and not targeted:
        for f in faces:
            _, towards = far_directions(f.clean, far_targets)
            f.add_steer({n: -np.float32(settings.far) * d for n, d in towards.items()})
    if settings.centroid > 1 and not targeted:
        # The gradient follows ``centroid . features`` (the steer adds ``centroid - clean`` to the
        # reference) while the early stop and the verdict stay on the clean embedding.
        for f in faces:
            centroid = view_centroids(
                original,
                f.site,
                size,
                steering.all,
                settings.centroid,
                photo_rng(seed, original, f.index, 1),
            )
            f.add_steer({n: centroid[n] - f.clean[n] for n in f.clean})

    photo = original.copy()
    run = _BatchRunner(
        _attack(settings), settings, steering, original, targeted=targeted, saved=saved,
        rng=photo_rng(seed, original), luminance_only=loaded.is_grayscale, progress=progress,
        faces_per_batch=faces_per_batch, ghosts=ghosts,
    )  # fmt: skip
    by_index = {f.index: f for f in faces}

    def attack(jobs: Sequence[_Job], most: int) -> None:
        for job, (_, outcome, taken) in run(jobs, photo, most):
            by_index[job.face].outcomes = outcome
            by_index[job.face].steps += taken

    attack([f.job() for f in faces], settings.steps)
    # Recognizers align the cloaked photo themselves, and landmarks found on it differ a little from the
    # clean photo's. Each refinement round re-detects the faces as the verify step will and continues the
    # attack, from the perturbation so far, on faces that fall short under their new alignment.

    def refine(chosen: Sequence[_Face], rounds: int) -> bool:
        """Up to ``rounds`` refinement rounds on ``chosen``; whether any ran."""
        ran = False
        for _ in range(rounds):
            if no_align or detector is None:
                break
            found = sites_from_detections(detector.detect(photo), size)
            short = [
                (f, again.site)
                for f, again in ((f, rematch(f.site, found)) for f in chosen)
                if again.matched
                and not _MarginCheck(steering, f.reference, targeted, settings.success_margin)(
                    photo, again.site
                )
            ]
            if not short:
                break
            jobs = [f.moved_to(moved, original, faces, settings) for f, moved in short]
            attack(jobs, settings.refine_steps)
            ran = True
        return ran

    refine(faces, settings.refine_rounds)
    checked = None
    if settings.least:
        photo, checked = _least_visible(original, photo, faces, steering, detector, targeted, settings, saved)
        # A face short of its margin at its whole change and pruned keeps its whole change: the rescue
        # rounds continue its attack from there, then shrink and prune it again.
        rescue = [f for f in faces if f.short]
        if rescue and refine(rescue, settings.rescue_rounds):
            photo, again = _least_visible(
                original, photo, rescue, steering, detector, targeted, settings, saved
            )
            where = {f.index: site for f, site in zip(rescue, again, strict=True)}
            checked = [where.get(f.index, site) for f, site in zip(faces, checked, strict=True)]
    photo, figures = _held(original, photo, faces, settings, saved)
    if checked is not None:
        # The attack's own outcomes were taken before the shrink; these are taken where the shrink checked
        # each face, as the verify step will: re-detected on the cloaked photo, else as first found.
        for f, site in zip(faces, checked, strict=True):
            f.outcomes = _outcomes_at(photo, site, steering, f.reference, targeted)
    return CloakResult(
        image=photo,
        faces=tuple(f.result(original, photo, figure) for f, figure in zip(faces, figures, strict=True)),
        settings=settings,
        targeted=targeted,
        no_align=no_align,
        models=tuple(names),
        crop_size=size,
        seconds=time.perf_counter() - start,
        seed=seed,
        output_quality=output_quality,
        helpers=tuple(h.name for h in helpers),
    )


@dataclass(eq=False)
class _Face:
    """One chosen face through the cloak: where it is, what it is measured and capped on, what the attack
    aims at, its share of the budget, and what the attack has done to it so far."""

    index: int
    """Index of the face in the photo's detections."""
    site: FaceSite
    warp: Warp
    region: Box
    """The box the face's perturbation lives in (grown when a refinement round re-aligns the face)."""
    visible: Box
    """The face region its visibility is measured and capped on (:func:`visible_region`)."""
    limits: FaceLimits | None
    clean: dict[str, Float32Array]
    reference: dict[str, Float32Array]
    owned: Float32Array = field(init=False, repr=False)
    """``[h, w]`` on ``region``: the face's share of the budget (0 where another face owns the pixel)."""
    steer: dict[str, Float32Array] | None = None
    outcomes: tuple[ModelOutcome, ...] = ()
    steps: int = 0
    short: bool = False
    """The face ended short of its margin at its whole change (:attr:`CloakedFace.short`)."""

    def add_steer(self, steer: dict[str, Float32Array]) -> None:
        """Add ``steer`` to the face's steer term (scatter, far identity, centroid: they sum)."""
        self.steer = steer if self.steer is None else {n: self.steer[n] + steer[n] for n in steer}

    @classmethod
    def of(
        cls,
        index: int,
        site: FaceSite,
        original: Uint8Array,
        size: int,
        settings: CloakSettings,
        recognizers: Sequence[AttackSession],
        aimed: dict[str, Float32Array] | None,
    ) -> _Face:
        height, width = original.shape[:2]
        warp = Warp(site.crop_to_photo, (height, width), size)
        region = region_box(warp, height, width)
        visible = visible_region(site, region, original.shape)
        clean = embed(original, site, recognizers)
        limits = face_limits(original, visible, settings)
        return cls(index, site, warp, region, visible, limits, clean, clean if aimed is None else aimed)

    def job(self) -> _Job:
        return _Job(
            self.index, self.warp, self.region, self.owned, self.limits, self.reference, steer=self.steer
        )

    def moved_to(
        self, moved: FaceSite, original: Uint8Array, faces: Sequence[_Face], settings: CloakSettings
    ) -> _Job:
        """The job that continues this face's attack with the crop of ``moved`` (its re-detection on
        the cloaked photo), from its perturbation so far, on a region grown to hold both crops. The
        face's region and share take the new values, so faces after it keep out of its pixels."""
        height, width = original.shape[:2]
        warp = Warp(moved.crop_to_photo, (height, width), moved.size)
        region = union(self.region, region_box(warp, height, width))
        fresh = shaped_mask(
            face_mask(warp, region, settings.feather), original, region, self.visible, settings
        )
        earlier = paste(self.owned, self.region, region)
        mine = np.maximum(earlier, fresh)
        for other in faces:
            if other is not self and overlaps(other.region, region):
                mine[paste(other.owned, other.region, region) > 0] = 0.0
        self.owned, self.region = mine, region
        return _Job(
            self.index, warp, region, mine, self.limits, self.reference, prior=earlier > 0, steer=self.steer
        )

    def result(self, original: Uint8Array, photo: Uint8Array, figures: visibility.Visibility) -> CloakedFace:
        before, after = original[self.region.slices], photo[self.region.slices]
        return CloakedFace(
            number=self.index + 1,
            site=self.site,
            region=self.region,
            steps=self.steps,
            clean=self.clean,
            references=self.reference,
            outcomes=self.outcomes,
            linf=int(np.abs(after.astype(np.int16) - before).max(initial=0)),
            ssim=figures.ssim,
            visible_region=self.visible,
            visibility=figures,
            limits=self.limits,
            short=self.short,
        )


def _share_the_budget(faces: Sequence[_Face], original: Uint8Array, settings: CloakSettings) -> None:
    """Each face's share of the budget on its region, shaped by the mode: every pixel belongs to at most
    one face (:func:`exclusive_mask`)."""
    chosen = [f.index for f in faces]
    warps = {f.index: f.warp for f in faces}
    for f in faces:
        mask = exclusive_mask(f.index, chosen, warps, f.region, settings)
        f.owned = shaped_mask(mask, original, f.region, f.visible, settings)


LEAST_PROBES: Final = 7
"""Bisection probes of :func:`_least_visible` per face (a share to within 1%)."""


def _least_visible(
    original: Uint8Array,
    photo: Uint8Array,
    faces: Sequence[_Face],
    steering: _Steering,
    detector: Detector | None,
    targeted: bool,
    settings: CloakSettings,
    saved: Callable[[Uint8Array], Uint8Array] | None,
) -> tuple[Uint8Array, list[FaceSite]]:
    """Each face's perturbation shrunk to the least share of it (bisection) that keeps every recognizer
    past its threshold by the mode's margin, as the verify step sees the face: re-detected on the
    cloaked photo and through the output's round trip (``saved``, on the face's JPEG window only).
    Returns the photo and, per face, the site it was checked at.

    The attack stops a face at the first check past its margin, so its last steps may overshoot; and
    a face still short of its margin at its whole change keeps all of it. Each face's ``short`` records
    which.

    With ``settings.prune`` the change is also pruned to where it pays (:func:`_payoff`) and scaled to its
    own least share (up to :data:`PRUNE_MOST`); the face keeps it when it is the less visible of the two
    (FLIP lower and CIEDE2000 mean no higher, on its JPEG window as saved). A face short at its whole
    change takes a pruned change that reaches the margin when it is no more visible than the whole
    change, and is no longer short.
    """
    found = None if detector is None else sites_from_detections(detector.detect(photo), faces[0].site.size)
    photo = photo.copy()
    margin = settings.success_margin
    checked = []
    for f in faces:
        site = f.site
        if found is not None:
            again = rematch(f.site, found)
            site = again.site if again.matched else f.site
        checked.append(site)
        least = _LeastShare(original, photo, f, site, saved)
        check = _MarginCheck(steering, f.reference, targeted, margin)
        whole = least.protected(1.0, check)
        best = least.at(least.smallest(1.0, check) if whole else 1.0)
        if settings.prune > 0:
            pruned = _pruned(original, photo, f, site, steering, targeted, settings, saved, check)
            if pruned is not None:
                mine, theirs = least.figures(pruned), least.figures(best)
                # Short at its whole change, a face may yet reach its margin with the change concentrated
                # where it pays: it takes that when no more visible than the whole change.
                if (mine[0] < theirs[0] or (not whole and mine[0] <= theirs[0])) and mine[1] <= theirs[1]:
                    best, whole = pruned, True
        f.short = not whole
        photo[least.window.slices] = best
    return photo, checked


PRUNE_MOST: Final = 3.0
"""The largest share a pruned change (:func:`_pruned`) is scaled by: the pixels it keeps may carry up to
three times the attack's change there, to make up for those it drops, within ``eps`` grey levels of the
original (not the JND-shaped bound the attack stepped within: held to that, the pruned change reached
the margin less often and face FLIP rose on six of the seven faces of ``bench/peak_faces.py``,
bench/RESULTS.md run 28). On the colour set
3 rather than 2 cut the default's median face FLIP from 0.0468 to 0.0454 and protected one pair more
(bench/RESULTS.md, run 20)."""

PRUNE_LADDER: Final = (1.0, 0.25)
"""The thresholds :func:`_pruned` tries, as multiples of ``settings.prune``: a face whose change is all
needed keeps more of it at the second."""


def _pruned(
    original: Uint8Array,
    photo: Uint8Array,
    face: _Face,
    site: FaceSite,
    steering: _Steering,
    targeted: bool,
    settings: CloakSettings,
    saved: Callable[[Uint8Array], Uint8Array] | None,
    check: _MarginCheck,
) -> Uint8Array | None:
    """The face's JPEG window with its change pruned to where it pays (:func:`_payoff`) and scaled to the
    least share that keeps the margin (``check``), at the first threshold of :data:`PRUNE_LADDER` that
    can; None when none can within :data:`PRUNE_MOST`."""
    payoff = _payoff(original, photo, face, site, steering, targeted, settings.blur)
    if payoff is None:
        return None
    for step in PRUNE_LADDER:
        keep = payoff.kept(settings.prune * step)
        # Concentrated, the change is less forgiving of a shifted alignment: it must hold on the face as
        # first found too.
        trial = _LeastShare(original, photo, face, site, saved, keep=keep, eps=settings.eps, also=face.site)
        if trial.protected(PRUNE_MOST, check):
            return trial.at(trial.smallest(PRUNE_MOST, check))
    return None


@dataclass(frozen=True)
class _Payoff:
    """What each pixel of a face's change buys (:func:`_payoff`): thresholded by :meth:`kept`."""

    ratio: Float32Array
    """``[h, w]`` on the face's region: protection per unit of FLIP error, smoothed."""
    median: float
    """The median ratio over the pixels that help."""
    smooth: Smooth

    def kept(self, threshold: float) -> Float32Array:
        """``[h, w]`` in [0, 1]: where the ratio is above ``threshold`` times its median, smoothed as the
        ratio was, so the mask writes no edges of its own."""
        mask = np.asarray(self.ratio > threshold * self.median, np.float32)
        return self.smooth.forward(mask[None, ..., None])[0, ..., 0]


def _payoff(
    original: Uint8Array,
    photo: Uint8Array,
    face: _Face,
    site: FaceSite,
    steering: _Steering,
    targeted: bool,
    blur: float,
) -> _Payoff | None:
    """Where the face's change buys protection per unit of visibility; None when no pixel of it helps.

    A pixel's benefit is the ensemble's attack gradient (helpers included, at their weight) at the
    cloaked face (re-detected at ``site``) times the change there: the first-order protection that
    dropping it would lose. Its cost is the FLIP error the change makes there. Both are smoothed over
    ``blur`` crop pixels (at least one photo pixel). FLIP pools a concave error (HyAB to the power 0.7)
    by its mean, so a change concentrated where it pays costs less than the same protection spread
    evenly (``bench/RESULTS.md``, run 19).
    """
    region = face.region
    height, width = original.shape[:2]
    warp = Warp(site.crop_to_photo, (height, width), site.size)
    # The re-detected crop may reach past the region: its gradient is taken on both, read on the region.
    reach = union(region, region_box(warp, height, width))
    victims = steering.victims(lambda name: face.reference[name][None])
    crops = CropMap(warp, reach)
    ensemble = Ensemble(victims, 1, (site.size, site.size), targeted=targeted, input_map=crops)
    grad = ensemble.gradient(photo[reach.slices].astype(np.float32)[None], np.random.default_rng(0)).grad[0]
    grad = grad[
        region.top - reach.top : region.bottom - reach.top,
        region.left - reach.left : region.right - reach.left,
    ]
    cloaked = photo[region.slices].astype(np.float32)
    owned = face.owned > 0
    delta = (cloaked - original[region.slices]) * owned[..., None]
    stride = visibility.search_stride(region.height, region.width)
    error = visibility.FlipReference(original[region.slices], stride=stride).error_map(photo[region.slices])
    error = np.repeat(np.repeat(error, stride, axis=0), stride, axis=1)[: region.height, : region.width]
    smooth = Smooth(max(1.0, blur * crop_scale(warp), float(stride)))

    def blurred(values: NDArray[Any]) -> Float32Array:
        return smooth.forward(np.asarray(values, np.float32)[None, ..., None])[0, ..., 0]

    benefit = np.maximum(blurred((grad * delta).sum(axis=-1)), np.float32(0.0))
    ratio = benefit / (blurred(error) + np.float32(1e-3))
    useful = ratio[(benefit > 0) & owned]
    if useful.size == 0:
        return None
    return _Payoff(ratio, float(np.median(useful)), smooth)


class _LeastShare:
    """One face's change in ``photo`` scaled by a share, tried on the face's JPEG window only (the rest of
    the photo is the same in every trial). ``keep`` (``[h, w]`` on the face's region) weighs the change
    pixel by pixel first, ``eps`` bounds the scaled change, and ``also`` is a second site of the face
    that a trial must protect too."""

    def __init__(
        self,
        original: Uint8Array,
        photo: Uint8Array,
        face: _Face,
        site: FaceSite,
        saved: Callable[[Uint8Array], Uint8Array] | None,
        *,
        keep: Float32Array | None = None,
        eps: float | None = None,
        also: FaceSite | None = None,
    ) -> None:
        self.window, inner = visibility.jpeg_window(photo.shape, face.region)
        self.owned = np.zeros((self.window.height, self.window.width, 1), bool)
        self.owned[inner.slices] = (face.owned > 0)[..., None]
        self.base = original[self.window.slices]
        self.cloaked = photo[self.window.slices].copy()
        self.delta = np.where(self.owned, self.cloaked.astype(np.float32) - self.base, np.float32(0.0))
        if keep is not None:
            weight = np.zeros((self.window.height, self.window.width, 1), np.float32)
            weight[inner.slices] = keep[..., None]
            self.delta *= weight
        self.eps = eps
        self.trial = photo  # the window is put back after each trial
        self.face, self.saved = face, saved
        self.sites = (site,) if also is None or also is site else (site, also)
        stride = visibility.search_stride(self.window.height, self.window.width)
        self._against = visibility.ColourDifference(self.base, stride=stride)

    def at(self, share: float) -> Uint8Array:
        """The window with the face's change scaled by ``share``, in whole grey levels."""
        return np.where(self.owned, _shrunk(self.base, self.delta, share, self.eps), self.cloaked)

    def shown(self, pixels: Uint8Array) -> Uint8Array:
        """The window's ``pixels`` as the output file will hold them."""
        return pixels if self.saved is None else self.saved(np.ascontiguousarray(pixels))

    def figures(self, pixels: Uint8Array) -> tuple[float, float]:
        """FLIP and CIEDE2000 mean of the window's ``pixels`` as saved (the rest of the photo is the same
        in every trial), estimated on a large face (:func:`visibility.search_stride`)."""
        return self._against(self.shown(pixels))

    def protected(self, share: float, check: _MarginCheck) -> bool:
        """Whether every recognizer is past its margin (``check``) with the change scaled by ``share``,
        as saved."""
        self.trial[self.window.slices] = self.shown(self.at(share))
        try:
            return all(check(self.trial, site) for site in self.sites)
        finally:
            self.trial[self.window.slices] = self.cloaked

    def smallest(self, most: float, check: _MarginCheck) -> float:
        """The least share in ``(0, most]`` still :meth:`protected` (``most`` is), by bisection to within
        ``most / 2**LEAST_PROBES``."""
        lo, hi = 0.0, most
        for _ in range(LEAST_PROBES):
            mid = (lo + hi) / 2
            if self.protected(mid, check):
                hi = mid
            else:
                lo = mid
        return hi


def _shrunk(original: Uint8Array, delta: Float32Array, share: float, eps: float | None = None) -> Uint8Array:
    """``original + share * delta`` in whole grey levels, rounded towards the original (and within
    ``eps`` of it)."""
    change = np.trunc(delta * np.float32(share))
    if eps is not None:
        change = np.clip(change, -eps, eps)
    return np.asarray(np.clip(change + original, 0, 255), dtype=np.uint8)


def _held(
    original: Uint8Array,
    photo: Uint8Array,
    faces: Sequence[_Face],
    settings: CloakSettings,
    saved: Callable[[Uint8Array], Uint8Array] | None,
) -> tuple[Uint8Array, list[visibility.Visibility]]:
    """The photo with the floors and caps held across faces (each face's attack held them alone), and
    each face's figures on it as it will be saved."""
    if settings.ssim_min is not None and any(
        overlaps(a.region, b.region) for k, a in enumerate(faces) for b in faces[k + 1 :]
    ):
        photo = hold_ssim_together(original, photo, [f.region for f in faces], settings.ssim_min)

    def measured(candidate: Uint8Array) -> list[visibility.Visibility]:
        shown = candidate if saved is None else saved(candidate)
        return [visibility.measure(original[f.visible.slices], shown[f.visible.slices]) for f in faces]

    figures = measured(photo)
    if any(exceeds(figure, f.limits) for figure, f in zip(figures, faces, strict=True)):
        photo = hold_caps_together(original, photo, [f.limits for f in faces if f.limits is not None], saved)
        figures = measured(photo)
    return photo, figures


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


class _Steering:
    """The victims of a cloak: ``gating`` (the ensemble, whose aims each face must pass: ``aims``, by
    name, each model's threshold where absent) and ``helpers`` (``cloak_image``'s: they steer the
    gradient at ``weight`` and gate nothing)."""

    def __init__(
        self,
        gating: Sequence[AttackSession],
        helpers: Sequence[AttackSession],
        weight: float,
        aims: Mapping[str, float | None] | None = None,
    ) -> None:
        if not gating:
            raise InputError("at least one recognizer is needed")
        if helpers and not weight > 0:
            raise InputError(f"helpers need a helper_weight > 0, got {weight}")
        self.gating, self.helpers, self.weight = list(gating), list(helpers), weight
        given = {} if aims is None else aims
        self.aims = {r.name: given.get(r.name, r.info.threshold) for r in self.gating}
        self.all = [*self.gating, *self.helpers]
        names = [r.name for r in self.all]
        if len(set(names)) != len(names):
            raise InputError(f"recognizers need distinct names, got {names}")

    def victims(
        self,
        references: Callable[[str], NDArray[np.float32]],
        *,
        steer: Callable[[str], Float32Array | None] | None = None,
        ghosts: Mapping[str, AttackSession] | None = None,
    ) -> list[Victim]:
        """One victim per recognizer, gating ones first, each with ``references(name)``."""
        helping = {h.name for h in self.helpers}
        return [
            Victim(
                r,
                references(r.name),
                name=r.name,
                steer=None if steer is None else steer(r.name),
                ghost=None if ghosts is None else ghosts.get(r.name),
                weight=self.weight if r.name in helping else 1.0,
                gates=r.name not in helping,
                threshold=self.aims.get(r.name),
            )
            for r in self.all
        ]


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
        steering: _Steering,
        original: Uint8Array,
        *,
        targeted: bool,
        saved: Callable[[Uint8Array], Uint8Array] | None,
        rng: np.random.Generator,
        luminance_only: bool,
        progress: CloakProgressCallback | None,
        faces_per_batch: int | None,
        ghosts: Mapping[str, AttackSession] | None = None,
    ) -> None:
        if faces_per_batch is not None and faces_per_batch < 1:
            raise InputError(f"faces_per_batch must be >= 1, got {faces_per_batch}")
        self.attack, self.settings, self.steering, self.original = attack, settings, steering, original
        self.targeted, self.saved, self.rng = targeted, saved, rng
        self.luminance_only, self.progress = luminance_only, progress
        self.ghosts: Mapping[str, AttackSession] = {} if ghosts is None else ghosts
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
                face_cap(j.region, j.limits, self.saved, extent=(j.region.height, j.region.width))
                for j in batch
            )
            attack = replace(attack, cap=None if all(c is None for c in caps) else PerImageCap(caps))
        if settings.blur > 0:
            # The basis's width is each face's own crop pixel in photo pixels.
            attack = replace(
                attack, blur=tuple(max(settings.blur * crop_scale(j.warp), settings.blur_min) for j in batch)
            )
        if any(p is not None for p in priors):
            # A refinement round continues from the cap the face has spent, not from the start's share.
            attack = replace(attack, cap_start=1.0)
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

        victims = self.steering.victims(
            lambda name: np.stack([j.references[name] for j in batch]), steer=steer, ghosts=self.ghosts
        )
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
            stop_when=PastThresholds(targeted=self.targeted, margin=settings.success_margin),
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
                _outcomes(result, self.steering, k),
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


def _outcomes(result: AttackResult, steering: _Steering, k: int = 0) -> tuple[ModelOutcome, ...]:
    return tuple(
        ModelOutcome(
            name=r.name,
            threshold=steering.aims[r.name],
            similarity=float(result.objective[r.name][k]),
            passed=bool(result.success[r.name][k]) if r.name in result.success else False,
        )
        for r in steering.gating
    )


def _outcomes_at(
    photo: Uint8Array,
    site: FaceSite,
    steering: _Steering,
    references: dict[str, Float32Array],
    targeted: bool,
) -> tuple[ModelOutcome, ...]:
    """Each gating recognizer's outcome on the face at ``site`` of ``photo``, at its aim."""
    seen = embed(photo, site, steering.gating)
    out = []
    for r in steering.gating:
        similarity, threshold = float(seen[r.name] @ references[r.name]), steering.aims[r.name]
        passed = threshold is not None and (similarity > threshold if targeted else similarity < threshold)
        out.append(ModelOutcome(r.name, threshold, similarity, passed))
    return tuple(out)


class _MarginCheck:
    """Whether every gating recognizer with an aim is past it by a margin on one face, model by model.

    The first model short of its margin ends a check and is tried first in the next one: the model that
    holds a face back holds it back through a search (``_LeastShare.smallest``), so a trial that fails
    costs that model's forward pass rather than every model's (on the 1080p bench most failing trials
    are failed by one of the cheaper models; fr_feature's pass costs more than the other three's
    together). The answer is the one checking every model gives.
    """

    def __init__(
        self,
        steering: _Steering,
        references: dict[str, Float32Array],
        targeted: bool,
        margin: float,
    ) -> None:
        self.order = [(r, aim) for r in steering.gating if (aim := steering.aims[r.name]) is not None]
        self.references, self.targeted, self.margin = references, targeted, margin

    def __call__(self, photo: Uint8Array, site: FaceSite) -> bool:
        crop = Warp(site.crop_to_photo, photo.shape, site.size).apply(photo)[None]
        for i, (r, threshold) in enumerate(self.order):
            similarity = float(features_of(r, crop)[0] @ self.references[r.name])
            short = (
                similarity <= threshold + self.margin
                if self.targeted
                else similarity >= threshold - self.margin
            )
            if short:
                self.order.insert(0, self.order.pop(i))
                return False
        return True


def _attack(settings: CloakSettings) -> MIFGSM:
    diversity = (
        AlignmentJitter(
            probability=settings.diversity,
            mirror=settings.mirror,
            grey=settings.grey,
            blurred=settings.blurred,
        )
        if max(settings.diversity, settings.mirror, settings.grey, settings.blurred) > 0
        else None
    )
    transforms: list[Transform] = [] if settings.eot_quality is None else [Jpeg(settings.eot_quality)]
    if settings.eot_downscale is not None:
        transforms.append(Downscale(settings.eot_downscale))
    eot = EOT(transforms=tuple(transforms)) if transforms else None
    smoothing = TranslationInvariance(radius=settings.smoothing) if settings.smoothing > 0 else None
    if settings.step not in ("sign", "gradient"):
        raise InputError(f"step must be 'sign' or 'gradient', got {settings.step!r}")
    kind = MIFGM if settings.step == "gradient" else MIFGSM
    return kind(
        eps=settings.eps,
        steps=settings.steps,
        step_size=settings.step_size,
        momentum=settings.momentum,
        # From the clean image the cosine objective sits at its maximum (zero gradient); DI and EOT
        # move the point where the gradient is taken, otherwise start from a random point.
        random_start=diversity is None and eot is None,
        ssim_min=settings.ssim_min,
        diversity=diversity,
        eot=eot,
        smoothing=smoothing,
        check_every=settings.check_every,
        ssim_every=settings.ssim_every,
        success_margin=settings.success_margin,
        victims_per_step=settings.victims_per_step,
        met_share=settings.met_share,
        schedule=settings.schedule,
        schedule_floor=settings.schedule_floor,
        chroma=settings.chroma,
        cap_every=settings.cap_every,
        cap_start=settings.cap_start,
        cap_rise=settings.cap_rise,
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
    cap = face_cap(region, limits, saved)
    if cap is not None:
        attack = replace(attack, cap=cap)
    if settings.coarse <= 1.0 and not settings.scales:
        return attack
    scale = crop_scale(warp)
    return replace(
        attack,
        coarse=max(1.0, settings.coarse * scale),
        scales=tuple(max(1.0, c * scale) for c in settings.scales),
    )
