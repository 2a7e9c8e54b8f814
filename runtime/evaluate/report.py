"""The evaluation's report: scores per evaluator, attack and condition, what each attack cost, and the
JSON form of the whole (:meth:`EvalReport.to_dict`, schema :data:`SCHEMA`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from uncnn_rt.runtime import visibility
from uncnn_rt.runtime.arrays import Uint8Array
from uncnn_rt.runtime.evaluate.protocol import (
    PROTOCOL_TEXT,
    PROTOCOLS,
    SCORE_KINDS,
    Condition,
    Kind,
    Rate,
    rounded,
)

SCHEMA: Final = "uncnn-rt.eval/1"
_WORD: Final = {"p1": "protected", "p2": "protected", "p3": "unlinked"}
"""What a probe that the protocol no longer matches is called in reports."""


@dataclass(frozen=True)
class ConditionScore:
    """One evaluator on one attack's cloaks, under one condition."""

    p1: Rate
    p2: Rate
    lost: int
    self_similarity: float | None
    """Mean cosine of the eligible cloaked probes to their own clean embeddings."""
    p3: Rate = Rate(0, 0)  # noqa: RUF009  (Rate is a frozen dataclass)
    """Probes unlinked: not matched to their identity among the other cloaked photos."""

    def rate(self, protocol: str) -> Rate:
        return {"p1": self.p1, "p2": self.p2, "p3": self.p3}[protocol]

    def to_dict(self) -> dict[str, Any]:
        return {
            "p1": self.p1.to_dict(),
            "p2": self.p2.to_dict(),
            "p3": self.p3.to_dict("unlinked"),
            "lost_faces": self.lost,
            "mean_self_similarity": rounded(self.self_similarity),
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
            "threshold": rounded(self.threshold),
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
            "ssim_mean": rounded(self.ssim_mean),
            "ssim_min": rounded(self.ssim_min),
            "psnr_mean": rounded(self.psnr_mean, 3),
            "linf_max": self.linf_max,
            "linf_mean": rounded(self.linf_mean, 3),
            "seconds_per_photo": rounded(self.seconds_per_photo, 3),
            "steps_mean": rounded(self.steps_mean, 2),
        }


def summarise_visibility(faces: Sequence[visibility.Visibility]) -> dict[str, Any] | None:
    """Median and worst of each face figure over ``faces`` (worst: largest FLIP, CIEDE2000 and share over
    JND, smallest SSIM and PSNR), or None for none."""
    if not faces:
        return None

    def stats(values: list[float], larger_is_worse: bool) -> dict[str, float | None]:
        finite = [v for v in values if math.isfinite(v)]
        worst = (max(finite) if larger_is_worse else min(finite)) if finite else None
        return {"median": rounded(float(np.median(values)), 5), "worst": rounded(worst, 5)}

    return {
        "faces": len(faces),
        "flip": stats([f.flip for f in faces], True),
        "ciede2000_mean": stats([f.ciede2000_mean for f in faces], True),
        "ciede2000_p95": stats([f.ciede2000_p95 for f in faces], True),
        "ssim": stats([f.ssim for f in faces], False),
        "psnr": stats([f.psnr for f in faces], False),
        "over_jnd": stats([f.over_jnd for f in faces], True),
    }


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
            "mean_similarity": rounded(self.mean_similarity),
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
            "threshold": rounded(self.threshold),
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

    def unseen(self) -> list[Score]:
        """Every recognizer scored on a cloak that never saw it: each member on its leave-one-out cloak,
        each independent outsider on the white-box cloak. Pooled, this compares ensembles of different
        sizes on the same held-out models."""
        return self.of_kind("leave-one-out") + self.of_kind("external", independent_only=True)

    def quality_of(self, kind: Kind) -> list[AttackQuality]:
        attacks = {s.attack for s in self.of_kind(kind)}
        return [q for q in self.quality if q.attack in attacks]

    def summary(self, conditions: Sequence[str]) -> dict[str, Any]:
        """Pooled protection per kind (external: independent evaluators only), condition and protocol, and
        over every recognizer the cloak never saw (``unseen``: :meth:`unseen`)."""
        out: dict[str, Any] = {}
        for kind in SCORE_KINDS:
            scores = self.of_kind(kind, independent_only=kind == "external")
            if not scores:
                continue
            quality = self.quality_of(kind)
            out[kind] = {
                "evaluators": [s.evaluator for s in scores],
                "ssim_mean": rounded(_weighted_ssim(quality)),
                "conditions": {
                    c: {p: pooled(scores, c, p).to_dict(_WORD[p]) for p in PROTOCOLS} for c in conditions
                },
            }
        unseen = self.unseen()
        if unseen:
            out["unseen"] = {
                "evaluators": [s.evaluator for s in unseen],
                "conditions": {
                    c: {p: pooled(unseen, c, p).to_dict(_WORD[p]) for p in PROTOCOLS} for c in conditions
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
    """Per condition, (P1, P2, P3) protection of the transform alone (uncloaked photos), over the probes."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": rounded(self.threshold),
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
