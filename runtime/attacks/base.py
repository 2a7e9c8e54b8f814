"""The one gradient loop every attack shares, and the result it returns.

Each step, for images ``x0`` ``[N, H, W, 3]`` (0..255) and perturbation ``delta``::

    g      = ensemble gradient at x0 + Q(delta)     (DI / EOT inside; signed so ascent attacks)
    g      = TI(g)                                  (optional smoothing)
    v      = mu * v + g / mean|g|                   (momentum; mu = 0 is plain steepest ascent)
    delta  = delta + alpha * mask * direction(mask * v)
    delta  = constrain(delta)                       (L2 ball, L-inf box eps * mask, pixel range,
                                                     SSIM floor, visibility cap)

``Q`` rounds to the integer pixel values a saved file holds when ``quantize=True`` (the latent ``delta``
stays real-valued, so steps smaller than one grey level still accumulate), else it is the identity.
With an ``input_map`` ``A`` the victims see ``A (x0 + Q(delta))`` and ``g`` comes back through ``A^T``
(see :mod:`.ensemble`), so ``delta`` can live in a whole photo's pixel grid while the models see crops.
With ``luminance_only`` the gradient is averaged over R, G, B, so every channel takes the same step.
With ``chroma`` < 1 the step and the budget are split into a luminance part (the same change on R, G
and B) and a chroma part (what remains, summing to 0 over the channels), and the chroma part gets
``chroma`` times the luminance part's step and L-inf bound: people see colour changes on skin long
before they see the same change in brightness (``0``: luminance only).
Subclasses choose only ``direction`` (the norm's steepest-ascent direction), the random start and the
default step size, as in foolbox's ``gradient_descent_base``. The step size along the run is
:mod:`.schedule`'s, the grids a step lives on :mod:`.basis`'s, and the victims a step spends its
gradient on :mod:`.sampling`'s; the feasible set is :class:`_Budget`.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from uncnn_rt.runtime import image_ops
from uncnn_rt.runtime.arrays import BoolArray, Float32Array
from uncnn_rt.runtime.attacks.basis import coarse_basis, step_direction
from uncnn_rt.runtime.attacks.boosters import EOT, InputDiversity, TranslationInvariance
from uncnn_rt.runtime.attacks.criteria import Criterion, ModelState, default_criterion
from uncnn_rt.runtime.attacks.ensemble import Ensemble, Victim, unit_mean_magnitude
from uncnn_rt.runtime.attacks.linear import LinearMap, Smooth
from uncnn_rt.runtime.attacks.sampling import VictimFocus
from uncnn_rt.runtime.attacks.schedule import SCHEDULES, step_rate
from uncnn_rt.runtime.errors import InputError

# The SSIM floor's search for the largest kept share ``c`` of delta stops once a feasible share is
# within 1% of the infeasible one above it, or leaves less than 1% of ``1 - floor`` unused; each guess
# aims 0.5% short of the fitted root, so that it usually lands feasible; at most 14 guesses.
_SSIM_TOLERANCE = 0.01
_SSIM_AIM = 0.005
_SSIM_GUESSES = 14

_SsimFunction = Callable[[Float32Array, NDArray[np.intp]], NDArray[np.float64]]
"""SSIM of ``x0[idx] + s`` to ``x0[idx]`` per image, from the shown perturbation ``s`` and ``idx``."""


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns for a batch of ``N`` images ``[N, H, W, 3]``.

    Attributes:
        images: the adversarial images, float32 in 0..255 (integer-valued when the attack quantised).
        originals: the clean images, float32.
        history: per victim, ``[steps_run, N]``: the objective at each step's iterate, as the optimiser saw
            it (the mean over EOT samples and DI transforms when those are on).
        objective: per victim, ``[N]``: the final objective on ``images`` exactly (cosine similarity to
            the reference for face models, log-probability of the reference class for classifiers).
        features: per victim, ``[N, D]``: the final features on ``images``.
        success: per victim, ``[N]``: the contract's success (see :func:`.criteria.default_criterion`) on
            ``images``; a face model without a match threshold has no entry.
        steps: ``[N]``: the updates each image received (fewer than ``steps`` when it stopped early).
    """

    images: Float32Array
    originals: Float32Array
    history: dict[str, Float32Array]
    objective: dict[str, Float32Array]
    features: dict[str, Float32Array]
    success: dict[str, BoolArray]
    steps: NDArray[np.int64]

    @property
    def perturbation(self) -> Float32Array:
        return np.asarray(self.images - self.originals, dtype=np.float32)

    @property
    def succeeded(self) -> BoolArray:
        """``[N]``: success on every victim that reports one."""
        n = self.images.shape[0]
        return np.asarray(np.logical_and.reduce([*self.success.values(), np.ones(n, bool)]), dtype=bool)

    def to_uint8(self) -> NDArray[np.uint8]:
        """The images as a file stores them (exactly ``images`` when the attack quantised)."""
        return image_ops.to_uint8(self.images)


@dataclass(frozen=True, kw_only=True)
class GradientAttack(ABC):
    """The shared iterative gradient attack; see the module docstring for the update.

    Args:
        eps: L-inf budget per pixel and channel, in 0..255 units (scaled per pixel by the mask).
        steps: iterations.
        step_size: ``alpha`` in 0..255 units (L2 units for :class:`L2PGD`); ``None``: the attack's default.
        random_start: start from a random point of the budget instead of the clean image. Untargeted
            attacks whose reference is the image's own embedding need it: there the cosine objective is
            at its maximum and its gradient vanishes, so a step from the clean image has no direction.
        momentum: decay ``mu`` of the accumulated, L1-normalised gradient (MI-FGSM); 0 disables it.
        l2: optional L2 budget per image, in 0..255 units.
        ssim_min: optional lower bound on each image's SSIM to its original, enforced after every
            step by shrinking the perturbation towards 0 (bisection on a scale factor).
        diversity: DI, :class:`~.boosters.InputDiversity`.
        smoothing: TI, :class:`~.boosters.TranslationInvariance`.
        eot: EOT over non-differentiable transforms, :class:`~.boosters.EOT`.
        check_every: test ``stop_when`` after every this many steps. A test costs a forward pass of
            every victim unless the step's gradient pass saw the untransformed images (no DI or EOT
            draw), in which case it is free and made every step.
        ssim_every: enforce the SSIM floor after every this many steps; the returned images always
            meet it. Each check costs an SSIM of the images (more when it has to shrink the step).
        success_margin: weight each victim's (normalised) gradient by how far it is from its success
            criterion with this margin (:func:`~.criteria.default_criterion`), relative to the farthest
            victim of the image, as the squared hinge loss ``sum_m max(0, s_m - t_m + margin)^2`` of
            similarities ``s_m`` and thresholds ``t_m`` does: the step goes to the models still short of
            success, mostly to the farthest, and a victim met on every image is not run at all. The
            distances are read at each stop check (every ``check_every`` steps, on the exact images);
            before the first, every victim weighs 1. ``None``: every victim, every step, equally.
        victims_per_step: run only this many victims per step, drawn without replacement with
            probabilities proportional to their weights (their focus shares, else equal); the momentum
            sums their normalised gradients over the steps, so each step costs a fraction of the
            ensemble's and every victim still steers the perturbation ("stochastic ensemble").
            ``None``: all of them.
        met_share: the share a victim keeps once it meets ``success_margin`` (0: it is no longer run;
            :func:`~.sampling.shares`), so the models already past it keep steering the change.
        coarse: take each step on a grid this many times coarser than the images' own, bilinearly
            upsampled (``B``; the step is ``B direction(B^T mask v)``), so the perturbation is smooth
            over about ``coarse`` pixels. Smooth changes move local means rather than local contrast
            and structure, so they cost far less SSIM per grey level (Guo et al., "Low Frequency
            Adversarial Perturbation", UAI 2019, also find they transfer better). 1: per pixel.
        scales: more grid steps (factors of ``coarse``'s kind) whose steps are averaged with ``coarse``'s:
            ``step = mean_g B_g direction(B_g^T mask v)`` over the grids ``(coarse, *scales)``, a
            multi-scale basis. Empty: ``coarse`` alone.
        schedule: ``constant`` step size, or ``cosine``: ``alpha_t = alpha (f + (1 - f) (1 + cos(pi t /
            steps)) / 2)`` with ``f`` = ``schedule_floor`` (large steps first, smaller ones at the end).
        schedule_floor: the share of ``alpha`` the cosine schedule ends at (0: it ends at 0).
        chroma: the chroma part's share of the luminance part's step and L-inf bound (module
            docstring); 1 (the default) takes one step on R, G and B as they are.
        cap: a visibility cap (:class:`VisibilityCap`), held like the SSIM floor by shrinking each
            image's perturbation towards 0, after every ``cap_every`` steps and exactly at the end.
        cap_every: steps between holds of ``cap``.
        cap_start: the share of ``cap`` the first steps may spend, rising linearly to the whole cap by
            ``cap_rise`` of the steps: a minimum-visibility schedule (the budget grows only while an
            image is short of ``stop_when``; an image that stops early keeps the small change that
            sufficed, where a fixed cap lets every step spend all of it). 1: the whole cap from the start.
        cap_rise: the share of the steps after which the whole cap is allowed.
        blur: the perturbation's basis: a Gaussian of this standard deviation in pixels (one per image,
            or one for all), ``step = G direction(G mask v)`` (:class:`~.linear.Smooth`), so the steps
            are smooth at that scale whatever ``direction`` does; None: the pixel grid (or ``coarse``).
    """

    eps: float = 8.0
    steps: int = 10
    step_size: float | None = None
    random_start: bool = False
    momentum: float = 0.0
    l2: float | None = None
    ssim_min: float | None = None
    diversity: InputDiversity | None = None
    smoothing: TranslationInvariance | None = None
    eot: EOT | None = None
    check_every: int = 1
    ssim_every: int = 1
    success_margin: float | None = None
    victims_per_step: int | None = None
    met_share: float = 0.0
    coarse: float = 1.0
    scales: tuple[float, ...] = ()
    schedule: str = "constant"
    schedule_floor: float = 0.0
    chroma: float = 1.0
    cap: VisibilityCap | None = None
    cap_every: int = 4
    cap_start: float = 1.0
    cap_rise: float = 0.75
    blur: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not self.eps >= 0:
            raise InputError(f"{name}: eps must be >= 0 (0..255 units), got {self.eps}")
        if self.steps < 1:
            raise InputError(f"{name}: steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not (0 <= self.step_size < math.inf):
            raise InputError(f"{name}: step_size must be finite and >= 0, got {self.step_size}")
        if not self.momentum >= 0:
            raise InputError(f"{name}: momentum must be >= 0, got {self.momentum}")
        if self.l2 is not None and not self.l2 >= 0:
            raise InputError(f"{name}: l2 must be >= 0, got {self.l2}")
        if self.ssim_min is not None and not -1.0 <= self.ssim_min <= 1.0:
            raise InputError(f"{name}: ssim_min must be in [-1, 1], got {self.ssim_min}")
        if not 0.0 <= self.met_share <= 1.0:
            raise InputError(f"{name}: met_share must be in [0, 1], got {self.met_share}")
        if self.victims_per_step is not None and self.victims_per_step < 1:
            raise InputError(f"{name}: victims_per_step must be >= 1, got {self.victims_per_step}")
        if not all(1.0 <= c < math.inf for c in (self.coarse, *self.scales)):
            raise InputError(
                f"{name}: coarse and scales must be finite factors >= 1, got {self.coarse}, {self.scales}"
            )
        if self.schedule not in SCHEDULES:
            raise InputError(f"{name}: schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.schedule_floor <= 1.0:
            raise InputError(f"{name}: schedule_floor must be in [0, 1], got {self.schedule_floor}")
        if not 0.0 <= self.chroma <= 1.0:
            raise InputError(f"{name}: chroma must be in [0, 1], got {self.chroma}")
        if self.cap_every < 1:
            raise InputError(f"{name}: cap_every must be >= 1, got {self.cap_every}")
        if not (0.0 < self.cap_start <= 1.0 and 0.0 < self.cap_rise <= 1.0):
            raise InputError(
                f"{name}: cap_start and cap_rise must be in (0, 1], got {self.cap_start}, {self.cap_rise}"
            )
        if self.blur is not None and self.coarse > 1.0:
            raise InputError(f"{name}: blur and coarse are two bases; give one of them")
        if self.check_every < 1 or self.ssim_every < 1:
            raise InputError(
                f"{name}: check_every and ssim_every must be >= 1, got {self.check_every}, {self.ssim_every}"
            )
        if not math.isfinite(self.alpha):
            raise InputError(f"{name}: with eps={self.eps} and l2={self.l2}, give a finite step_size")

    @property
    def alpha(self) -> float:
        """The step size in use."""
        return self.default_step_size() if self.step_size is None else self.step_size

    @abstractmethod
    def default_step_size(self) -> float: ...

    @abstractmethod
    def direction(self, velocity: Float32Array) -> Float32Array:
        """The unit steepest-ascent direction of ``velocity`` ``[N, H, W, 3]`` under the attack's norm."""

    @abstractmethod
    def random_delta(
        self, shape: tuple[int, ...], bound: Float32Array, rng: np.random.Generator
    ) -> Float32Array:
        """A random start inside the budget (``bound``: the per-pixel L-inf budget, eps * mask)."""

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
        """Attack ``images`` against ``victims``.

        Args:
            images: ``[N, H, W, 3]``, RGB, 0..255 (uint8 or float). Each victim sees them resized to its
                canonical size.
            victims: the models, each with ``[N, D]`` references (see :class:`~.ensemble.Victim`).
            targeted: ascend the objective (move towards the references) instead of descending it.
            mask: values in [0, 1], ``[H, W]``, ``[N, H, W]``, ``[H, W, C]`` or ``[N, H, W, C]`` (C = 1 or 3):
                scales both the step and the per-pixel L-inf budget, so the perturbation is 0 where it is 0.
            quantize: evaluate and return integer pixel values, as the saved file holds (``images`` must
                be integer-valued).
            stop_when: freeze each image once it meets this criterion; stop when all have.
            seed: seed or generator of every random draw (random start, DI, EOT); equal seeds give equal
                results.
            input_map: a linear map the victims see the images through (``A``, e.g. the crop warp of a
                face, from a photo region to the canonical crop); the gradient returns through ``A^T``.
                Budgets, mask and quantisation stay in the images' own grid.
            luminance_only: take the same step on R, G and B (the channel-mean of the gradient), and
                draw the random start once per pixel, so a grey image stays grey.
            on_step: called with the number of steps done after each step (progress reporting).
            init: start from this perturbation ``[N, H, W, 3]`` (e.g. an earlier run's), projected onto
                the budget, instead of 0 or a random start.
        """
        x0 = _check_images(images)
        n, h, w, _ = x0.shape
        weights = _check_mask(mask, x0.shape)
        if quantize and not np.array_equal(x0, np.rint(x0)):
            raise InputError("quantize=True needs integer-valued images (the decoded 8-bit photo)")
        if self.ssim_min is not None and min(h, w) < 11:
            raise InputError(f"an SSIM floor needs images of at least 11x11, got {h}x{w}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        view_size = (h, w) if input_map is None else _mapped_size(input_map, x0)
        ensemble = Ensemble(victims, n, view_size, targeted=targeted, input_map=input_map)
        bound = _per_pixel_bound(self.eps, weights, x0.shape)
        chroma = 0.0 if luminance_only else self.chroma
        cap = None if self.cap is None else self.cap.bind(x0)
        budget = _Budget(x0, bound, self.l2, self.ssim_min, quantize, chroma=chroma, cap=cap)
        budget.level[:] = self.cap_start
        focus = VictimFocus(
            ensemble,
            per_step=self.victims_per_step,
            margin=self.success_margin,
            targeted=targeted,
            met=self.met_share,
        )
        bases: list[LinearMap | None] = (
            [coarse_basis(c, (h, w)) for c in (self.coarse, *self.scales)]
            if self.blur is None
            else [Smooth(self.blur)]
        )
        alpha = np.float32(self.alpha)
        checks = stop_when is not None or self.success_margin is not None
        # Checks fall on the steps whose iterate the SSIM floor has just held when ssim_every divides
        # check_every, so an early stop never stops on an image the floor would shrink.
        check_first = self.check_every == 1 or self.random_start or init is not None

        delta = budget.constrain(self._start(x0, bound, init, rng, luminance_only))
        velocity = np.zeros_like(x0)
        active = np.ones(n, dtype=bool)
        steps = np.zeros(n, dtype=np.int64)
        history: dict[str, list[Float32Array]] = {key: [] for key in ensemble.keys}
        for done in range(self.steps):
            adv = budget.image(delta)
            gradient = ensemble.gradient(
                adv, rng, diversity=self.diversity, eot=self.eot, shares=focus.draw(rng)
            )
            for key, objective in gradient.objective.items():
                history[key].append(objective)
            states = gradient.states if checks else None
            if checks and states is None and done % self.check_every == 0 and (done > 0 or check_first):
                states = ensemble.evaluate(adv)
            if states is not None:
                focus.update(states)
                if stop_when is not None:
                    active &= ~stop_when(states)
                    if not active.any():
                        break
            velocity = np.float32(self.momentum) * velocity + unit_mean_magnitude(
                self._smoothed(gradient.grad, luminance_only)
            )
            rate = step_rate(alpha, self.schedule, self.schedule_floor, done, self.steps)
            step = rate * weights * step_direction(self.direction, weights * velocity, bases, chroma)
            delta = budget.constrain(
                np.where(active[:, None, None, None], delta + step, delta),
                ssim=(done + 1) % self.ssim_every == 0,
                cap=(done + 1) % self.cap_every == 0,
            )
            steps += active
            if self.cap_start < 1.0:
                rise = min(1.0, (done + 1) / max(self.cap_rise * self.steps, 1.0))
                budget.level[active] = self.cap_start + (1.0 - self.cap_start) * rise
            if on_step is not None:
                on_step(done + 1)

        delta = budget.constrain(delta, ssim=self.ssim_every > 1, exact=True)
        final = budget.image(delta)
        if cap is not None:
            cap.checked(final)
        states = ensemble.evaluate(final)
        return AttackResult(
            images=final,
            originals=x0,
            history={
                key: np.stack(rows) if rows else np.zeros((0, n), np.float32) for key, rows in history.items()
            },
            objective={key: s.objective for key, s in states.items()},
            features={key: s.features for key, s in states.items()},
            success=_success(states, targeted=targeted),
            steps=steps,
        )

    def _start(
        self,
        x0: Float32Array,
        bound: Float32Array,
        init: ArrayLike | None,
        rng: np.random.Generator,
        luminance_only: bool,
    ) -> Float32Array:
        """The first perturbation: ``init``, a random start inside the budget, or 0 (the same on R, G
        and B with ``luminance_only``)."""
        if init is not None:
            delta = np.ascontiguousarray(init, dtype=np.float32)
            if delta.shape != x0.shape:
                raise InputError(f"init must have shape {list(x0.shape)}, got {list(delta.shape)}")
        elif self.random_start:
            delta = self.random_delta(x0.shape, bound, rng)
        else:
            delta = np.zeros_like(x0)
        if luminance_only:
            delta = np.ascontiguousarray(np.broadcast_to(delta[..., :1], x0.shape))
        return delta

    def _smoothed(self, grad: Float32Array, luminance_only: bool) -> Float32Array:
        """The gradient after translation-invariant smoothing, and averaged over R, G, B with
        ``luminance_only``."""
        if self.smoothing is not None:
            grad = self.smoothing(grad)
        if luminance_only:
            grad = np.ascontiguousarray(np.broadcast_to(grad.mean(axis=3, keepdims=True), grad.shape))
        return grad


class VisibilityCap(ABC):
    """A cap on how visible each image's perturbation is: a score that grows with the perturbation's
    size, at most 1 where the cap holds (e.g. FLIP over its limit). :meth:`bind` makes the cap of one
    batch of clean images; the attack then holds it by shrinking perturbations towards 0."""

    exponent: float = 1.0
    """The score's assumed growth ``score(c delta) ~ c^exponent`` for the search's first guess."""
    margin: float = 0.02
    """What ``fast`` holds short of 1, so that the exact check at the end rarely has to shrink."""

    @abstractmethod
    def bind(self, x0: Float32Array) -> BoundCap:
        """The cap of the clean images ``x0`` ``[N, H, W, 3]``."""


class BoundCap(ABC):
    """A :class:`VisibilityCap` bound to clean images: scores of shown images."""

    exponent: float = 1.0
    margin: float = 0.02

    @abstractmethod
    def fast(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        """``[len(idx)]`` scores of the shown images ``x0[idx] + s`` (the in-loop check)."""

    def exact(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        """``[len(idx)]``: the score the result must meet (default: :meth:`fast`)."""
        return self.fast(images, idx)

    def checked(self, images: Float32Array) -> None:  # noqa: B027 - an optional hook, no-op by default
        """Called with the attack's final images (a place to keep the figures of the result)."""


@dataclass(frozen=True)
class PerImageCap(VisibilityCap):
    """One cap per image of the batch (None: that image has none), e.g. each face of a group photo
    against its own JPEG re-encode. Each image's cap binds to, and scores, that image alone."""

    caps: tuple[VisibilityCap | None, ...]

    def __post_init__(self) -> None:
        live = [c for c in self.caps if c is not None]
        object.__setattr__(self, "exponent", max((c.exponent for c in live), default=1.0))
        object.__setattr__(self, "margin", max((c.margin for c in live), default=0.02))

    def bind(self, x0: Float32Array) -> BoundCap:
        if x0.shape[0] != len(self.caps):
            raise InputError(f"PerImageCap has {len(self.caps)} caps for a batch of {x0.shape[0]} images")
        return _BoundPerImage(
            [None if c is None else c.bind(x0[k : k + 1]) for k, c in enumerate(self.caps)],
            self.exponent,
            self.margin,
        )


class _BoundPerImage(BoundCap):
    def __init__(self, bound: list[BoundCap | None], exponent: float, margin: float) -> None:
        self.bound, self.exponent, self.margin = bound, exponent, margin
        self._zero = np.zeros(1, dtype=np.intp)

    def _scores(self, images: Float32Array, idx: NDArray[np.intp], exact: bool) -> NDArray[np.float64]:
        out = np.zeros(len(idx))
        for k, i in enumerate(idx):
            cap = self.bound[int(i)]
            if cap is not None:
                score = cap.exact if exact else cap.fast
                out[k] = score(images[k : k + 1], self._zero)[0]
        return out

    def fast(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        return self._scores(images, idx, exact=False)

    def exact(self, images: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        return self._scores(images, idx, exact=True)

    def checked(self, images: Float32Array) -> None:
        for k, cap in enumerate(self.bound):
            if cap is not None:
                cap.checked(images[k : k + 1])


class _Budget:
    """The feasible set: L2 ball, per-pixel L-inf box (luminance and chroma apart when ``chroma`` < 1),
    pixel range [0, 255], SSIM floor, visibility cap, quantisation."""

    def __init__(
        self,
        x0: Float32Array,
        bound: Float32Array,
        l2: float | None,
        ssim_min: float | None,
        quantize: bool,
        *,
        chroma: float = 1.0,
        cap: BoundCap | None = None,
    ) -> None:
        self.x0, self.bound, self.l2, self.ssim_min, self.quantize = x0, bound, l2, ssim_min, quantize
        self.chroma, self.cap = chroma, cap
        self._integer_bound = np.floor(bound).astype(np.float32)
        if chroma < 1.0:
            # The grey step's range: within the luminance bound, and keeping every channel in the pixel
            # range, so that it stays grey at the ends of the range.
            self._grey_top = bound.max(axis=3, keepdims=True)
            low = np.maximum(-self._grey_top, -x0.min(axis=3, keepdims=True))
            high = np.minimum(self._grey_top, 255.0 - x0.max(axis=3, keepdims=True))
            self._grey_range = (low, np.maximum(high, low))
        self._ssim = None if ssim_min is None else _SsimTo(x0)
        self.level = np.ones(x0.shape[0])
        """Per image, the share of the visibility cap the loop's holds allow (``cap_start``); the
        attack's result is held to the whole cap."""

    def project(self, delta: Float32Array) -> Float32Array:
        """Onto the L2 ball, then the L-inf box, then the pixel range.

        Each stage only moves coordinates towards 0, so the result stays inside the earlier stages' sets.
        """
        if self.l2 is not None:
            norms = np.sqrt(np.square(delta, dtype=np.float64).sum(axis=(1, 2, 3), keepdims=True))
            delta = delta * np.minimum(1.0, self.l2 / np.maximum(norms, 1e-12)).astype(np.float32)
        if self.chroma >= 1.0:
            delta = np.clip(delta, -self.bound, self.bound)
        else:
            # The luminance part (one grey step on R, G and B) within the box, the chroma part (zero
            # channel mean) scaled per pixel into ``chroma`` times it, so that it keeps a zero mean.
            luminance = delta.mean(axis=3, keepdims=True)
            low, high = self._grey_range
            grey = np.clip(luminance, low, high)
            if self.chroma > 0.0:
                colour = delta - luminance
                largest = np.abs(colour).max(axis=3, keepdims=True)
                limit = np.float32(self.chroma) * self._grey_top
                colour *= np.minimum(np.float32(1.0), limit / np.maximum(largest, np.float32(1e-12)))
                delta = grey + colour
            else:
                delta = np.ascontiguousarray(np.broadcast_to(grey, delta.shape))
        return np.asarray(np.clip(self.x0 + delta, 0.0, 255.0) - self.x0, dtype=np.float32)

    def shown(self, delta: Float32Array) -> Float32Array:
        """``Q(delta)``: the perturbation the model sees and the file stores."""
        return _quantize(delta, self._integer_bound, self.l2) if self.quantize else delta

    def image(self, delta: Float32Array) -> Float32Array:
        """``x0 + Q(delta)``, clipped against float rounding at the ends of the pixel range."""
        return np.asarray(np.clip(self.x0 + self.shown(delta), 0.0, 255.0), dtype=np.float32)

    def constrain(
        self, delta: Float32Array, *, ssim: bool = True, cap: bool = True, exact: bool = False
    ) -> Float32Array:
        """Project ``delta`` onto the budget. The SSIM floor is held with the float32 evaluation and a
        margin of :attr:`_SsimTo.FAST_MARGIN`, the visibility cap with its fast score and its margin;
        ``exact`` then checks the float64 SSIM and the cap's exact score as well (the attack's result, so
        what it returns meets the floor exactly as :func:`image_ops.ssim` measures, and the cap)."""
        delta = self.project(delta)
        if (ssim or exact) and self._ssim is not None and self.ssim_min is not None:
            fast_ssim, exact_ssim = self._ssim.fast, self._ssim.exact
            delta = self._hold(
                delta, lambda s, i: 1.0 - fast_ssim(s, i), 1.0 - self.ssim_min - _SsimTo.FAST_MARGIN, 2.0
            )
            if exact:
                delta = self._hold(delta, lambda s, i: 1.0 - exact_ssim(s, i), 1.0 - self.ssim_min, 2.0)
        if (cap or exact) and self.cap is not None:
            bound_cap = self.cap

            level = np.ones_like(self.level) if exact else self.level

            def fast_cap(s: Float32Array, i: NDArray[np.intp]) -> NDArray[np.float64]:
                return bound_cap.fast(self.x0[i] + s, i) / level[i]

            target = 1.0 - bound_cap.margin
            if not exact:
                # Inside the loop one evaluation and one power-law step: the next hold corrects what
                # this one misses, and the result gets the full search below.
                return self._shrink_once(delta, fast_cap, target, bound_cap.exponent)
            delta = self._hold(delta, fast_cap, target, bound_cap.exponent)
            if exact:
                delta = self._hold(
                    delta, lambda s, i: bound_cap.exact(self.x0[i] + s, i), 1.0, bound_cap.exponent
                )
        return delta

    def _shrink_once(
        self,
        delta: Float32Array,
        error: Callable[[Float32Array, NDArray[np.intp]], NDArray[np.float64]],
        target: float,
        exponent: float,
    ) -> Float32Array:
        """Scale each image whose error exceeds ``target`` by the power law's guess ``(target / e)^(1/p)``."""
        errors = error(self.shown(delta), np.arange(delta.shape[0]))
        over = errors > target
        if not over.any():
            return delta
        scale = np.where(over, (target / np.maximum(errors, 1e-12)) ** (1.0 / exponent), 1.0)
        return np.asarray(delta * scale.astype(np.float32)[:, None, None, None], dtype=np.float32)

    def _hold(
        self,
        delta: Float32Array,
        error: Callable[[Float32Array, NDArray[np.intp]], NDArray[np.float64]],
        target: float,
        exponent: float,
    ) -> Float32Array:
        """Scale each image's delta by the largest ``c`` in [0, 1] (to about 1%) whose error is at most
        ``target``: ``1 - SSIM`` for the SSIM floor, a visibility cap's score for the cap.

        ``error(s, idx)`` takes the shown perturbations ``s`` of images ``idx`` and grows with their
        size from 0 at ``s = 0``. Shrinking towards 0 keeps every constraint above (all are convex sets
        containing 0), and ``c = 0`` is always feasible, so the hold is exact on the shown (quantised)
        image.

        The search fits ``e(c)`` by a power law ``a c^p`` through the two shares that bracket the answer
        (at first, 0 and 1 with ``p = exponent``: 2 for SSIM, which is at its maximum at ``c = 0``) and
        tries its root, bisecting instead when the same end of the bracket moved twice in a row.
        Quantisation makes ``e`` a staircase, so the fit is only good to a few percent; still, on the
        holds of real cloaks this takes 5 SSIM evaluations on average (8 at most), where a +-3% bracket
        around the quadratic guess missed most of the time and cost 13 (``bench/RESULTS.md``, "SSIM
        floor").
        """
        errors = error(self.shown(delta), np.arange(delta.shape[0]))
        idx = np.flatnonzero(errors > target)
        if idx.size == 0:
            return delta
        d, bound = delta[idx], self._integer_bound[idx]
        lo, hi = np.zeros(idx.size), np.ones(idx.size)
        e_lo, e_hi = np.zeros(idx.size), np.maximum(errors[idx], 1e-12)
        e_one = e_hi.copy()
        last = np.zeros(idx.size, np.int8)  # the end that moved last: -1 lo, +1 hi
        repeat = np.zeros(idx.size, bool)  # it moved twice in a row
        live = np.arange(idx.size)
        c = (target / e_one) ** (1.0 / exponent)
        for _ in range(_SSIM_GUESSES):
            shown = (c[live, None, None, None] * d[live]).astype(np.float32)
            if self.quantize:
                shown = _quantize(shown, bound[live], self.l2)
            e = error(shown, idx[live])
            side = np.where(e <= target, -1, 1).astype(np.int8)
            repeat[live] = side == last[live]
            last[live] = side
            below, above = live[side < 0], live[side > 0]
            lo[below], e_lo[below] = c[below], e[side < 0]
            hi[above], e_hi[above] = c[above], np.maximum(e[side > 0], 1e-12)
            done = (hi - lo <= _SSIM_TOLERANCE * hi) | (
                (lo > 0) & (target - e_lo <= _SSIM_TOLERANCE * target)
            )
            live = np.flatnonzero(~done)
            if live.size == 0:
                break
            c = _next_share(lo, hi, e_lo, e_hi, e_one, target, repeat, exponent)
        out = delta.copy()
        out[idx] = (lo[:, None, None, None] * d).astype(np.float32)
        return np.asarray(out, dtype=np.float32)


class _SsimTo:
    """SSIM of ``x0 + s`` against fixed references ``x0``, as a function of the shown perturbation ``s``.

    The references' local means and variances are computed once (in float64, kept as float32: on a
    12-megapixel face region each float64 copy would cost about 80 MB). An evaluation then needs
    only the local statistics of ``s``: with ``y = x0 + s``, ``mu_y = mu_x + mu_s``,
    ``var_y = var_x + 2 cov(x, s) + var_s`` and ``cov(x, y) = var_x + cov(x, s)``. Those are small
    numbers (``|s| <= eps``; ``x`` is centred on its mean, which no covariance sees), so they are
    computed in float32, about four times faster than float64, within about 1e-8 of the float64 value per
    image (``fast``). :meth:`exact` is the float64 formula of :func:`image_ops.ssim`.
    """

    FAST_MARGIN = 1e-6
    """What ``fast`` must clear the floor by; the attack's result is checked with :meth:`exact`."""

    def __init__(self, x0: Float32Array) -> None:
        self.x0 = np.asarray(x0, dtype=np.float32)
        self.kernel = image_ops.gaussian_kernel1d(image_ops.SSIM_SIGMA)
        x = self.x0.astype(np.float64)
        mx = image_ops.filter_valid(x, self.kernel)
        self.vx32 = (image_ops.filter_valid(x * x, self.kernel) - mx * mx).astype(np.float32)
        centre = x.mean(axis=(1, 2, 3), keepdims=True)
        self.xc32 = (x - centre).astype(np.float32)
        self.mxc32 = (mx - centre).astype(np.float32)
        self.mx32 = mx.astype(np.float32)

    def fast(self, s: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        """``[len(idx)]`` SSIM of ``x0[idx]`` and ``x0[idx] + s`` (float32 local statistics).

        Large images are cut into bands of output rows (each reads its rows plus the window's 10 below)
        computed on :func:`_row_pool`'s threads: numpy releases the GIL inside each operation, so on 2
        cores a 400 x 400 region evaluates in about 0.55x the single-thread time (a 300 x 290 one in
        0.85x). The bands' sums add up in a fixed order, so the result does not depend on timing.
        """
        s = np.asarray(s, dtype=np.float32)
        rows, taps = self.mx32.shape[1], self.kernel.shape[0]
        bands = _bands(rows, s[0].size * len(idx))

        def band(lo: int, hi: int) -> NDArray[np.float64]:
            k, piece = self.kernel, s[:, lo : hi + taps - 1]
            mx, vx = self.mx32[idx, lo:hi], self.vx32[idx, lo:hi]
            ms = image_ops.filter_valid(piece, k)
            vs = image_ops.filter_valid(piece * piece, k) - ms * ms
            xc = self.xc32[idx, lo : hi + taps - 1]
            cxs = image_ops.filter_valid(xc * piece, k) - self.mxc32[idx, lo:hi] * ms
            return self._index_sum(mx, vx, ms, vs, cxs)

        if len(bands) == 1:
            total = band(0, rows)
        else:
            total = np.sum(list(_row_pool().map(lambda b: band(*b), bands)), axis=0)
        return np.asarray(total / self.mx32[0].size, dtype=np.float64)

    def exact(self, s: Float32Array, idx: NDArray[np.intp]) -> NDArray[np.float64]:
        """``[len(idx)]``: :func:`image_ops.ssim` of ``x0[idx]`` and ``x0[idx] + s`` (float64)."""
        x = self.x0[idx].astype(np.float64)
        return image_ops.ssim(x, x + np.asarray(s, dtype=np.float64))

    @staticmethod
    def _index_sum(
        mx: NDArray[np.floating],
        vx: NDArray[np.floating],
        ms: NDArray[np.floating],
        vs: NDArray[np.floating],
        cxs: NDArray[np.floating],
    ) -> NDArray[np.float64]:
        c1 = (image_ops.SSIM_K1 * image_ops.DATA_RANGE) ** 2
        c2 = (image_ops.SSIM_K2 * image_ops.DATA_RANGE) ** 2
        my = mx + ms
        luminance = (2 * mx * my + c1) / (mx * mx + my * my + c1)
        structure = (2 * (vx + cxs) + c2) / (2 * vx + 2 * cxs + vs + c2)
        return np.asarray((luminance * structure).sum(axis=(1, 2, 3), dtype=np.float64), dtype=np.float64)


_BAND_ELEMENTS = 200_000
"""Values per image batch below which an SSIM evaluation runs on the calling thread alone."""


def _bands(rows: int, elements: int) -> list[tuple[int, int]]:
    """Row bands ``[lo, hi)`` that split ``rows`` output rows among the row pool's threads."""
    parts = min(_row_workers(), rows) if elements >= _BAND_ELEMENTS else 1
    edges = np.linspace(0, rows, parts + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]


def _row_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _row_pool() -> ThreadPoolExecutor:
    """Threads shared by every attack's SSIM evaluations, created on first use."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=_row_workers(), thread_name_prefix="uncnn-ssim"))
        return _POOL[0]


def _forget_pool() -> None:
    """In a child made by ``fork``: the inherited pool has no threads behind it (and its lock may have
    been held by a thread that did not come along), so the child starts afresh."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOL.clear()


os.register_at_fork(after_in_child=_forget_pool)


def _next_share(
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    e_lo: NDArray[np.float64],
    e_hi: NDArray[np.float64],
    e_one: NDArray[np.float64],
    target: float,
    repeat: BoolArray,
    exponent: float = 2.0,
) -> NDArray[np.float64]:
    """The SSIM search's next share per image: the root of the power law through the bracket's ends
    (through ``hi`` and 1 while no feasible share is known), 0.5% short; the midpoint when the same end
    moved twice or the root falls outside the bracket."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        known = lo > 0
        p_in = np.log(e_hi / np.maximum(e_lo, 1e-12)) / np.log(hi / np.where(known, lo, 1.0))
        p_top = np.where(hi < 1, np.log(e_one / e_hi) / np.log(1.0 / hi), exponent)
        p = np.where(known, p_in, np.clip(p_top, 0.5, 3.0))
        anchor, e_anchor = np.where(known, lo, hi), np.where(known, e_lo, e_hi)
        root = anchor * (target / e_anchor) ** (1.0 / p) * (1.0 - _SSIM_AIM)
    usable = np.isfinite(root) & (root > lo) & (root < hi) & ~(repeat & known)
    return np.where(usable, root, (lo + hi) / 2)


def _quantize(delta: Float32Array, integer_bound: Float32Array, l2: float | None) -> Float32Array:
    """Round to integers. With integral ``x0`` and integer bounds, rounding keeps the L-inf box and the
    pixel range; where rounding away from 0 breaks the L2 ball, truncation towards 0 cannot."""
    q = np.clip(np.rint(delta), -integer_bound, integer_bound)
    if l2 is not None:
        over = np.sqrt(np.square(q, dtype=np.float64).sum(axis=(1, 2, 3))) > l2
        q[over] = np.clip(np.trunc(delta[over]), -integer_bound[over], integer_bound[over])
    return np.asarray(q, dtype=np.float32)


def _mapped_size(input_map: LinearMap, x0: Float32Array) -> tuple[int, int]:
    """``H x W`` of what ``input_map`` makes of the images (one probe forward, once per attack call: a
    map may treat each image differently, :class:`~.linear.PerImage`)."""
    probe = input_map.forward(x0)
    if probe.ndim != 4 or probe.shape[0] != x0.shape[0] or probe.shape[3] != x0.shape[3]:
        raise InputError(
            f"input_map must map [N, H, W, C] to [N, h, w, C], got {list(x0.shape)} -> {list(probe.shape)}"
        )
    return int(probe.shape[1]), int(probe.shape[2])


def _per_pixel_bound(eps: float, weights: Float32Array, shape: tuple[int, ...]) -> Float32Array:
    """``eps * mask`` per pixel and channel, exactly 0 where the mask is 0 (also for ``eps = inf``)."""
    scaled = np.where(weights > 0, weights, np.float32(1.0)) * np.float32(eps)
    return np.broadcast_to(np.where(weights > 0, scaled, np.float32(0.0)), shape).astype(np.float32)


def _check_images(images: ArrayLike) -> Float32Array:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[3] != 3:
        raise InputError(f"images must be RGB [N, H, W, 3], got shape {list(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 255.0):
        raise InputError(f"images must be finite and in 0..255, got range [{x.min()}, {x.max()}]")
    return x


def _check_mask(mask: ArrayLike | None, shape: tuple[int, ...]) -> Float32Array:
    """The mask as ``[N or 1, H, W, C]`` from ``[H, W]``, ``[N, H, W]``, ``[H, W, C]`` or ``[N, H, W, C]``."""
    n, h, w, _ = shape
    if mask is None:
        return np.ones((n, 1, 1, 1), np.float32)
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim == 2:
        m = m[None, :, :, None]
    elif m.ndim == 3 and m.shape == (n, h, w):
        m = m[..., None]
    elif m.ndim == 3:
        m = m[None]
    ok = m.ndim == 4 and m.shape[0] in (1, n) and m.shape[1:3] == (h, w) and m.shape[3] in (1, 3)
    if not ok:
        raise InputError(
            f"mask of shape {list(np.shape(mask))} does not fit images {list(shape)}: expected [H, W], "
            "[N, H, W], [H, W, C] or [N, H, W, C] with C = 1 or 3"
        )
    if m.size and not (np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0):
        raise InputError(f"mask values must be in [0, 1], got range [{m.min()}, {m.max()}]")
    return m


def _success(states: dict[str, ModelState], *, targeted: bool) -> dict[str, BoolArray]:
    return {
        key: default_criterion(key, s.kind, targeted=targeted)(states)
        for key, s in states.items()
        if s.kind != "face" or s.threshold is not None
    }
