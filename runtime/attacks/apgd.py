"""Auto-PGD (APGD): PGD with momentum and a step size that halves itself at fixed checkpoints.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, arXiv:2003.01690; the reference implementation is
``autoattack/autopgd_base.py`` of fra31/auto-attack. Under the L-inf norm, per image, from a random
start ``x_0`` in the budget, with ``P`` the projection onto the budget and ``eta = 2 eps``::

    x_1     = P(x_0 + eta sign(grad f(x_0)))
    z       = P(x_k + eta sign(grad f(x_k)))
    x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha) (x_k - x_{k-1}))

At each checkpoint ``w_j`` (:func:`checkpoints`) an image's ``eta`` halves, and its iterate jumps back
to its best point so far, when fewer than ``rho`` of the steps since the previous checkpoint raised the
loss, or when the previous checkpoint did not halve ``eta`` and the best loss has not risen since.

The losses, ascended (``z``: logits, ``pi``: their order, descending):

* ``ce``: ``-log p_y``;
* ``dlr``: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``;
* targeted DLR (``dlr`` with a target ``t``): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``;
* targeted CE (``ce`` with a target): ``log p_t``.

With the order fixed at the current point, DLR's numerator and denominator are zero-sum combinations
``c_num . z`` and ``c_den . z`` of the logits, so ``grad(num / den) = grad(c . z)`` with
``c = c_num / den - num / den^2 c_den``: one gradient pass of the classifier per step (after a
forward pass that finds the order), exact, through :meth:`~.classifier.ClassifierView.value_and_grad`.

Under the L2 norm (``norm="l2"``, the reference's other norm) ``sign(grad)`` becomes ``grad / ||grad||_2``,
the start is a random point on the sphere of radius ``eps`` and ``P`` scales the perturbation into the
ball, then clips it to the pixel range, as the reference does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from uncnn_rt.runtime.arrays import BoolArray, Float32Array, IntArray
from uncnn_rt.runtime.attacks.base import AttackResult, _check_images, _check_mask, _per_pixel_bound
from uncnn_rt.runtime.attacks.classifier import ClassifierView, classifier_of
from uncnn_rt.runtime.attacks.criteria import Criterion
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.attacks.linear import LinearMap
from uncnn_rt.runtime.errors import InputError

_DLR_FLOOR = 1e-12
"""Added to DLR's denominator, as in the paper, so that equal top logits do not divide by 0."""


def checkpoints(steps: int) -> tuple[int, ...]:
    """The iterations ``w_j = ceil(p_j steps)`` after which APGD may halve its step size.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` while ``p_j <= 1``
    (the paper's Section 3.2), in exact fractions: ``0.22 + 0.19`` in floating point is a hair above
    0.41, which would put ``w_2`` at 42 of 100 instead of 41. Repeats (few steps) are dropped.
    """
    p = [Fraction(0), Fraction(22, 100)]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100))
        if nxt > 1:
            break
        p.append(nxt)
    return tuple(sorted({math.ceil(q * steps) for q in p}))


@dataclass(frozen=True, kw_only=True)
class APGD:
    """Auto-PGD under the L-inf (or L2) norm (module docstring): APGD-CE, APGD-DLR and APGD-T.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, arXiv:2003.01690. AutoAttack runs ``APGD(loss="ce")`` (one
    run, no restarts) and ``APGD(loss="dlr", target_classes=9)`` (APGD-T).

    Args:
        eps: the budget in 0..255 units: per pixel and channel (L-inf; times the mask per pixel), or the
            radius of each image's L2 ball (L2; the mask scales the step, and its 0 pixels never change).
        loss: ``ce`` (cross-entropy) or ``dlr`` (the difference of logits ratio, invariant to a shift
            and a scaling of the logits); with a target, their targeted forms (module docstring).
        steps: iterations per run (``N_iter``); each costs one gradient pass of the images still
            unbroken (DLR: and one forward pass).
        restarts: runs from fresh random starts, each on the images the earlier runs left unbroken.
        target_classes: 0: untargeted. ``T > 0`` (APGD-T; 9 in AutoAttack): for each of the ``T`` classes
            other than the true one with the highest clean logits, in that order, ``restarts`` runs of
            the targeted loss against that class, on the images still unbroken. Success is still
            misclassification, as in the reference. Not used when the call is ``targeted``.
        rho: the share of loss-raising steps between two checkpoints below which ``eta`` halves.
        alpha: momentum: the weight of the new gradient step against the last move (the first step
            has none).
        norm: ``linf`` (AutoAttack's standard) or ``l2``. The step size starts at ``2 eps`` for both.

    Details where the paper and the reference differ or say nothing (what this does):

    * the random start is the reference's: ``x0 + eps * mask * t / max|t|`` with ``t`` uniform in
      ``[-1, 1]`` (L-inf), ``x0 + eps * t / ||t||_2`` with ``t`` Gaussian on the unmasked pixels (L2),
      projected onto the pixel range;
    * the count of loss-raising steps at a checkpoint compares each iterate with the one before,
      counting a jump back to the best point as an iterate of the best loss (the paper), and halves
      when it is strictly below ``rho`` times the steps since the last checkpoint (the paper; the
      reference halves at equality too);
    * the second condition does not apply at the first checkpoint (the reference's);
    * an image stops at its first successful iterate, which is what it returns (the reference goes on
      and returns the last one; success is the same); an unbroken image returns its best-loss point
      over all runs;
    * ``targeted=True`` (the references are the targets ``t``; the true class is unknown): ``dlr`` ascends
      the targeted DLR with ``y`` the strongest class other than ``t`` at the current point, i.e.
      ``(z_t - max_{i != t} z_i) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``; ``ce`` ascends ``log p_t``;
      success is ``argmax == t``.
    """

    eps: float = 8.0
    loss: Literal["ce", "dlr"] = "ce"
    steps: int = 100
    restarts: int = 1
    target_classes: int = 0
    rho: float = 0.75
    alpha: float = 0.75
    norm: Literal["linf", "l2"] = "linf"

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < math.inf:
            raise InputError(f"APGD: eps must be finite and >= 0 (0..255 units), got {self.eps}")
        if self.loss not in ("ce", "dlr"):
            raise InputError(f"APGD: loss must be 'ce' or 'dlr', got {self.loss!r}")
        if self.steps < 1:
            raise InputError(f"APGD: steps must be >= 1, got {self.steps}")
        if self.restarts < 1:
            raise InputError(f"APGD: restarts must be >= 1, got {self.restarts}")
        if self.target_classes < 0:
            raise InputError(f"APGD: target_classes must be >= 0, got {self.target_classes}")
        if not 0.0 < self.rho <= 1.0:
            raise InputError(f"APGD: rho must be in (0, 1], got {self.rho}")
        if not 0.0 < self.alpha <= 1.0:
            raise InputError(f"APGD: alpha must be in (0, 1], got {self.alpha}")
        if self.norm not in ("linf", "l2"):
            raise InputError(f"APGD: norm must be 'linf' or 'l2', got {self.norm!r}")

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

        Args:
            images: RGB, uint8 or float, 0..255.
            victims: one :class:`~.ensemble.Victim` whose references are one-hot ``[N, K]``: the true
                classes (untargeted) or the target classes (``targeted``).
            targeted: reach the reference class instead of leaving it.
            mask: ``[H, W]``, ``[N, H, W]``, ``[H, W, C]`` or ``[N, H, W, C]`` in [0, 1]: scales the
                budget and the step per pixel.
            quantize: evaluate, judge and return integer pixel values (``images`` must be integral).
            stop_when: accepted for the shared signature and not used: each image stops at its own
                success (misclassified, or the target reached), the only criterion APGD has.
            seed: seed or generator of the random starts.
            input_map: the linear map the classifier sees the images through; the budget stays in the
                images' own grid.
            luminance_only: the same change on R, G and B (channel-mean gradient, random start per pixel).
            on_step: called with the iterations done so far (over all runs) after each iteration.
            init: the first run's starting perturbation ``[N, H, W, 3]`` (projected onto the budget)
                instead of a random one; later runs start at random.

        Returns:
            :class:`~.base.AttackResult` with ``history`` ``[runs * steps, N]`` (the loss of each iterate
            after the start, run after run; NaN where an image was not attacked: already broken, or
            stopped), ``objective`` the margin ``max_{i != y} z_i - z_y``
            (``targeted``: ``z_t - max_{i != t} z_i``) of the returned images, positive where they
            succeed, ``success``, and ``steps`` the iterations each image received over all runs.
        """
        del stop_when
        x0 = _check_images(images)
        n, h, w, _ = x0.shape
        weights = _check_mask(mask, x0.shape)
        if quantize and not np.array_equal(x0, np.rint(x0)):
            raise InputError("quantize=True needs integer-valued images (the decoded 8-bit photo)")
        view, labels = classifier_of(victims, (h, w), input_map)
        key = victims[0].key
        needed = 3 if self.loss == "dlr" and not targeted and self.target_classes == 0 else 4
        if self.loss == "dlr" and view.classes < needed:
            raise InputError(
                f"APGD: the {'targeted ' if needed == 4 else ''}DLR loss needs at least {needed} classes, "
                f"{view.session.name} has {view.classes}"
            )
        start = None
        if init is not None:
            start = np.ascontiguousarray(init, dtype=np.float32)
            if start.shape != x0.shape:
                raise InputError(f"init must have shape {list(x0.shape)}, got {list(start.shape)}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        l2 = self.eps if self.norm == "l2" else None
        bound = _per_pixel_bound(self.eps if l2 is None else math.inf, weights, x0.shape)
        box = _Box(x0, bound, np.broadcast_to(weights, x0.shape), quantize, l2)

        clean = view.log_probs(x0)
        runs: list[tuple[IntArray | None, IntArray | None]]
        if targeted:
            runs = [(None, labels)] * self.restarts
        elif self.target_classes > 0:
            ranked = np.where(np.eye(view.classes, dtype=bool)[labels], -np.inf, clean)
            order = np.argsort(-ranked, axis=1, kind="stable").astype(np.intp)
            count = min(self.target_classes, view.classes - 1)
            runs = [(labels, order[:, j]) for j in range(count) for _ in range(self.restarts)]
        else:
            runs = [(labels, None)] * self.restarts

        done = _succeeded(clean, labels, targeted)
        images_out = x0.copy()
        best_loss = np.full(n, -np.inf)
        steps = np.zeros(n, np.int64)
        history: list[Float32Array] = []
        progress = _Progress(on_step)
        for number, (true, target) in enumerate(runs):
            rows = np.full((self.steps, n), np.nan, np.float32)
            history.append(rows)
            idx = np.flatnonzero(~done)
            if idx.size == 0:
                continue
            if start is not None and number == 0:
                delta = start[idx]
            else:
                delta = _random_start(rng, bound[idx], luminance_only, l2)
            objective = _Objective(
                view,
                self.loss,
                None if true is None else true[idx],
                None if target is None else target[idx],
                targeted=targeted,
                luminance_only=luminance_only,
            )
            run = self._run(box.of(idx), objective, delta, progress)
            rows[:, idx] = run.history
            steps[idx] += run.steps
            keep = run.broken | (run.loss > best_loss[idx])
            images_out[idx[keep]] = run.images[keep]
            best_loss[idx[keep]] = run.loss[keep]
            done[idx] |= run.broken

        final = view.log_probs(images_out)
        return AttackResult(
            images=images_out,
            originals=x0,
            history={key: np.concatenate(history, axis=0)},
            objective={key: _margin(final, labels, targeted)},
            features={key: final},
            success={key: _succeeded(final, labels, targeted)},
            steps=steps,
        )

    def _run(self, box: _Box, objective: _Objective, delta: Float32Array, progress: _Progress) -> _Run:
        """One APGD run of ``self.steps`` iterations on the images of ``box``, from ``x0 + delta``."""
        m = box.x0.shape[0]
        marks = checkpoints(self.steps)
        span = dict(zip(marks[1:], np.diff(marks).tolist(), strict=True))

        x = box.project(box.x0 + delta)
        shown = box.shown(x)
        log_probs, loss, grad = objective(shown, np.arange(m))
        broken = objective.success(log_probs, np.arange(m))
        adv, adv_loss = shown.copy(), loss.copy()
        x_best, shown_best, loss_best, grad_best = x.copy(), shown.copy(), loss.copy(), grad.copy()
        x_prev = x.copy()
        eta = np.full(m, 2.0 * self.eps, np.float32)
        last = loss.copy()  # the loss of the current iterate, for counting the steps that raise it
        raised = np.zeros(m, np.int64)
        best_at_mark = loss_best.copy()
        halved_at_mark = np.ones(m, bool)  # the reference's: no stall test at the first checkpoint
        steps = np.zeros(m, np.int64)
        history = np.full((self.steps, m), np.nan, np.float32)
        for k in range(self.steps):
            live = np.flatnonzero(~broken)
            if live.size == 0:
                break
            a = np.float32(1.0 if k == 0 else self.alpha)
            xl = x[live]
            direction = box.direction(box.weights[live] * grad[live])
            z = box.project(xl + eta[live, None, None, None] * box.weights[live] * direction, live)
            moved = box.project(xl + a * (z - xl) + (1 - a) * (xl - x_prev[live]), live)
            x_prev[live], x[live] = xl, moved
            shown_live = box.shown(moved, live)
            log_probs, loss_live, grad_live = objective(shown_live, live)
            grad[live] = grad_live
            steps[live] += 1
            history[k, live] = loss_live
            raised[live] += loss_live > last[live]
            last[live] = loss_live

            hit = objective.success(log_probs, live)
            broken[live[hit]] = True
            adv[live[hit]], adv_loss[live[hit]] = shown_live[hit], loss_live[hit]
            better = loss_live > loss_best[live]
            up = live[better]
            x_best[up], shown_best[up] = moved[better], shown_live[better]
            loss_best[up], grad_best[up] = loss_live[better], grad_live[better]
            progress()

            mark = k + 1
            if mark in span and mark < self.steps:
                halve = (
                    _halves(raised, span[mark], self.rho, halved_at_mark, loss_best, best_at_mark) & ~broken
                )
                eta[halve] /= 2
                x[halve], grad[halve], last[halve] = x_best[halve], grad_best[halve], loss_best[halve]
                halved_at_mark, best_at_mark = halve, loss_best.copy()
                raised[:] = 0
        chosen = broken[:, None, None, None]
        return _Run(
            broken,
            np.asarray(np.where(chosen, adv, shown_best), dtype=np.float32),
            np.where(broken, adv_loss, loss_best),
            steps,
            history,
        )


def _halves(
    raised: NDArray[np.int64],
    span: int,
    rho: float,
    halved_before: BoolArray,
    best: NDArray[np.float64],
    best_before: NDArray[np.float64],
) -> BoolArray:
    """At a checkpoint ``span`` iterations after the last: whether each image's step size halves.

    The paper's two conditions: fewer than ``rho * span`` of those steps raised the loss (``raised``),
    or the last checkpoint did not halve it (``halved_before``) and the best loss has not risen since
    (``best <= best_before``).
    """
    return np.asarray((raised < rho * span) | (~halved_before & (best <= best_before)))


@dataclass(frozen=True)
class _Run:
    """One run's outcome per image: broken, the returned (shown) image and its loss, iterations, and
    ``history`` ``[steps, m]`` of the iterates' losses (NaN after an image stopped)."""

    broken: BoolArray
    images: Float32Array
    loss: NDArray[np.float64]
    steps: NDArray[np.int64]
    history: Float32Array


class _Progress:
    """Counts the iterations over all runs and reports each to ``on_step``."""

    def __init__(self, on_step: Callable[[int], None] | None) -> None:
        self.on_step, self.count = on_step, 0

    def __call__(self) -> None:
        self.count += 1
        if self.on_step is not None:
            self.on_step(self.count)


@dataclass(frozen=True)
class _Box:
    """The feasible set of a batch: ``|x - x0| <= bound`` and ``0 <= x <= 255``, and what a saved file of
    ``x`` holds (integers within the integral bound, when quantising)."""

    x0: Float32Array
    bound: Float32Array
    weights: Float32Array
    quantize: bool
    l2: float | None = None
    """The L2 radius per image (0..255 units); None: the L-inf box ``bound`` alone."""

    def of(self, idx: IntArray) -> _Box:
        return _Box(self.x0[idx], self.bound[idx], self.weights[idx], self.quantize, self.l2)

    def direction(self, grad: Float32Array) -> Float32Array:
        """The steepest-ascent step of unit norm: ``sign(g)`` (L-inf), ``g / ||g||_2`` (L2)."""
        if self.l2 is None:
            return np.sign(grad).astype(np.float32)
        return np.asarray(grad / np.maximum(_norms(grad), 1e-12), dtype=np.float32)

    def project(self, x: Float32Array, idx: IntArray | None = None) -> Float32Array:
        """Into the budget: for L2, ``delta`` scaled into the ball and then clipped to the box (which
        only shrinks it), as the reference does; not the exact projection onto their intersection."""
        x0, bound = (self.x0, self.bound) if idx is None else (self.x0[idx], self.bound[idx])
        if self.l2 is not None:
            delta = np.where(bound > 0, x - x0, np.float32(0.0))
            x = x0 + delta * np.minimum(1.0, self.l2 / np.maximum(_norms(delta), 1e-12))
        lo, hi = np.maximum(x0 - bound, 0.0), np.minimum(x0 + bound, 255.0)
        return np.asarray(np.clip(x, lo, hi), dtype=np.float32)

    def shown(self, x: Float32Array, idx: IntArray | None = None) -> Float32Array:
        """``x`` as evaluated and returned: rounded when quantising. With integral ``x0``, rounding
        ``x - x0`` and clipping it to ``floor(bound)`` keeps both the box and the pixel range."""
        if not self.quantize:
            return x
        x0, bound = (self.x0, self.bound) if idx is None else (self.x0[idx], self.bound[idx])
        integral = np.floor(bound)
        delta = np.clip(np.rint(x - x0), -integral, integral)
        if self.l2 is not None:  # where rounding away from 0 leaves the ball, truncation towards 0 cannot
            over = _norms(delta)[:, 0, 0, 0] > self.l2
            delta[over] = np.clip(np.trunc(x[over] - x0[over]), -integral[over], integral[over])
        return np.asarray(x0 + delta, dtype=np.float32)


def _random_start(
    rng: np.random.Generator, bound: Float32Array, luminance_only: bool, l2: float | None
) -> Float32Array:
    """The reference's random starts: ``bound * t / max|t|``, ``t`` uniform in ``[-1, 1]`` (L-inf), or
    ``l2 * t / ||t||_2`` over the unmasked pixels, ``t`` Gaussian (L2); one value per pixel for grey."""
    m, h, w, _ = bound.shape
    shape = (m, h, w, 1 if luminance_only else 3)
    if l2 is None:
        t = rng.uniform(-1.0, 1.0, size=shape)
        t = np.broadcast_to(t / np.maximum(np.abs(t).max(axis=(1, 2, 3), keepdims=True), 1e-12), bound.shape)
        return np.asarray(t * bound, dtype=np.float32)
    t = np.broadcast_to(rng.standard_normal(size=shape), bound.shape) * (bound > 0)
    return np.asarray(l2 * t / np.maximum(_norms(t), 1e-12), dtype=np.float32)


def _norms(x: NDArray[np.floating]) -> NDArray[np.float64]:
    """``[N, 1, 1, 1]`` L2 norms of the images of ``x``."""
    squares = np.square(x, dtype=np.float64).sum(axis=(1, 2, 3), keepdims=True)
    return np.asarray(np.sqrt(squares), dtype=np.float64)


@dataclass
class _Objective:
    """The loss of one run at images of the run's batch (rows ``idx``), with its exact gradient.

    ``true``: the true classes (None: unknown, a targeted call); ``target``: the target classes (None:
    untargeted). ``targeted``: success is reaching ``target``, else leaving ``true``.
    """

    view: ClassifierView
    loss: Literal["ce", "dlr"]
    true: IntArray | None
    target: IntArray | None
    targeted: bool
    luminance_only: bool

    def __call__(
        self, images: Float32Array, idx: IntArray
    ) -> tuple[Float32Array, NDArray[np.float64], Float32Array]:
        """``(log_probs [m, K], loss [m], d loss / d images [m, H, W, 3])``."""
        k = self.view.classes
        eye = np.eye(k, dtype=np.float64)
        if self.loss == "ce":
            # -log p_y untargeted, log p_t towards a target: one pass with c = -e_y or e_t.
            c = -eye[self._true(idx)] if self.target is None else eye[self.target[idx]]
            log_probs, value, grad = self.view.value_and_grad(images, c)
            return log_probs, value.astype(np.float64), self._channels(grad)
        log_probs = self.view.log_probs(images)
        z = log_probs.astype(np.float64)
        order = np.argsort(-z, axis=1, kind="stable")
        if self.target is None:
            y = self._true(idx)
            c_num = eye[_strongest_other(z, y)] - eye[y]
            c_den = eye[order[:, 0]] - eye[order[:, 2]]
        else:
            t = self.target[idx]
            # Without the true class, the strongest class other than the target stands in for it.
            y = _strongest_other(z, t) if self.true is None else self.true[idx]
            c_num = eye[t] - eye[y]
            c_den = eye[order[:, 0]] - 0.5 * (eye[order[:, 2]] + eye[order[:, 3]])
        num = (c_num * z).sum(axis=1)
        den = (c_den * z).sum(axis=1) + _DLR_FLOOR
        c = c_num / den[:, None] - (num / den**2)[:, None] * c_den
        _, _, grad = self.view.value_and_grad(images, c)
        return log_probs, num / den, self._channels(grad)

    def success(self, log_probs: Float32Array, idx: IntArray) -> BoolArray:
        top = np.argmax(log_probs, axis=1)
        if self.targeted:
            assert self.target is not None
            return np.asarray(top == self.target[idx])
        return np.asarray(top != self._true(idx))

    def _true(self, idx: IntArray) -> IntArray:
        assert self.true is not None, "an untargeted loss needs the true classes"
        return self.true[idx]

    def _channels(self, grad: Float32Array) -> Float32Array:
        if not self.luminance_only:
            return grad
        return np.ascontiguousarray(np.broadcast_to(grad.mean(axis=3, keepdims=True), grad.shape))


def _strongest_other(z: NDArray[np.float64], classes: IntArray) -> IntArray:
    """Per row, the class of the largest ``z`` other than ``classes``."""
    others = np.where(np.eye(z.shape[1], dtype=bool)[classes], -np.inf, z)
    return np.asarray(np.argmax(others, axis=1), dtype=np.intp)


def _succeeded(log_probs: Float32Array, labels: IntArray, targeted: bool) -> BoolArray:
    top = np.argmax(log_probs, axis=1)
    return np.asarray(top == labels if targeted else top != labels)


def _margin(log_probs: Float32Array, labels: IntArray, targeted: bool) -> Float32Array:
    """``max_{i != y} z_i - z_y`` (``targeted``: ``z_t - max_{i != t} z_i``): positive on success."""
    own = np.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
    others = np.where(np.eye(log_probs.shape[1], dtype=bool)[labels], -np.inf, log_probs).max(axis=1)
    return np.asarray(own - others if targeted else others - own, dtype=np.float32)
