"""The evaluation loop: embed the clean photos, cloak the probes once per attack, score every condition
(:func:`evaluate`), and the self-protection of unlabelled group photos (:func:`evaluate_group_photos`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uncnn_rt.runtime import visibility
from uncnn_rt.runtime.arrays import Float32Array, Uint8Array
from uncnn_rt.runtime.cloak.regions import visible_region
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.evaluate.cloaks import Attack, CloakFunction, as_cloaked, plan_attacks
from uncnn_rt.runtime.evaluate.dataset import Dataset, probe_indices
from uncnn_rt.runtime.evaluate.embedders import Embedder, FaceFinder, FaceView, main_face, whole_image_faces
from uncnn_rt.runtime.evaluate.protocol import (
    AS_SAVED,
    WHITE_BOX_LABEL,
    Condition,
    Rate,
    default_conditions,
    run_protocols,
    saved_pixels,
)
from uncnn_rt.runtime.evaluate.report import (
    AttackQuality,
    ConditionScore,
    EvalReport,
    EvaluatorInfo,
    GroupEvaluatorScore,
    GroupReport,
    GroupScore,
    ModeReport,
    Sample,
    Score,
)
from uncnn_rt.runtime.geometry.faces import FaceSite, rematch
from uncnn_rt.runtime.geometry.warp import Box
from uncnn_rt.runtime.imageio import LoadedImage
from uncnn_rt.runtime.visibility import image_quality

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
    """Run the protocol of :mod:`uncnn_rt.runtime.evaluate` on ``dataset``, once per mode.

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
            result = as_cloaked(cloak(photo.image, attack.ensemble), photo.image)
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
            result = as_cloaked(cloak(photo, attack.ensemble), photo)
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
