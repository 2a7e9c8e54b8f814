"""Success criteria: small per-image predicates over the victims' outputs, combined with ``&`` and ``|``.

A criterion sees one :class:`ModelState` per victim (by name) for a batch of ``N`` images and answers
a boolean ``[N]``. The attack loop uses one to stop early (and freeze the images already done), and the
result reports, per victim, the criterion :func:`default_criterion` derives from the contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime.arrays import BoolArray, Float32Array
from uncnn_rt.runtime.contract import ModelKind
from uncnn_rt.runtime.errors import InputError


@dataclass(frozen=True)
class ModelState:
    """One victim's view of a batch: ``features`` [N, D], ``objective`` [N], ``references`` [N, D].

    For face models ``objective`` is the cosine similarity to the reference embedding; for classifiers
    it is the log-probability of the reference class.
    """

    kind: ModelKind
    threshold: float | None
    features: Float32Array
    objective: Float32Array
    references: Float32Array


States = Mapping[str, ModelState]


class Criterion(ABC):
    """A per-image predicate over the victims' states."""

    @abstractmethod
    def __call__(self, states: States) -> BoolArray:
        """``[N]`` booleans: which images meet the criterion."""

    def __and__(self, other: Criterion) -> Criterion:
        return AllOf((self, other))

    def __or__(self, other: Criterion) -> Criterion:
        return AnyOf((self, other))


def _state(states: States, model: str) -> ModelState:
    if model not in states:
        raise InputError(f"criterion names model {model!r}, the victims are {sorted(states)}")
    return states[model]


def _threshold(state: ModelState, model: str, threshold: float | None) -> float:
    value = state.threshold if threshold is None else threshold
    if value is None:
        raise InputError(f"model {model!r} has no match threshold in its metadata; give the criterion one")
    return value


@dataclass(frozen=True)
class SimilarityBelow(Criterion):
    """The objective (cosine similarity for face models) is below ``threshold - margin``.

    ``threshold`` defaults to the model's own match threshold. Untargeted cloaking succeeds here.
    """

    model: str
    threshold: float | None = None
    margin: float = 0.0

    def __call__(self, states: States) -> BoolArray:
        state = _state(states, self.model)
        return np.asarray(state.objective < _threshold(state, self.model, self.threshold) - self.margin)


@dataclass(frozen=True)
class SimilarityAbove(Criterion):
    """The objective is above ``threshold + margin`` (impersonation: matched to a target's embedding)."""

    model: str
    threshold: float | None = None
    margin: float = 0.0

    def __call__(self, states: States) -> BoolArray:
        state = _state(states, self.model)
        return np.asarray(state.objective > _threshold(state, self.model, self.threshold) + self.margin)


def _labels(state: ModelState, labels: Sequence[int] | None, model: str) -> NDArray[np.intp]:
    if labels is None:
        return np.asarray(np.argmax(state.references, axis=1), dtype=np.intp)
    out = np.asarray(labels, dtype=np.intp)
    if out.shape != state.objective.shape:
        raise InputError(
            f"{model}: {out.shape[0] if out.ndim else 0} labels for {state.objective.shape[0]} images"
        )
    return out


@dataclass(frozen=True)
class Misclassified(Criterion):
    """The top class differs from ``labels`` (default: each image's reference class)."""

    model: str
    labels: Sequence[int] | None = None

    def __call__(self, states: States) -> BoolArray:
        state = _state(states, self.model)
        return np.asarray(np.argmax(state.features, axis=1) != _labels(state, self.labels, self.model))


@dataclass(frozen=True)
class TargetReached(Criterion):
    """The top class equals ``targets`` (default: each image's reference class, the targeted direction)."""

    model: str
    targets: Sequence[int] | None = None

    def __call__(self, states: States) -> BoolArray:
        state = _state(states, self.model)
        return np.asarray(np.argmax(state.features, axis=1) == _labels(state, self.targets, self.model))


@dataclass(frozen=True)
class AllOf(Criterion):
    criteria: tuple[Criterion, ...]

    def __call__(self, states: States) -> BoolArray:
        return np.asarray(np.logical_and.reduce([c(states) for c in self.criteria]), dtype=bool)


@dataclass(frozen=True)
class AnyOf(Criterion):
    criteria: tuple[Criterion, ...]

    def __call__(self, states: States) -> BoolArray:
        return np.asarray(np.logical_or.reduce([c(states) for c in self.criteria]), dtype=bool)


def default_criterion(model: str, kind: ModelKind, *, targeted: bool, margin: float = 0.0) -> Criterion:
    """Success on one victim as the contract's sign convention defines it.

    Face models: below the match threshold (untargeted) or above it (targeted), by ``margin``.
    Classifiers: the top class leaves the reference class (untargeted) or becomes it (targeted).
    """
    if kind == "face":
        return SimilarityAbove(model, margin=margin) if targeted else SimilarityBelow(model, margin=margin)
    return TargetReached(model) if targeted else Misclassified(model)


@dataclass(frozen=True)
class PastThresholds(Criterion):
    """Every victim past its own threshold by ``margin`` (:func:`default_criterion` for each): the
    ensemble's early stop. ``targeted`` must match the attack's direction.

    A face model without a threshold (a victim that only steers, ``Victim(gates=False)``) is no part of
    it, as it is no part of the attack's success; with no victim left to pass, no image is past."""

    targeted: bool = False
    margin: float = 0.0

    def __call__(self, states: States) -> BoolArray:
        per_model = tuple(
            default_criterion(name, s.kind, targeted=self.targeted, margin=self.margin)
            for name, s in states.items()
            if s.kind != "face" or s.threshold is not None
        )
        if not per_model:
            return np.zeros(len(next(iter(states.values())).objective), bool)
        return AllOf(per_model)(states)
