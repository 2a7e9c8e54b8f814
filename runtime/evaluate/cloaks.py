"""What the evaluation cloaks with: cloak functions, and the plan of attacks (white-box, then
leave-one-out) that says which cloaks are scored on which evaluator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from uncnn_rt.runtime.arrays import Float32Array, Uint8Array
from uncnn_rt.runtime.cloak import CloakSettings, cloak_image
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.evaluate.protocol import WHITE_BOX_LABEL, Kind
from uncnn_rt.runtime.geometry.faces import Detector
from uncnn_rt.runtime.imageio import LoadedImage, lossy_round_trip, output_format
from uncnn_rt.runtime.sessions import AttackSession


@dataclass(frozen=True)
class Cloaked:
    """What a cloak function returns: the cloaked pixels, and the mean steps run per face if known."""

    image: Uint8Array = field(repr=False)
    steps: float | None = None
    quality: int | None = None
    """The quality the cloak must be saved at (:attr:`~.cloak.CloakResult.output_quality`), if it chose."""


class CloakFunction(Protocol):
    """Cloak ``photo`` with the recognizers named ``ensemble``; ``[H, W, 3]`` uint8 or :class:`Cloaked`."""

    def __call__(self, photo: LoadedImage, ensemble: tuple[str, ...]) -> Cloaked | Uint8Array: ...


def cloak_function(
    sessions: Mapping[str, AttackSession],
    settings: CloakSettings,
    *,
    detector: Detector | None = None,
    no_align: bool = False,
    largest: bool = False,
    seed: int = 0,
    ghosts: Mapping[str, AttackSession] | None = None,
    far_targets: Mapping[str, Float32Array] | None = None,
    helpers: Sequence[AttackSession] = (),
) -> CloakFunction:
    """The real cloak (:func:`~.cloak.cloak_image`) as a :class:`CloakFunction` over named sessions
    (``ghosts``: their model-augmented attack graphs, by name, for the gradients; ``far_targets``: the
    pool of the settings' ``far``; ``helpers``: recognizers that steer every cloak and gate none, at the
    settings' ``helper_weight``)."""

    def run(photo: LoadedImage, ensemble: tuple[str, ...]) -> Cloaked:
        result = cloak_image(
            photo,
            recognizers=[sessions[n] for n in ensemble],
            detector=detector,
            mode=settings,
            no_align=no_align,
            largest=largest,
            seed=seed,
            saved=lossy_round_trip(photo, fmt=output_format(photo)),
            ghosts=ghosts,
            far_targets=far_targets,
            helpers=helpers,
        )
        steps = float(np.mean([f.steps for f in result.faces])) if result.faces else None
        return Cloaked(result.image, steps, result.output_quality)

    return run


def as_cloaked(out: Cloaked | Uint8Array, like: LoadedImage) -> Cloaked:
    cloaked = out if isinstance(out, Cloaked) else Cloaked(np.asarray(out))
    if cloaked.image.shape != like.rgb.shape or cloaked.image.dtype != np.uint8:
        raise InputError(
            f"{like.name}: the cloak returned {cloaked.image.dtype} {list(cloaked.image.shape)}, expected "
            f"uint8 {list(like.rgb.shape)}"
        )
    return cloaked


@dataclass(frozen=True)
class Attack:
    """One set of cloaks: made with ``ensemble``, scored on ``scored`` as ``kind``."""

    label: str
    ensemble: tuple[str, ...]
    scored: tuple[tuple[str, Kind], ...]


def plan_attacks(
    ensemble: Sequence[str], evaluators: Sequence[str], *, transfer: bool = True
) -> list[Attack]:
    """The white-box attack (scored on the ensemble and on every external evaluator), then one
    leave-one-out attack per member (scored on that member) when ``transfer`` and the ensemble has 2+."""
    members = tuple(ensemble)
    if not members:
        raise InputError("the ensemble needs at least one recognizer")
    missing = [m for m in members if m not in evaluators]
    if missing:
        raise InputError(f"no evaluator for ensemble member(s) {', '.join(missing)}")
    scored: list[tuple[str, Kind]] = [(m, "white-box") for m in members]
    scored += [(e, "external") for e in evaluators if e not in members]
    attacks = [Attack(WHITE_BOX_LABEL, members, tuple(scored))]
    if transfer and len(members) > 1:
        for m in members:
            attacks.append(
                Attack(f"without {m}", tuple(x for x in members if x != m), ((m, "leave-one-out"),))
            )
    return attacks
