"""AutoAttack: the ensemble of parameter-free attacks the field reports robust accuracy with.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020 (arXiv:2003.01690), as RobustBench runs it (L-inf):

==========  ==================================================================================
version     attacks, in order
==========  ==================================================================================
standard    APGD-CE (no restarts), APGD-T (targeted DLR, 9 target classes), FAB-T (9 target
            classes), Square (5000 queries)
plus        APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square (5000 queries),
            APGD-T, FAB-T
==========  ==================================================================================

Each attack runs only on the images still robust after the attacks before it (correctly classified,
and not broken), as the reference does, so an image's verdict is its worst case over the ensemble and
:class:`AutoAttackResult` says which attack broke it. Success is judged on the images as they would be
saved when ``quantize`` (integer pixels). Every attack takes the same arguments as the rest of
:mod:`uncnn_rt.runtime.attacks`; the one victim is a classifier whose references are one-hot true
labels (:mod:`.classifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import ArrayLike

from uncnn_rt.runtime.arrays import BoolArray
from uncnn_rt.runtime.attacks.base import AttackResult
from uncnn_rt.runtime.attacks.classifier import classifier_of
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.attacks.linear import LinearMap
from uncnn_rt.runtime.errors import InputError

RobustnessAttack = Callable[..., AttackResult]
"""What the ensemble runs: any attack of this package, called with the common attack arguments."""


def _apgd(**options: Any) -> Callable[[float], RobustnessAttack]:
    def make(eps: float) -> RobustnessAttack:
        from uncnn_rt.runtime.attacks.apgd import APGD

        return APGD(eps=eps, **options)

    return make


def _fab(**options: Any) -> Callable[[float], RobustnessAttack]:
    def make(eps: float) -> RobustnessAttack:
        from uncnn_rt.runtime.attacks.fab import FAB

        return FAB(eps=eps, **options)

    return make


def _square(**options: Any) -> Callable[[float], RobustnessAttack]:
    def make(eps: float) -> RobustnessAttack:
        from uncnn_rt.runtime.attacks.square import Square

        return Square(eps=eps, **options)

    return make


ATTACKS: Final[dict[str, Callable[[float], RobustnessAttack]]] = {
    "apgd-ce": _apgd(loss="ce"),
    "apgd-dlr": _apgd(loss="dlr"),
    "apgd-t": _apgd(loss="dlr", target_classes=9),
    "fab": _fab(),
    "fab-t": _fab(target_classes=9),
    "square": _square(queries=5000),
}
"""The ensemble's attacks by name, each made for an eps (0..255 units, L-inf), with the reference's
defaults (100 iterations; APGD-T and FAB-T over the 9 most likely other classes)."""

VERSIONS: Final[dict[str, tuple[tuple[str, dict[str, Any]], ...]]] = {
    "standard": (("apgd-ce", {}), ("apgd-t", {}), ("fab-t", {}), ("square", {})),
    "plus": (
        ("apgd-ce", {"restarts": 5}),
        ("apgd-dlr", {"restarts": 5}),
        ("fab", {"restarts": 5}),
        ("square", {}),
        ("apgd-t", {}),
        ("fab-t", {}),
    ),
}


def make_attack(name: str, eps: float, **options: Any) -> RobustnessAttack:
    """The ensemble's attack ``name`` (:data:`ATTACKS`) at ``eps``, with ``options`` replacing defaults."""
    if name not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; AutoAttack's are {', '.join(ATTACKS)}")
    attack = ATTACKS[name](eps)
    if options:
        from dataclasses import replace

        attack = replace(attack, **options)  # type: ignore[type-var]
    return attack


@dataclass(frozen=True)
class AutoAttackResult(AttackResult):
    """An :class:`AttackResult` with, per image, the attack that broke it (None: still robust, or
    misclassified before any attack ran: then ``clean`` is False)."""

    broken_by: tuple[str | None, ...] = ()
    clean: BoolArray | None = None
    """``[N]``: classified correctly before any attack."""


@dataclass(frozen=True, kw_only=True)
class AutoAttack:
    """AutoAttack at ``eps`` (0..255 units, L-inf): ``version`` ``standard`` or ``plus`` (see the module
    docstring). ``attacks`` replaces the version's list (names of :data:`ATTACKS`), e.g. to run one."""

    eps: float
    version: Literal["standard", "plus"] = "standard"
    attacks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise InputError(f"AutoAttack version must be one of {', '.join(VERSIONS)}, got {self.version!r}")
        if not self.eps >= 0:
            raise InputError(f"AutoAttack: eps must be >= 0 (0..255 units), got {self.eps}")
        unknown = [a for a in self.attacks or () if a not in ATTACKS]
        if unknown:
            raise InputError(f"unknown attack(s) {', '.join(unknown)}; AutoAttack's are {', '.join(ATTACKS)}")

    def plan(self) -> list[tuple[str, RobustnessAttack]]:
        """The attacks in the order they run."""
        steps = VERSIONS[self.version] if self.attacks is None else tuple((a, {}) for a in self.attacks)
        return [(name, make_attack(name, self.eps, **options)) for name, options in steps]

    def __call__(
        self,
        images: ArrayLike,
        victims: Sequence[Victim],
        *,
        targeted: bool = False,
        mask: ArrayLike | None = None,
        quantize: bool = False,
        stop_when: object | None = None,
        seed: int | np.random.Generator | None = 0,
        input_map: LinearMap | None = None,
        luminance_only: bool = False,
        on_step: Callable[[int], None] | None = None,
        init: ArrayLike | None = None,
    ) -> AutoAttackResult:
        """Run the ensemble on ``images`` ``[N, H, W, 3]`` (0..255) against the one classifier victim,
        whose references are the true labels (one-hot). ``targeted``, ``stop_when`` and ``init`` are
        accepted for the common signature; AutoAttack is untargeted and always stops at the first break.
        """
        if targeted:
            raise InputError("AutoAttack is untargeted (APGD-T and FAB-T pick their own target classes)")
        x0 = np.ascontiguousarray(images, dtype=np.float32)
        if x0.ndim != 4 or x0.shape[3] != 3:
            raise InputError(f"images must be RGB [N, H, W, 3], got shape {list(x0.shape)}")
        n = x0.shape[0]
        view, labels = classifier_of(victims, (x0.shape[1], x0.shape[2]), input_map)
        victim = victims[0]
        key = victim.key
        references = np.asarray(victim.references, dtype=np.float32)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        clean_probs = view.log_probs(x0)
        clean = np.argmax(clean_probs, axis=1) == labels
        robust = clean.copy()
        adversarial = x0.copy()
        broken_by: list[str | None] = [None] * n
        steps = np.zeros(n, np.int64)
        masks = None if mask is None else np.asarray(mask, dtype=np.float32)
        per_image_mask = masks is not None and masks.ndim == 4 and masks.shape[0] == n
        for name, attack in self.plan():
            idx = np.flatnonzero(robust)
            if idx.size == 0 or self.eps == 0:
                break
            sub_mask = masks[idx] if per_image_mask and masks is not None else masks
            result = attack(
                x0[idx],
                [Victim(victim.session, references[idx], name=key)],
                mask=sub_mask,
                quantize=quantize,
                seed=int(rng.integers(2**63)),
                input_map=input_map,
                luminance_only=luminance_only,
            )
            broke = np.asarray(result.success[key], dtype=bool)
            adversarial[idx[broke]] = result.images[broke]
            robust[idx[broke]] = False
            steps[idx] += result.steps
            for i in idx[broke]:
                broken_by[int(i)] = name
            if on_step is not None:
                on_step(int((~robust & clean).sum()))
        final = view.log_probs(adversarial)
        return AutoAttackResult(
            images=adversarial,
            originals=x0,
            history={key: np.zeros((0, n), np.float32)},
            objective={key: final[np.arange(n), labels].astype(np.float32)},
            features={key: final},
            success={key: np.asarray(np.argmax(final, axis=1) != labels, dtype=bool)},
            steps=steps,
            broken_by=tuple(broken_by),
            clean=clean,
        )


def robust_accuracy(result: AutoAttackResult) -> float:
    """The fraction of images classified correctly clean and after every attack (RobustBench's figure)."""
    assert result.clean is not None
    still = np.asarray(result.clean, dtype=bool) & np.array([b is None for b in result.broken_by])
    return float(still.mean()) if still.size else float("nan")
