"""A classifier as the robustness attacks see it: log-probabilities, and the exact gradient of any
fixed combination of them, at images in their own pixel grid.

The attack-graph contract gives a classifier's ``features`` as log-softmax and ``objective`` as
``features . reference`` with its gradient. A loss that is a fixed combination ``c . z`` of the logits
``z`` with coefficients summing to 0 (``sum(c) = 0``) equals ``c . log_softmax(z)``, since the
log-softmax's shift ``logsumexp(z)`` cancels: so feeding ``c`` as the reference gives its exact
gradient. That covers the margin ``z_y - z_j``, DLR's numerator and denominator (Croce & Hein, ICML
2020), and FAB's class differences. Cross-entropy is ``-log p_y``: the reference is the one-hot ``e_y``
itself. Attacks without gradients (Square) only need :meth:`ClassifierView.log_probs`.

The images ``[N, H, W, 3]`` (0..255) reach the model through ``input_map`` (e.g. the centred square of
a photo, :class:`~uncnn_rt.runtime.jobs.variants.CenterSquare`) and a resize to the model's canonical
size; gradients come back through both adjoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.attacks.linear import LinearMap, Resize
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession


@dataclass
class ClassifierView:
    """One classifier attack graph, seen through ``input_map`` by images of ``size`` ``H x W``."""

    session: AttackSession
    size: tuple[int, int]
    input_map: LinearMap | None = None
    forward_calls: int = 0
    """Forward passes run so far, images counted one each (query budgets, timing)."""
    gradient_calls: int = 0
    _resize: Resize | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.session.info.kind != "classifier":
            raise InputError(f"{self.session.name}: a {self.session.info.kind} model, not a classifier")
        s = self.session.info.canonical_size
        mapped = self.size
        if self.input_map is not None:
            probe = self.input_map.forward(np.zeros((1, *self.size, 3), np.float32))
            mapped = (int(probe.shape[1]), int(probe.shape[2]))
        self._resize = None if mapped == (s, s) else Resize(mapped, (s, s))

    @property
    def classes(self) -> int:
        return self.session.info.embedding_dim

    def _view(self, images: Float32Array) -> Float32Array:
        x = images if self.input_map is None else self.input_map.forward(images)
        return x if self._resize is None else self._resize.forward(x)

    def log_probs(self, images: ArrayLike) -> Float32Array:
        """``[N, K]`` log-probabilities of ``images`` ``[N, H, W, 3]``."""
        x = _images(images, self.size)
        self.forward_calls += x.shape[0]
        return self.session.features(self._view(x))

    def value_and_grad(
        self, images: ArrayLike, coefficients: ArrayLike
    ) -> tuple[Float32Array, Float32Array, Float32Array]:
        """``(log_probs [N, K], c . log_probs [N], its gradient [N, H, W, 3])`` for per-image
        coefficients ``c`` ``[N, K]``; exact for the logits' combination ``c . z`` when ``sum(c) = 0``."""
        x = _images(images, self.size)
        c = np.ascontiguousarray(coefficients, dtype=np.float32)
        if c.shape != (x.shape[0], self.classes):
            raise InputError(
                f"coefficients must have shape [{x.shape[0]}, {self.classes}], got {list(c.shape)}"
            )
        self.forward_calls += x.shape[0]
        self.gradient_calls += x.shape[0]
        features, objective, grad = self.session.run(self._view(x), c)
        if self._resize is not None:
            grad = self._resize.adjoint(grad)
        if self.input_map is not None:
            grad = self.input_map.adjoint(grad)
        return features, objective, np.asarray(grad, dtype=np.float32)


def classifier_of(
    victims: Sequence[Victim], size: tuple[int, int], input_map: LinearMap | None
) -> tuple[ClassifierView, NDArray[np.intp]]:
    """The one classifier victim of a robustness attack as a view, and each image's class: the
    reference's argmax (the true label untargeted, the target class when targeted)."""
    if len(victims) != 1:
        raise InputError(f"the robustness attacks take one classifier victim, got {len(victims)}")
    victim = victims[0]
    view = ClassifierView(victim.session, size, input_map)
    references = np.asarray(victim.references, dtype=np.float32)
    if references.ndim != 2 or references.shape[1] != view.classes:
        raise InputError(f"references must be [N, {view.classes}] one-hot rows, got {list(references.shape)}")
    return view, np.argmax(references, axis=1).astype(np.intp)


def _images(images: ArrayLike, size: tuple[int, int]) -> Float32Array:
    x = np.ascontiguousarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (*size, 3):
        raise InputError(f"images must have shape [N, {size[0]}, {size[1]}, 3], got {list(x.shape)}")
    return x
