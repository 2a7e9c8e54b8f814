"""The one gradient loop every attack shares, and the result it returns.

Each step, for images ``x0`` ``[N, H, W, 3]`` (0..255) and perturbation ``delta``::

    g      = ensemble gradient at x0 + Q(delta)     (DI / EOT inside; signed so ascent attacks)
    g      = TI(g)                                  (optional smoothing)
    v      = mu * v + g / mean|g|                   (momentum; mu = 0 is plain steepest ascent)
    delta  = delta + alpha * mask * direction(mask * v)
    delta  = constrain(delta)                       (L2 ball, L-inf box eps * mask, pixel range, SSIM floor)

``Q`` rounds to the integer pixel values a saved file holds when ``quantize=True`` (the latent ``delta``
stays real-valued, so steps smaller than one grey level still accumulate), else it is the identity.
Subclasses choose only ``direction`` (the norm's steepest-ascent direction), the random start and the
default step size, as in foolbox's ``gradient_descent_base``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import image_ops
from ..errors import InputError
from .boosters import EOT, InputDiversity, TranslationInvariance
from .criteria import Criterion, ModelState, default_criterion
from .ensemble import Ensemble, Victim, unit_mean_magnitude

Float32Array = NDArray[np.float32]
BoolArray = NDArray[np.bool_]

# Bisection steps of the SSIM floor: the kept share of delta is within 2**-12 of the largest feasible one.
_SSIM_BISECTIONS = 12


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
        ssim_floor: optional lower bound on each image's SSIM to its original, enforced after every
            step by shrinking the perturbation towards 0 (bisection on a scale factor).
        diversity: DI, :class:`~.boosters.InputDiversity`.
        smoothing: TI, :class:`~.boosters.TranslationInvariance`.
        eot: EOT over non-differentiable transforms, :class:`~.boosters.EOT`.
    """

    eps: float = 8.0
    steps: int = 10
    step_size: float | None = None
    random_start: bool = False
    momentum: float = 0.0
    l2: float | None = None
    ssim_floor: float | None = None
    diversity: InputDiversity | None = None
    smoothing: TranslationInvariance | None = None
    eot: EOT | None = None

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
        if self.ssim_floor is not None and not -1.0 <= self.ssim_floor <= 1.0:
            raise InputError(f"{name}: ssim_floor must be in [-1, 1], got {self.ssim_floor}")
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
        """
        x0 = _check_images(images)
        n, h, w, _ = x0.shape
        weights = _check_mask(mask, x0.shape)
        if quantize and not np.array_equal(x0, np.rint(x0)):
            raise InputError("quantize=True needs integer-valued images (the decoded 8-bit photo)")
        if self.ssim_floor is not None and min(h, w) < 11:
            raise InputError(f"an SSIM floor needs images of at least 11x11, got {h}x{w}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        ensemble = Ensemble(victims, n, (h, w), targeted=targeted)
        bound = _per_pixel_bound(self.eps, weights, x0.shape)
        budget = _Budget(x0, bound, self.l2, self.ssim_floor, quantize)

        delta = self.random_delta(x0.shape, bound, rng) if self.random_start else np.zeros_like(x0)
        delta = budget.constrain(delta)
        velocity = np.zeros_like(x0)
        active = np.ones(n, dtype=bool)
        steps = np.zeros(n, dtype=np.int64)
        history: dict[str, list[Float32Array]] = {key: [] for key in ensemble.keys}
        alpha = np.float32(self.alpha)
        for _ in range(self.steps):
            adv = budget.image(delta)
            gradient = ensemble.gradient(adv, rng, diversity=self.diversity, eot=self.eot)
            for key, objective in gradient.objective.items():
                history[key].append(objective)
            if stop_when is not None:
                states = gradient.states if gradient.states is not None else ensemble.evaluate(adv)
                active &= ~stop_when(states)
                if not active.any():
                    break
            grad = gradient.grad if self.smoothing is None else self.smoothing(gradient.grad)
            velocity = np.float32(self.momentum) * velocity + unit_mean_magnitude(grad)
            step = alpha * weights * self.direction(weights * velocity)
            delta = budget.constrain(np.where(active[:, None, None, None], delta + step, delta))
            steps += active

        final = budget.image(delta)
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


class _Budget:
    """The feasible set: L2 ball, per-pixel L-inf box, pixel range [0, 255], SSIM floor, quantisation."""

    def __init__(
        self,
        x0: Float32Array,
        bound: Float32Array,
        l2: float | None,
        ssim_floor: float | None,
        quantize: bool,
    ) -> None:
        self.x0, self.bound, self.l2, self.ssim_floor, self.quantize = x0, bound, l2, ssim_floor, quantize
        self._integer_bound = np.floor(bound).astype(np.float32)

    def project(self, delta: Float32Array) -> Float32Array:
        """Onto the L2 ball, then the L-inf box, then the pixel range.

        Each stage only moves coordinates towards 0, so the result stays inside the earlier stages' sets.
        """
        if self.l2 is not None:
            norms = np.sqrt(np.square(delta, dtype=np.float64).sum(axis=(1, 2, 3), keepdims=True))
            delta = delta * np.minimum(1.0, self.l2 / np.maximum(norms, 1e-12)).astype(np.float32)
        delta = np.clip(delta, -self.bound, self.bound)
        return np.asarray(np.clip(self.x0 + delta, 0.0, 255.0) - self.x0, dtype=np.float32)

    def shown(self, delta: Float32Array) -> Float32Array:
        """``Q(delta)``: the perturbation the model sees and the file stores."""
        return _quantize(delta, self._integer_bound, self.l2) if self.quantize else delta

    def image(self, delta: Float32Array) -> Float32Array:
        """``x0 + Q(delta)``, clipped against float rounding at the ends of the pixel range."""
        return np.asarray(np.clip(self.x0 + self.shown(delta), 0.0, 255.0), dtype=np.float32)

    def constrain(self, delta: Float32Array) -> Float32Array:
        delta = self.project(delta)
        if self.ssim_floor is not None:
            delta = self._hold_ssim(delta, self.ssim_floor)
        return delta

    def _hold_ssim(self, delta: Float32Array, floor: float) -> Float32Array:
        """Scale each image's delta by the largest ``c`` in [0, 1] (to 2**-12) that keeps SSIM >= floor.

        Shrinking towards 0 keeps every constraint above (all are convex sets containing 0), and
        ``c = 0`` is always feasible, so the floor holds exactly on the shown (quantised) image.
        """
        low_ssim = image_ops.ssim(self.x0, self.x0 + self.shown(delta)) < floor
        if not low_ssim.any():
            return delta
        idx = np.flatnonzero(low_ssim)
        x0, d, bound = self.x0[idx], delta[idx], self._integer_bound[idx]
        lo, hi = np.zeros(idx.size, np.float32), np.ones(idx.size, np.float32)
        for _ in range(_SSIM_BISECTIONS):
            mid = (lo + hi) / 2
            shown = (mid[:, None, None, None] * d).astype(np.float32)
            if self.quantize:
                shown = _quantize(shown, bound, self.l2)
            ok = image_ops.ssim(x0, x0 + shown) >= floor
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        out = delta.copy()
        out[idx] = lo[:, None, None, None] * d
        return np.asarray(out, dtype=np.float32)


def _quantize(delta: Float32Array, integer_bound: Float32Array, l2: float | None) -> Float32Array:
    """Round to integers. With integral ``x0`` and integer bounds, rounding keeps the L-inf box and the
    pixel range; where rounding away from 0 breaks the L2 ball, truncation towards 0 cannot."""
    q = np.clip(np.rint(delta), -integer_bound, integer_bound)
    if l2 is not None:
        over = np.sqrt(np.square(q, dtype=np.float64).sum(axis=(1, 2, 3))) > l2
        q[over] = np.clip(np.trunc(delta[over]), -integer_bound[over], integer_bound[over])
    return np.asarray(q, dtype=np.float32)


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
