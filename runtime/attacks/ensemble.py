"""Victims and the ensemble gradient: one common input, each model at its own canonical size.

The attacked images ``X`` are ``[N, H, W, 3]``. Model ``m`` sees ``R_m X`` (an exact bilinear resize to
its ``S_m x S_m``, :class:`~.linear.Resize`), so its gradient with respect to ``X`` is ``R_m^T g_m``. Each
model's gradient is scaled to unit mean magnitude per image before the weighted sum, so that a model
with large raw gradients does not drown the others.

With an ``input_map`` ``A`` (a linear map with an exact adjoint, e.g. the crop warp of a face in a photo),
the attacked images live in ``A``'s input space and every model sees ``R_m A X``; the gradient comes back
as ``A^T R_m^T g_m``. Input diversity then transforms the mapped views (the crops), and EOT the images
before the map (the photo, as an upload pipeline would).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks.boosters import EOT, InputDiversity
from uncnn_rt.runtime.attacks.criteria import ModelState
from uncnn_rt.runtime.attacks.linear import LinearMap, Resize
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession, Stepper


@dataclass(frozen=True)
class Victim:
    """One attacked model with the references of the batch.

    Args:
        session: the model's attack graph.
        references: ``[N, D]``, one per image: the person's own unit embedding (face, untargeted), a target
            embedding (face, targeted), or a one-hot / weight vector over classes (classifier).
        weight: the model's share of the ensemble gradient (after per-model normalisation).
        name: the key of this victim in criteria and results (default: the model's metadata name).
        steer: ``[N, D]``, or None: the gradient follows the objective of ``references + steer`` while
            the objective, the criteria and the results stay those of ``references``. The contract's
            objective is linear in the reference (``features . reference``), so one run of the graph
            fed ``references + steer`` gives both: its gradient, and ``features . references``
            recomputed from its features. E.g. an untargeted cloak with ``steer = -b t`` also moves
            towards a direction ``t`` of its own (:mod:`uncnn_rt.runtime.cloak`, ``scatter``).
        ghost: an attack graph of the same model with random feature-map dropout (model augmentation:
            DFANet, Zhong & Deng 2020), or None: the gradients come from it, so that each step sees
            another thinned copy of the model, while every check, criterion and result comes from
            ``session``'s plain forward pass.
        gates: False: the victim only steers the gradient (at ``weight``), it is no criterion: its states
            carry no threshold, so the ensemble's early stop (:class:`.criteria.PastThresholds`) and the
            result's success skip it, and the focus gives it a constant share
            (:func:`.sampling.shares`): a surrogate that helps a change transfer without every image
            having to get past it (:mod:`uncnn_rt.runtime.cloak`'s helpers).
        threshold: the threshold the victim's states carry instead of the model's own, or None: e.g. the
            similarity to a face's own embedding below which the person's other photos stop matching
            (:mod:`uncnn_rt.runtime.cloak`'s aim). Ignored when the victim does not gate.
    """

    session: AttackSession
    references: ArrayLike
    weight: float = 1.0
    name: str | None = None
    steer: ArrayLike | None = None
    ghost: AttackSession | None = None
    gates: bool = True
    threshold: float | None = None

    @property
    def key(self) -> str:
        return self.name if self.name is not None else self.session.name


@dataclass
class _Member:
    key: str
    session: AttackSession
    references: Float32Array
    weight: float
    stepper: Stepper
    resize: Resize | None
    steered: bool = False
    """The stepper runs ``references + steer``: objectives are recomputed from the features."""
    ghost: Stepper | None = None
    """The gradients' stepper when the victim has a ghost graph (its features are not the model's)."""
    gates: bool = True
    """False: the victim's states carry no threshold (:attr:`Victim.gates`)."""
    threshold: float | None = None
    """The threshold its states carry instead of the model's own (:attr:`Victim.threshold`)."""

    def objective(self, features: Float32Array, run: Float32Array) -> Float32Array:
        """The objective of ``references`` from a run's features (``run``: the run's own objective)."""
        if not self.steered:
            return run
        return np.asarray(np.einsum("nd,nd->n", features, self.references), dtype=np.float32)


@dataclass(frozen=True)
class Gradient:
    """The ensemble's ascent direction at a batch, before any norm-specific normalisation."""

    grad: Float32Array  # [N, H, W, 3], averaged over EOT samples
    objective: dict[str, Float32Array]  # per victim, [N], averaged over the same samples
    # The victims' clean states when the gradient was taken at the untransformed images, else None.
    states: dict[str, ModelState] | None


class Ensemble:
    """The victims of one attack call on a batch of ``N`` images.

    ``size`` is the ``H x W`` of the views the victims are given: the images' own size, or the output
    size of ``input_map`` when there is one.
    """

    def __init__(
        self,
        victims: Sequence[Victim],
        batch: int,
        size: tuple[int, int],
        *,
        targeted: bool,
        input_map: LinearMap | None = None,
    ) -> None:
        if not victims:
            raise InputError("an attack needs at least one victim")
        keys = [v.key for v in victims]
        if len(set(keys)) != len(keys):
            raise InputError(f"victims need distinct names, got {keys}; set Victim(name=...)")
        self.size = size
        self.batch = batch
        self.input_map = input_map
        self.sign = np.float32(
            1.0 if targeted else -1.0
        )  # targeted ascends the objective, untargeted descends
        self.members: list[_Member] = []
        for victim, key in zip(victims, keys, strict=True):
            if not victim.weight >= 0:
                raise InputError(f"victim {key!r}: weight must be >= 0, got {victim.weight}")
            s = victim.session.info.canonical_size
            zeros = np.zeros((batch, s, s, 3), np.float32)
            _, refs = victim.session.check_batch(zeros, victim.references)
            run = refs
            if victim.steer is not None:
                _, steer = victim.session.check_batch(zeros, victim.steer)
                run = np.ascontiguousarray(refs + steer, dtype=np.float32)
            self.members.append(
                _Member(
                    key=key,
                    session=victim.session,
                    references=refs,
                    weight=float(victim.weight),
                    stepper=victim.session.stepper(run),
                    resize=None if size == (s, s) else Resize(size, (s, s)),
                    steered=victim.steer is not None,
                    ghost=None if victim.ghost is None else victim.ghost.stepper(run),
                    gates=victim.gates,
                    threshold=victim.threshold,
                )
            )

    @property
    def keys(self) -> list[str]:
        return [m.key for m in self.members]

    def _state(self, member: _Member, features: Float32Array, objective: Float32Array) -> ModelState:
        info = member.session.info
        own = info.threshold if member.threshold is None else member.threshold
        threshold = own if member.gates else None
        return ModelState(info.kind, threshold, features, objective, member.references)

    def evaluate(self, images: Float32Array) -> dict[str, ModelState]:
        """Forward only: every victim's features and objective on ``images`` ``[N, H, W, 3]``."""
        states = {}
        view = images if self.input_map is None else self.input_map.forward(images)
        for m in self.members:
            x = view if m.resize is None else m.resize.forward(view)
            features, objective = m.stepper.forward(x)
            states[m.key] = self._state(m, features, m.objective(features, objective))
        return states

    def gradient(
        self,
        images: Float32Array,
        rng: np.random.Generator,
        *,
        diversity: InputDiversity | None = None,
        eot: EOT | None = None,
        shares: Mapping[str, NDArray[np.floating]] | None = None,
    ) -> Gradient:
        """The weighted sum of per-model normalised gradients, signed so that ascending it attacks.

        ``shares`` (per victim key, ``[N]`` non-negative factors) scales a victim's normalised gradient
        per image on top of its weight; a victim whose shares are all 0 is not run (objective NaN).
        """
        samples = 1 if eot is None else eot.samples
        total = np.zeros_like(images)
        objective = {m.key: np.zeros(images.shape[0], np.float32) for m in self.members}
        clean_states: dict[str, ModelState] | None = {}
        share = {
            m.key: None if shares is None or m.key not in shares else np.asarray(shares[m.key], np.float32)
            for m in self.members
        }
        for m in self.members:
            chosen = share[m.key]
            if chosen is not None and not chosen.any():
                objective[m.key][:] = np.nan
                clean_states = None
        for _ in range(samples):
            x = images if eot is None else eot.sample(rng)(images, rng)  # straight-through: no adjoint
            if self.input_map is not None:
                x = self.input_map.forward(x)
            view = None if diversity is None else diversity.sample(self.size, rng)
            if view is not None:
                x = view.forward(x)
            transformed = eot is not None or view is not None
            grad = np.zeros_like(x)
            for m in self.members:
                chosen = share[m.key]
                if chosen is not None and not chosen.any():
                    continue
                xm = x if m.resize is None else m.resize.forward(x)
                features, obj, g = (m.stepper if m.ghost is None else m.ghost)(xm)
                obj = m.objective(features, obj)
                if m.resize is not None:
                    g = m.resize.adjoint(g)
                g = unit_mean_magnitude(g)
                if chosen is not None:
                    g *= chosen[:, None, None, None]
                grad += (m.weight * self.sign) * g
                objective[m.key] += obj / samples
                if clean_states is not None and not transformed:
                    clean_states[m.key] = self._state(m, features, obj)
            if transformed or any(m.ghost is not None for m in self.members):
                clean_states = None  # a ghost's features are not the model's
            if view is not None:
                grad = view.adjoint(grad)
            total += grad if self.input_map is None else self.input_map.adjoint(grad)
        return Gradient(total / np.float32(samples), objective, clean_states)


def unit_mean_magnitude(grad: Float32Array) -> Float32Array:
    """Scale each image's gradient to mean absolute value 1 (a zero gradient stays zero)."""
    scale = np.abs(grad).mean(axis=(1, 2, 3), keepdims=True)
    return np.asarray(grad / np.maximum(scale, np.finfo(np.float32).tiny), dtype=np.float32)
