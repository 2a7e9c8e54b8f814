"""The step size along an attack: constant, or a cosine from the first step down to a floor."""

from __future__ import annotations

import math
from typing import Final

import numpy as np

SCHEDULES: Final = ("constant", "cosine")


def step_rate(alpha: np.float32, schedule: str, floor: float, done: int, steps: int) -> np.float32:
    """The step size of step ``done`` (0-based) of ``steps``: ``alpha``, or with ``cosine``
    ``alpha * (floor + (1 - floor) * (1 + cos(pi * done / steps)) / 2)``, from ``alpha`` down towards
    ``floor * alpha`` (SGDR's annealing, without restarts). Computed in float32, as the step is."""
    if schedule == "cosine":
        share = floor + (1 - floor) * (1 + math.cos(math.pi * done / steps)) / 2
        rate: np.float32 = np.float32(alpha * share)
        return rate
    return alpha
