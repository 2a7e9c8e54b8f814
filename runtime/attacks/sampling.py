"""Which victims a step spends its gradient on: each in proportion to how far it is from success.

A stochastic ensemble: with ``success_margin``, each victim's share of an image's step is
its distance from success relative to the image's farthest victim (at least :data:`MIN_SHARE`, 0 once
it is past its threshold by the margin); with ``per_step``, only that many victims run in a step,
drawn without replacement in proportion to their weight times their shares.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks.criteria import ModelState, default_criterion
from uncnn_rt.runtime.attacks.ensemble import Ensemble

MIN_SHARE: Final = 0.1
"""A victim short of success keeps at least this share of the farthest one's weight."""

Shares = dict[str, Float32Array]
"""Per victim key, one weight per image of the batch."""


class VictimFocus:
    """The shares of the victims, updated from their states, and the draw of each step's victims."""

    def __init__(
        self,
        ensemble: Ensemble,
        *,
        per_step: int | None,
        margin: float | None,
        targeted: bool,
        met: float = 0.0,
    ):
        self.ensemble, self.per_step, self.margin, self.targeted = ensemble, per_step, margin, targeted
        self.met = met
        self.shares: Shares | None = None

    def draw(self, rng: np.random.Generator) -> Shares | None:
        """The shares of this step (None: every victim, equally)."""
        if self.per_step is None:
            return self.shares
        return draw(self.shares, self.ensemble, self.per_step, rng)

    def update(self, states: dict[str, ModelState]) -> None:
        if self.margin is not None:
            self.shares = shares(states, targeted=self.targeted, margin=self.margin, met=self.met)


def draw(current: Shares | None, ensemble: Ensemble, count: int, rng: np.random.Generator) -> Shares:
    """The shares of ``count`` victims drawn without replacement in proportion to their weight times
    their summed shares over the batch; the others' are zero (not run)."""
    n = ensemble.batch
    full = {key: np.ones(n, np.float32) if current is None else current[key] for key in ensemble.keys}
    weight = np.array([float(full[m.key].sum()) * m.weight for m in ensemble.members], dtype=np.float64)
    live = np.flatnonzero(weight > 0)
    if live.size > count:
        live = rng.choice(live, size=count, replace=False, p=weight[live] / weight[live].sum())
    chosen = {ensemble.keys[i] for i in live}
    return {key: full[key] if key in chosen else np.zeros(n, np.float32) for key in ensemble.keys}


def shares(states: dict[str, ModelState], *, targeted: bool, margin: float, met: float = 0.0) -> Shares:
    """Per victim and image, its distance from success relative to the image's farthest victim, in
    [MIN_SHARE, 1], or ``met`` once it meets its criterion by ``margin`` (0: it is no longer run; above
    0 it keeps steering the change while the others catch up). Classifiers and thresholdless face
    models count as distance 1 until met (classifiers) or always (thresholdless)."""
    distance = {}
    for key, s in states.items():
        if s.kind == "face" and s.threshold is not None:
            goal = s.threshold + margin if targeted else s.threshold - margin
            gap = goal - s.objective if targeted else s.objective - goal
            distance[key] = np.maximum(gap, 0.0).astype(np.float32)
        elif s.kind == "face":
            distance[key] = np.ones_like(s.objective, dtype=np.float32)
        else:
            reached = default_criterion(key, s.kind, targeted=targeted)(states)
            distance[key] = np.where(reached, 0.0, 1.0).astype(np.float32)
    farthest = np.maximum(np.max(np.stack(list(distance.values())), axis=0), np.float32(1e-12))
    return {
        key: np.where(d > 0, np.maximum(d / farthest, MIN_SHARE), met).astype(np.float32)
        for key, d in distance.items()
    }
