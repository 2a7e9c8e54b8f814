"""The FGSM family as small variations of :class:`~.base.GradientAttack`.

Every attack takes ``images`` ``[N, H, W, 3]`` (0..255) and victims with ``[N, D]`` references, and
returns an :class:`~.base.AttackResult`; budgets are in 0..255 pixel units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks.base import GradientAttack
from uncnn_rt.runtime.errors import InputError


@dataclass(frozen=True, kw_only=True)
class LinfPGD(GradientAttack):
    """Projected gradient descent under the L-inf norm, from a random start.

    Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.
    ``delta <- clip_eps(delta + alpha * sign(g))``, starting uniformly in ``[-eps, eps]``.
    Default step size ``2.5 * eps / steps``, the paper's choice.
    """

    steps: int = 40
    random_start: bool = True

    def default_step_size(self) -> float:
        return 2.5 * self.eps / self.steps

    def direction(self, velocity: Float32Array) -> Float32Array:
        return np.sign(velocity).astype(np.float32)

    def random_delta(
        self, shape: tuple[int, ...], bound: Float32Array, rng: np.random.Generator
    ) -> Float32Array:
        finite = np.where(np.isfinite(bound), bound, np.float32(0.0))
        return (rng.uniform(-1.0, 1.0, size=shape) * finite).astype(np.float32)


PGD = LinfPGD


@dataclass(frozen=True, kw_only=True)
class L2PGD(GradientAttack):
    """Projected gradient descent under the L2 norm (per image), from a random start in the ball.

    Madry et al., ICLR 2018, with steepest ascent ``g / ||g||_2``. Needs ``l2`` (the radius, 0..255
    units); ``eps`` still caps each pixel (default: no cap). Default step size ``2.5 * l2 / steps``.
    """

    eps: float = math.inf
    steps: int = 40
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.l2 is None:
            raise InputError("L2PGD needs an L2 budget: L2PGD(l2=...)")
        super().__post_init__()

    def default_step_size(self) -> float:
        return 2.5 * (self.l2 or 0.0) / self.steps

    def direction(self, velocity: Float32Array) -> Float32Array:
        norms = np.sqrt(np.square(velocity, dtype=np.float64).sum(axis=(1, 2, 3), keepdims=True))
        return np.asarray(velocity / np.maximum(norms, 1e-12), dtype=np.float32)

    def random_delta(
        self, shape: tuple[int, ...], bound: Float32Array, rng: np.random.Generator
    ) -> Float32Array:
        # Uniform in the ball over the unmasked coordinates: a Gaussian direction, radius r * u^(1/d).
        allowed = bound > 0
        z = rng.standard_normal(size=shape) * allowed
        norms = np.sqrt(np.square(z).sum(axis=(1, 2, 3), keepdims=True))
        dims = np.maximum(allowed.sum(axis=(1, 2, 3), keepdims=True), 1)
        radius = (self.l2 or 0.0) * rng.uniform(size=(shape[0], 1, 1, 1)) ** (1.0 / dims)
        return np.asarray(z / np.maximum(norms, 1e-12) * radius, dtype=np.float32)


@dataclass(frozen=True, kw_only=True)
class BIM(LinfPGD):
    """The basic iterative method, I-FGSM: L-inf PGD from the clean image.

    Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical World", ICLR workshop 2017.
    Default step size ``eps / steps``, so that the last step can reach the budget's edge.
    """

    steps: int = 10
    random_start: bool = False

    def default_step_size(self) -> float:
        return self.eps / self.steps


IFGSM = BIM


@dataclass(frozen=True, kw_only=True)
class MIFGSM(BIM):
    """Momentum iterative FGSM (L-inf): ``v <- mu v + g / ||g||_1``, step ``alpha * sign(v)``.

    Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018 (``mu = 1``, ``alpha = eps / T``).
    """

    momentum: float = 1.0


@dataclass(frozen=True, kw_only=True)
class MIFGM(MIFGSM):
    """Momentum iterative fast gradient method: MI-FGSM's velocity, stepped along itself instead of its
    sign, ``alpha * v / rms(v)`` (the root mean square over the image's non-zero entries).

    Dong et al., CVPR 2018, give the L2 form ``v / ||v||_2`` beside the sign; the scale here makes
    ``alpha`` a typical per-pixel step in grey levels, as the sign's is. The sign step spends the same
    change on every pixel, whatever its share of the gradient, and turns a smooth gradient into a
    binary pattern with an edge at every change of sign; this step keeps the gradient's own shape,
    so it spends its change where the gradient says the recognizers look, and smooth gradients
    (the ``blur`` basis) give smooth perturbations. Visibility figures that add up pixel changes
    (CIEDE2000 mean, FLIP) then fall for the same effect on the recognizers: for a linear recognizer
    ``w``, the sign step needs ``n ||w||_2^2 / ||w||_1^2 >= 1`` times the mean absolute change
    (Cauchy-Schwarz) that this step needs for the same movement.
    """

    def direction(self, velocity: Float32Array) -> Float32Array:
        squares = np.square(velocity, dtype=np.float64)
        counts = np.maximum((velocity != 0).sum(axis=(1, 2, 3), keepdims=True), 1)
        rms = np.sqrt(squares.sum(axis=(1, 2, 3), keepdims=True) / counts)
        return np.asarray(velocity / np.maximum(rms, 1e-12), dtype=np.float32)


@dataclass(frozen=True, kw_only=True)
class FGSM(BIM):
    """The fast gradient sign method: one L-inf step of size ``eps``, ``x + eps * sign(g)``.

    Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.
    """

    steps: int = field(default=1, init=False)

    def default_step_size(self) -> float:
        return self.eps
