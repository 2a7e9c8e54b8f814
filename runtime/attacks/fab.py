"""FAB, the fast adaptive boundary attack, under the L-inf norm (untargeted, and AutoAttack's FAB-T).

Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack", ICML
2020, arXiv:1907.02044; the defaults and the FAB-T schedule follow the authors' AutoAttack code
(fra31/auto-attack, ``fab_base.py``).

FAB looks for the *smallest* perturbation that changes the class, not for any within a budget. At the
iterate ``x`` it linearises the boundary between the image's class ``y`` and a class ``j``,
``f(x') = f(x) + grad f(x) . (x' - x) = 0`` with ``f = z_j - z_y`` (a zero-sum combination of logits:
one exact gradient per pair, :meth:`.classifier.ClassifierView.value_and_grad` with ``c = e_j - e_y``),
and projects both the iterate and the original ``x0`` onto that hyperplane intersected with the pixel
box [0, 255] (:func:`project_linf`, the minimal L-inf step). It then moves to the convex combination

    x <- clip((1 - alpha) (x + eta d_x) + alpha (x0 + eta d_0))
    alpha = min(|d_x| / (|d_x| + |d_0|), alpha_max)

with ``d_x``, ``d_0`` the minimal L-inf steps from ``x`` and from ``x0`` onto the hyperplane (``eta``
overshoots it a little; the original's share ``alpha`` keeps the iterate close to ``x0``). Once the
iterate is adversarial it is kept if it is the smallest adversarial so far, and pulled back towards the
original, ``x <- x0 + beta (x - x0)``, to find a closer one on the next steps.

Untargeted (``target_classes = 0``) the pair is the one whose linearised boundary is closest, ``j =
argmin_j |f_j| / ||grad f_j||_1`` (the L-inf distance to the hyperplane), which costs ``K - 1`` gradients
per step (the images are stacked with one coefficient row per class and run in a few large calls).
FAB-T (``target_classes = 9`` in AutoAttack) runs the attack once against each of the ``target_classes``
classes with the highest clean logits after ``y``, with the pair ``(y, t)`` fixed (one gradient per step),
on the images no earlier run has broken within ``eps``; success is still misclassification (any class),
as in the reference. ``restarts`` repeats each run; a restart after the first starts from a random point
of the L-inf ball of radius ``min(eps, smallest adversarial found so far, 255) / 2`` around ``x0`` (the
reference's smaller ball: uniform noise scaled so that its largest coordinate is that radius).

``targeted=True`` (not in the reference) makes the references the target classes ``t``: each step takes
the pair ``(t, c)`` with ``c`` the strongest other class at the iterate, and success is ``argmax = t``.

Budget and bookkeeping. An image misclassified already (targeted: at its target) counts as broken
unchanged, and no run attacks it, as in the reference. FAB minimises the L-inf norm weighted by the
``mask`` (``max_i |d_i| / m_i``; pixels with ``m_i = 0`` never change), so its distance is in the same
units as ``eps``. An image counts as broken when its smallest adversarial lies within the budget
``|d_i| <= eps m_i``; it is then returned. An image whose smallest adversarial lies beyond the budget is
returned clipped into it (nearly always still correctly classified), one without any adversarial as the
clean image: the returned images always lie in the budget and the pixel range, and ``success`` is judged
on them. With ``quantize`` every kept adversarial is an integer point checked on the model as it is: the
iterate rounded to the nearest integers, or, where that falls back across the boundary while the iterate
is adversarial, rounded away from 0 (towards 0 wherever rounding away would leave the budget); the
iterate itself stays real-valued. With ``luminance_only`` the attack works in one value per pixel, the
same on R, G and B (the gradient summed over the channels, the box the channels' intersection, the mask
the channels' minimum), so grey images stay grey.

Cost per step and image: ``K - 1`` gradients untargeted, one for FAB-T (plus a forward for
``targeted=True``), a forward to check the iterate, one or two more with ``quantize``.

Args:
    eps: the L-inf budget within which a found adversarial counts (0..255 units, times the mask);
        ``math.inf`` returns the smallest adversarial found, wherever it is.
    steps: iterations per run (the reference's ``n_iter``, 100).
    restarts: runs per target class (per attack untargeted); AutoAttack's FAB-T uses 1.
    target_classes: 0: untargeted FAB; ``k``: FAB-T against the ``k`` most likely other classes
        (at most ``K - 1``).
    alpha_max: the largest share of the step taken from the original image's projection (0.1).
    eta: overshoot of the projection past the linearised boundary (1.05).
    beta: after an adversarial iterate, keep this share of its perturbation (0.9).

Shapes: ``images`` ``[N, H, W, 3]`` (0..255); the one victim's references ``[N, K]`` one-hot. The
result's ``history`` has one row ``[N]`` per step run (at most ``runs * steps``): the iterate's margin
``z_r - max_{j != r} z_j`` (``r``: the label, or the target when targeted), NaN for an image that run
did not attack; ``objective`` is that margin on the returned images (negative: misclassified; positive
when targeted: target reached); ``steps`` counts the iterations each image received over all runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from uncnn_rt.runtime.arrays import BoolArray, Float32Array, Float64Array
from uncnn_rt.runtime.attacks.base import AttackResult, _check_images, _check_mask
from uncnn_rt.runtime.attacks.classifier import ClassifierView, classifier_of
from uncnn_rt.runtime.attacks.criteria import Criterion, ModelState
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.attacks.linear import LinearMap
from uncnn_rt.runtime.errors import InputError

_ROWS_PER_CALL = 256
"""Untargeted: image-class rows stacked into one gradient call (the batch grows with ``K``)."""
_TINY = 1e-8
"""Floor of the projections' norms in the step share ``alpha`` (0..255 units), as the reference's."""


def project_linf(w: Float64Array, r: Float64Array, lower: Float64Array, upper: Float64Array) -> Float64Array:
    """The smallest step in L-inf onto the hyperplane ``w . d = r`` within the box ``lower <= d <= upper``.

    Rows are independent problems: ``w``, ``lower`` (<= 0), ``upper`` (>= 0) ``[M, n]``, ``r`` ``[M]``.
    Take ``r > 0`` (else flip ``w``). Within ``|d_i| <= lambda`` the most ``w . d`` can reach is
    ``F(lambda) = sum_i |w_i| min(lambda, c_i)``, with ``c_i`` the room coordinate ``i`` has in the
    direction of ``sign(w_i)`` (``upper_i`` or ``-lower_i``). ``F`` is piecewise linear, concave and
    nondecreasing, with breakpoints at the ``c_i``: the answer is the smallest ``lambda`` with ``F(lambda) =
    r``, found exactly by sorting the ``c_i`` (``F`` at each breakpoint from cumulative sums, then the
    linear piece that crosses ``r``), and ``d_i = sign(w_i) min(lambda, c_i)``. When even the box's best
    corner falls short (``F(inf) < r``) the corner itself is returned, the box point closest to the
    hyperplane in ``w . d``.
    """
    flip = np.where(r < 0, -1.0, 1.0)[:, None]
    ws = w * flip
    need = np.abs(r)
    room = np.where(ws > 0, upper, -lower)
    room = np.where(ws != 0, np.maximum(room, 0.0), 0.0)
    weight = np.abs(ws)
    order = np.argsort(room, axis=1, kind="stable")
    c = np.take_along_axis(room, order, axis=1)
    a = np.take_along_axis(weight, order, axis=1)
    saturated = np.cumsum(a * c, axis=1)  # sum over i <= k of a_i c_i
    slope = a.sum(axis=1, keepdims=True) - np.cumsum(a, axis=1)  # sum over i > k of a_i
    reach = saturated + c * slope  # F(c_k)
    feasible = reach[:, -1] >= need
    k = np.argmax(reach >= need[:, None], axis=1)
    rows = np.arange(w.shape[0])
    below = np.where(k > 0, saturated[rows, k - 1], 0.0)
    remaining = np.where(k > 0, slope[rows, k - 1], a.sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(need > 0, (need - below) / remaining, 0.0)
    lam = np.where(feasible, lam, np.inf)
    d = np.sign(ws) * np.minimum(lam[:, None], room)
    return np.asarray(d, dtype=np.float64)


class _Geometry:
    """The coordinates FAB works in: one value per pixel and channel (one per pixel with
    ``luminance_only``), in 0..255 units, with the mask's per-coordinate scale ``m`` of the norm."""

    def __init__(self, x0: Float32Array, weights: Float32Array, eps: float, luminance_only: bool) -> None:
        n = x0.shape[0]
        self.shape = x0.shape
        self.luminance = luminance_only
        m = np.broadcast_to(weights, x0.shape).astype(np.float64)
        low, high = -x0.astype(np.float64), 255.0 - x0.astype(np.float64)
        if luminance_only:
            m, low, high = m.min(axis=3), low.max(axis=3), high.min(axis=3)
        self.scale = m.reshape(n, -1)
        self.free = self.scale > 0
        self.low = np.where(self.free, low.reshape(n, -1), 0.0)
        self.high = np.where(self.free, high.reshape(n, -1), 0.0)
        self.bound = np.where(self.free, np.where(self.free, self.scale, 1.0) * eps, 0.0)
        self._safe_scale = np.where(self.free, self.scale, 1.0)

    def to_pixels(self, v: Float64Array) -> Float32Array:
        """``[M, H, W, 3]`` perturbations from coordinates ``[M, n]``."""
        m, h, w, _ = (v.shape[0], *self.shape[1:])
        if self.luminance:
            return np.ascontiguousarray(
                np.broadcast_to(v.reshape(m, h, w, 1), (m, h, w, 3)), dtype=np.float32
            )
        return np.asarray(v.reshape(m, h, w, 3), dtype=np.float32)

    def from_pixels(self, delta: Float32Array, idx: NDArray[np.intp]) -> Float64Array:
        d = delta.astype(np.float64)
        if self.luminance:
            d = d.mean(axis=3)
        return self.clip(d.reshape(len(idx), -1), idx)

    def weights(self, grad: Float32Array, idx: NDArray[np.intp]) -> Float64Array:
        """The hyperplane's normal in scaled coordinates ``u = v / m``: ``m`` times the gradient."""
        g = grad.astype(np.float64)
        if self.luminance:
            g = g.sum(axis=3)
        return np.asarray(g.reshape(len(idx), -1) * self.scale[idx], dtype=np.float64)

    def clip(self, v: Float64Array, idx: NDArray[np.intp]) -> Float64Array:
        """Into the pixel range (and 0 where the mask is 0)."""
        return np.asarray(np.clip(v, self.low[idx], self.high[idx]), dtype=np.float64)

    def norm(self, v: Float64Array, idx: NDArray[np.intp]) -> Float64Array:
        """``max_i |v_i| / m_i``: the L-inf norm in ``eps`` units."""
        return np.asarray(np.abs(v / self._safe_scale[idx]).max(axis=1, initial=0.0), dtype=np.float64)

    def along(self, w: Float64Array, v: Float64Array, idx: NDArray[np.intp]) -> Float64Array:
        """``w_u . (v / m)``: how far the step ``v`` has moved along the hyperplane's normal."""
        return np.asarray((w * (v / self._safe_scale[idx])).sum(axis=1), dtype=np.float64)

    def step(self, w: Float64Array, r: Float64Array, v: Float64Array, idx: NDArray[np.intp]) -> Float64Array:
        """The minimal step ``dv`` from ``v`` with ``w_u . (dv / m) = r`` inside the pixel range."""
        s = self._safe_scale[idx]
        lower = np.where(self.free[idx], (self.low[idx] - v) / s, 0.0)
        upper = np.where(self.free[idx], (self.high[idx] - v) / s, 0.0)
        return np.asarray(project_linf(w, r, lower, upper) * self.scale[idx], dtype=np.float64)

    def within(self, v: Float64Array, idx: NDArray[np.intp]) -> BoolArray:
        return np.asarray((np.abs(v) <= self.bound[idx]).all(axis=1), dtype=bool)

    def rounded(self, v: Float64Array, idx: NDArray[np.intp]) -> Float64Array:
        """Integer steps (integral ``x0``): rounded, towards 0 where rounding away leaves the budget."""
        q = np.rint(v)
        return np.asarray(np.where(np.abs(q) <= self.bound[idx], q, np.trunc(v)), dtype=np.float64)

    def outward(self, v: Float64Array, idx: NDArray[np.intp]) -> Float64Array:
        """Integer steps rounded away from 0 (within the pixel range, since its ends are integers);
        :meth:`rounded` where that leaves the budget."""
        q = np.sign(v) * np.ceil(np.abs(v) - 1e-9)
        return np.asarray(np.where(np.abs(q) <= self.bound[idx], q, self.rounded(v, idx)), dtype=np.float64)

    def clipped(self, v: Float64Array, idx: NDArray[np.intp]) -> Float64Array:
        """Into the budget (and the pixel range)."""
        return self.clip(np.clip(v, -self.bound[idx], self.bound[idx]), idx)


def _margin(log_probs: Float32Array, classes: NDArray[np.intp]) -> Float32Array:
    """``z_r - max_{j != r} z_j`` per image (logit differences are log-probability differences)."""
    rows = np.arange(log_probs.shape[0])
    own = log_probs[rows, classes]
    others = log_probs.copy()
    others[rows, classes] = -np.inf
    return np.asarray(own - others.max(axis=1), dtype=np.float32)


def _ranked_others(log_probs: Float32Array, labels: NDArray[np.intp]) -> NDArray[np.intp]:
    """``[N, K - 1]``: the classes other than each label, most likely first (FAB-T's targets)."""
    order = np.argsort(-log_probs, axis=1, kind="stable")
    keep = order != labels[:, None]
    return np.asarray(order[keep].reshape(len(labels), -1), dtype=np.intp)


@dataclass(frozen=True, kw_only=True)
class FAB:
    """The fast adaptive boundary attack, L-inf; the module docstring gives the algorithm and arguments."""

    eps: float = 8.0
    steps: int = 100
    restarts: int = 1
    target_classes: int = 0
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9

    def __post_init__(self) -> None:
        if not self.eps >= 0:
            raise InputError(f"FAB: eps must be >= 0 (0..255 units), got {self.eps}")
        if self.steps < 1 or self.restarts < 1:
            raise InputError(f"FAB: steps and restarts must be >= 1, got {self.steps}, {self.restarts}")
        if self.target_classes < 0:
            raise InputError(f"FAB: target_classes must be >= 0, got {self.target_classes}")
        if not 0.0 < self.alpha_max <= 1.0:
            raise InputError(f"FAB: alpha_max must be in (0, 1], got {self.alpha_max}")
        if not 1.0 <= self.eta < math.inf:
            raise InputError(f"FAB: eta must be finite and >= 1, got {self.eta}")
        if not 0.0 < self.beta <= 1.0:
            raise InputError(f"FAB: beta must be in (0, 1], got {self.beta}")

    def __call__(
        self,
        images: ArrayLike,
        victims: Sequence[Victim],
        *,
        targeted: bool = False,
        mask: ArrayLike | None = None,
        quantize: bool = False,
        stop_when: Criterion | None = None,
        seed: int | np.random.Generator | None = 0,
        input_map: LinearMap | None = None,
        luminance_only: bool = False,
        on_step: Callable[[int], None] | None = None,
        init: ArrayLike | None = None,
    ) -> AttackResult:
        """Attack ``images`` ``[N, H, W, 3]`` (0..255) against the one classifier in ``victims``.

        Args, as :meth:`.base.GradientAttack.__call__`: ``targeted`` (the references are target
        classes), ``mask``, ``quantize``, ``seed``, ``input_map``, ``luminance_only``, ``on_step``
        (called with the iterations done so far, over all runs). ``init``: the first run's starting
        perturbation instead of 0 (clipped into the pixel range and the mask). ``stop_when``: within a
        run, freeze an image once its kept adversarial lies in the budget and meets this criterion
        (evaluated on the kept point); ``None`` runs every step, which is what minimises the distance.
        """
        x0 = _check_images(images)
        n, h, w, _ = x0.shape
        weights = _check_mask(mask, x0.shape)
        if quantize and not np.array_equal(x0, np.rint(x0)):
            raise InputError("quantize=True needs integer-valued images (the decoded 8-bit photo)")
        if targeted and self.target_classes:
            raise InputError(
                "FAB: target_classes picks FAB-T's own targets and needs targeted=False; with "
                f"targeted=True the references are the targets (got target_classes={self.target_classes})"
            )
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        view, classes = classifier_of(victims, (h, w), input_map)
        key = victims[0].key
        geometry = _Geometry(x0, weights, self.eps, luminance_only)
        start = None
        if init is not None:
            start_pixels = np.ascontiguousarray(init, dtype=np.float32)
            if start_pixels.shape != x0.shape:
                raise InputError(f"init must have shape {list(x0.shape)}, got {list(start_pixels.shape)}")
            start = geometry.from_pixels(start_pixels, np.arange(n))

        clean = view.log_probs(x0)
        state = _State(
            delta=np.zeros((n, geometry.scale.shape[1])),
            norm=np.full(n, np.inf),
            kept_log_probs=clean.copy(),
            broken=self._reached(clean, classes, targeted),
        )
        state.norm[state.broken] = 0.0
        if targeted or not self.target_classes:
            targets: list[NDArray[np.intp] | None] = [None]
        else:
            ranked = _ranked_others(clean, classes)
            targets = [ranked[:, k] for k in range(min(self.target_classes, ranked.shape[1]))]

        run = _Run(self, view, classes, geometry, x0, targeted, quantize, key, victims[0].references)
        steps = np.zeros(n, dtype=np.int64)
        history: list[Float32Array] = []
        done = 0
        for target in targets:
            for restart in range(self.restarts):
                idx = np.flatnonzero(~state.broken)
                if idx.size == 0:
                    break
                if restart > 0:
                    v = self._random_start(geometry, idx, state.norm[idx], rng)
                elif start is not None and done == 0:
                    v = start[idx]
                else:
                    v = np.zeros((idx.size, geometry.scale.shape[1]))
                for rows, active in run.iterate(idx, v, target, state, stop_when):
                    steps[active] += 1
                    history.append(rows)
                    done += 1
                    if on_step is not None:
                        on_step(done)

        final = np.arange(n)
        keep = geometry.within(state.delta, final) & state.broken
        delta = np.where(keep[:, None], state.delta, geometry.clipped(state.delta, final))
        if quantize:
            delta = geometry.rounded(delta, final)
        out = np.asarray(np.clip(x0 + geometry.to_pixels(delta), 0.0, 255.0), dtype=np.float32)
        log_probs = view.log_probs(out)
        return AttackResult(
            images=out,
            originals=x0,
            history={key: np.stack(history) if history else np.zeros((0, n), np.float32)},
            objective={key: _margin(log_probs, classes)},
            features={key: log_probs},
            success={key: self._reached(log_probs, classes, targeted)},
            steps=steps,
        )

    @staticmethod
    def _reached(log_probs: Float32Array, classes: NDArray[np.intp], targeted: bool) -> BoolArray:
        top = np.argmax(log_probs, axis=1)
        return np.asarray(top == classes if targeted else top != classes, dtype=bool)

    def _random_start(
        self, geometry: _Geometry, idx: NDArray[np.intp], best: Float64Array, rng: np.random.Generator
    ) -> Float64Array:
        """Uniform noise scaled so that its largest coordinate (in ``eps`` units) is half of
        ``min(eps, the smallest adversarial so far, 255)``, the reference's restart."""
        t = rng.uniform(-1.0, 1.0, size=(idx.size, geometry.scale.shape[1])) * geometry.free[idx]
        largest = np.maximum(np.abs(t).max(axis=1, initial=0.0), 1e-12)
        radius = 0.5 * np.minimum(np.minimum(best, self.eps), 255.0)
        return geometry.clip(t / largest[:, None] * radius[:, None] * geometry.scale[idx], idx)


@dataclass
class _State:
    """Per image: the smallest kept adversarial step (coordinates), its norm (inf: none yet), its
    log-probabilities, and whether it lies in the budget (or the clean image already counts)."""

    delta: Float64Array
    norm: Float64Array
    kept_log_probs: Float32Array
    broken: BoolArray


@dataclass
class _Run:
    """One FAB run over a subset of the images: the update of the module docstring, step by step."""

    attack: FAB
    view: ClassifierView
    classes: NDArray[np.intp]
    geometry: _Geometry
    x0: Float32Array
    targeted: bool
    quantize: bool
    key: str
    references: ArrayLike

    def iterate(
        self,
        idx: NDArray[np.intp],
        v: Float64Array,
        target: NDArray[np.intp] | None,
        state: _State,
        stop_when: Criterion | None,
    ) -> Iterator[tuple[Float32Array, NDArray[np.intp]]]:
        """Run ``steps`` iterations on images ``idx`` from coordinates ``v``, yielding after each step its
        history row ``[N]`` and the images that took it."""
        fab, g = self.attack, self.geometry
        n = self.x0.shape[0]
        live = np.ones(idx.size, dtype=bool)
        for _ in range(fab.steps):
            act = idx[live]
            if act.size == 0:
                break
            va = v[live]
            x = self._images(va, act)
            df, grad, log_probs = self._pair(x, act, target)
            w = g.weights(grad, act)
            # The hyperplane df + grad . (x' - x) = 0: from x a step d with grad . d = -df; from x0 one
            # with grad . d = -df + grad . (x - x0).
            reach = g.along(w, va, act)
            d_here = g.step(w, -df, va, act)
            d_orig = g.step(w, -df + reach, np.zeros_like(va), act)
            a_here = np.maximum(g.norm(d_here, act), _TINY)
            a_orig = np.maximum(g.norm(d_orig, act), _TINY)
            alpha = np.minimum(a_here / (a_here + a_orig), fab.alpha_max)[:, None]
            va = g.clip((1.0 - alpha) * (va + fab.eta * d_here) + alpha * fab.eta * d_orig, act)

            reached_log_probs = self.view.log_probs(self._images(va, act))
            adversarial = self._adversarial(reached_log_probs, act)
            # The point kept for this iterate if it beats the smallest adversarial so far: the iterate
            # itself, or an integer point near it.
            candidate, cand_log_probs, cand_adv = va, reached_log_probs, adversarial
            if self.quantize:
                candidate, cand_log_probs, cand_adv = self._quantized(va, act, adversarial)
            cand_norm = g.norm(candidate, act)
            better = cand_adv & (cand_norm < state.norm[act])
            kept = act[better]
            state.kept_log_probs[kept] = cand_log_probs[better]
            state.delta[kept] = candidate[better]
            state.norm[kept] = cand_norm[better]
            state.broken[kept] = g.within(candidate[better], kept)
            v[live] = np.where(adversarial[:, None], fab.beta * va, va)

            row = np.full(n, np.nan, dtype=np.float32)
            row[act] = _margin(log_probs, self.classes[act])
            if stop_when is not None:
                live[live] &= ~(state.broken[act] & stop_when(self._states(act, state)))
            yield row, act

    def _quantized(
        self, v: Float64Array, idx: NDArray[np.intp], adversarial: BoolArray
    ) -> tuple[Float64Array, Float32Array, BoolArray]:
        """The integer point kept for the iterate ``v``, its log-probabilities and whether it is
        adversarial: ``v`` rounded; where that is not adversarial but ``v`` is, ``v`` rounded away from 0
        (FAB ends just past the boundary, mostly at ``+-lambda`` on every coordinate, and rounding
        ``lambda`` down falls back across it; rounding up moves every coordinate further the same way)."""
        g = self.geometry
        candidate = g.rounded(v, idx)
        log_probs = self.view.log_probs(self._images(candidate, idx))
        reached = self._adversarial(log_probs, idx)
        retry = np.flatnonzero(adversarial & ~reached)
        if retry.size:
            outward = g.outward(v[retry], idx[retry])
            lp = self.view.log_probs(self._images(outward, idx[retry]))
            ok = self._adversarial(lp, idx[retry])
            candidate[retry[ok]], log_probs[retry[ok]], reached[retry[ok]] = outward[ok], lp[ok], True
        return candidate, log_probs, reached

    def _images(self, v: Float64Array, idx: NDArray[np.intp]) -> Float32Array:
        return np.asarray(np.clip(self.x0[idx] + self.geometry.to_pixels(v), 0.0, 255.0), dtype=np.float32)

    def _adversarial(self, log_probs: Float32Array, idx: NDArray[np.intp]) -> BoolArray:
        return FAB._reached(log_probs, self.classes[idx], self.targeted)

    def _states(self, idx: NDArray[np.intp], state: _State) -> dict[str, ModelState]:
        info = self.view.session.info
        refs = np.asarray(self.references, dtype=np.float32)[idx]
        features = state.kept_log_probs[idx]
        objective = np.asarray((features * refs).sum(axis=1), dtype=np.float32)
        return {self.key: ModelState(info.kind, info.threshold, features, objective, refs)}

    def _pair(
        self, x: Float32Array, idx: NDArray[np.intp], target: NDArray[np.intp] | None
    ) -> tuple[Float64Array, Float32Array, Float32Array]:
        """``(f [M], grad f [M, H, W, 3], log-probabilities at x)`` for the step's class pair, ``f = z_a -
        z_b`` with ``f > 0`` on the adversarial side."""
        m, k = x.shape[0], self.view.classes
        rows = np.arange(m)
        label = self.classes[idx]
        if target is None and not self.targeted:
            return self._closest_boundary(x, idx, label)
        if self.targeted:
            # The target against the strongest other class at the iterate.
            log_probs = self.view.log_probs(x)
            rival = log_probs.copy()
            rival[rows, label] = -np.inf
            a, b = label, np.argmax(rival, axis=1)
        else:
            assert target is not None
            a, b = target[idx], label
        c = np.zeros((m, k), np.float32)
        c[rows, a] += 1.0
        c[rows, b] -= 1.0
        log_probs, value, grad = self.view.value_and_grad(x, c)
        return value.astype(np.float64), grad, log_probs

    def _closest_boundary(
        self, x: Float32Array, idx: NDArray[np.intp], label: NDArray[np.intp]
    ) -> tuple[Float64Array, Float32Array, Float32Array]:
        """Untargeted: of the ``K - 1`` pairs ``(j, y)``, the one with the smallest linearised L-inf
        distance ``|z_j - z_y| / ||grad||_1`` (in the scaled coordinates of the mask)."""
        m, k = x.shape[0], self.view.classes
        rows = np.arange(m)
        others = np.argsort(np.arange(k)[None, :] == label[:, None], axis=1, kind="stable")[:, : k - 1]
        per_call = max(1, _ROWS_PER_CALL // m)
        best = np.full(m, np.inf)
        best_value = np.zeros(m)
        best_grad = np.zeros_like(x)
        log_probs: Float32Array | None = None
        for first in range(0, k - 1, per_call):
            cols = others[:, first : first + per_call]  # [m, c]
            count = cols.shape[1]
            c = np.zeros((count, m, k), np.float32)
            c[np.arange(count)[:, None], rows[None, :], cols.T] = 1.0
            c[:, rows, label] -= 1.0
            stacked = np.broadcast_to(x, (count, *x.shape)).reshape(count * m, *x.shape[1:])
            lp, value, grad = self.view.value_and_grad(stacked, c.reshape(count * m, k))
            if log_probs is None:
                log_probs = lp[:m]
            for j in range(count):
                g = grad[j * m : (j + 1) * m]
                dual = np.abs(self.geometry.weights(g, idx)).sum(axis=1)
                dist = np.abs(value[j * m : (j + 1) * m].astype(np.float64)) / (dual + 1e-12)
                closer = dist < best
                best[closer] = dist[closer]
                best_value[closer] = value[j * m : (j + 1) * m][closer]
                best_grad[closer] = g[closer]
        assert log_probs is not None
        return best_value, best_grad, log_probs
