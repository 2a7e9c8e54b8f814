"""The Square attack: score-based random search with square-shaped updates, L-inf and L2.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial attack
via random search", ECCV 2020, arXiv:1912.00049; the variant AutoAttack runs (Croce & Hein, ICML 2020,
``fra31/auto-attack``, ``square.py``).

The attack needs forward passes only (:meth:`~.classifier.ClassifierView.log_probs`), so a model whose
gradient is masked (quantised inputs, saturated or shattered layers) cannot hide from it. For images
``x0`` ``[N, H, W, 3]`` (0..255) it keeps the best point ``x0 + delta`` found so far and, at each
iteration ``i``, proposes one change per still-robust image in a random square window of side
``s = round(sqrt(p_i H W))``, queries all proposals in one batch, and keeps each image's proposal when its
loss decreases (or it is broken)::

    L-inf:  delta[window] = +-eps per channel                              (one sign per image and channel)
    L2:     the window's mass moves to a fresh "pyramid" pattern plus its own old content (the paper's
            Sec. 3.2), a second random window is emptied, and delta is rescaled to ||delta||_2 = eps

The loss on the log-probabilities ``l`` (logits only matter up to a shift, so ``z_i - z_j = l_i - l_j``):
untargeted the margin ``l_y - max_{i != y} l_i`` of the true class ``y``, targeted the cross-entropy
``-l_t`` towards the target ``t``, as the reference does. ``p_i`` starts at ``p_init`` and halves at
iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10000, rescaled to ``queries``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from uncnn_rt.runtime.arrays import BoolArray, Float32Array
from uncnn_rt.runtime.attacks.base import AttackResult, _check_images, _check_mask, _per_pixel_bound
from uncnn_rt.runtime.attacks.classifier import ClassifierView, classifier_of
from uncnn_rt.runtime.attacks.criteria import Criterion, ModelState
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.attacks.linear import LinearMap
from uncnn_rt.runtime.errors import InputError

_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""Iterations (of 10000) after which the reference halves the window's share ``p``."""
_SCHEDULE_LENGTH = 10000


@dataclass(frozen=True, kw_only=True)
class Square:
    """Square attack (Andriushchenko et al., ECCV 2020, arXiv:1912.00049), L-inf or L2.

    Args:
        norm: ``"linf"``: the L-inf ball of radius ``eps`` per pixel and channel, started from vertical
            stripes of ``+-eps`` (one random sign per column and channel); ``"l2"``: the L2 ball of
            radius ``eps`` over the whole image, started from a 5 x 5 grid of the paper's pyramid blocks
            with random signs.
        eps: the radius in 0..255 units (per pixel for L-inf, over the whole ``[H, W, 3]`` image for L2).
        queries: forward passes per image and restart, the starting point's included (AutoAttack: 5000).
        p_init: the share of the image the first windows cover, ``s^2 ~ p_init H W`` (AutoAttack: 0.8).
        restarts: independent runs on the images still robust after the previous ones, each with
            ``queries`` queries and a fresh random start (AutoAttack: 1).

    Choices where the reference leaves room: windows are drawn per image (the paper's code; AutoAttack
    shares one window across the batch), at any of the ``H - s + 1`` offsets (the reference draws
    from ``H - s`` and so never touches the last row or column with a small window); the L2 start grid
    uses blocks of side ``min(H, W) // 5`` centred in each direction. The proposal is not redrawn when
    it equals the current point (the paper's code does, AutoAttack does not).

    With a mask ``m`` the L-inf radius is ``eps * m`` per pixel; for L2 the perturbation is ``m * u``
    with ``||u||_2 <= eps`` (so ``||delta||_2 <= eps`` still holds), and a pixel with ``m = 0`` never
    changes. With ``luminance_only`` each proposal puts the same value on R, G and B (and the mask's
    smallest channel bounds all three), so a grey image stays grey. With ``quantize`` each proposal is
    rounded to integers before it is queried (L2: truncated towards 0 where rounding would leave the
    ball), so the returned images are exactly the points whose scores were seen.

    ``__call__`` takes ``images`` ``[N, H, W, 3]`` and one classifier :class:`~.ensemble.Victim` with
    one-hot references ``[N, K]`` (true labels, or targets when ``targeted``) and returns an
    :class:`~.base.AttackResult`: ``history`` ``[rows, N]`` the margin of each image's current point
    after each restart's start and after each iteration (untargeted ``z_y - max_{i != y} z_i``, targeted
    ``max_{i != t} z_i - z_t``: negative once broken), ``objective`` ``[N]`` that margin on the returned
    images, ``features`` ``[N, K]`` their log-probabilities, ``success`` ``[N]`` the argmax criterion on
    them, ``steps`` ``[N]`` the queries each image cost (the final check of the returned images, one
    batch, is not counted).
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8.0
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise InputError(f"Square: norm must be 'linf' or 'l2', got {self.norm!r}")
        if not 0.0 <= self.eps < math.inf:
            raise InputError(f"Square: eps must be finite and >= 0 (0..255 units), got {self.eps}")
        if self.queries < 1:
            raise InputError(f"Square: queries must be >= 1, got {self.queries}")
        if not 0.0 < self.p_init <= 1.0:
            raise InputError(f"Square: p_init must be in (0, 1], got {self.p_init}")
        if self.restarts < 1:
            raise InputError(f"Square: restarts must be >= 1, got {self.restarts}")

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
        """Attack ``images`` against the one classifier in ``victims``.

        Args:
            images: ``[N, H, W, 3]``, RGB, 0..255 (uint8 or float; integer-valued with ``quantize``).
            victims: one classifier victim with one-hot references ``[N, K]``.
            targeted: reach the reference class instead of leaving it.
            mask: values in [0, 1], ``[H, W]``, ``[N, H, W]``, ``[H, W, C]`` or ``[N, H, W, C]``: scales the
                per-pixel radius (see the class docstring).
            quantize: query and return integer pixel values.
            stop_when: also freeze each image once it meets this criterion (on its current point).
            seed: seed or generator of every random draw; equal seeds give equal results.
            input_map: a linear map the classifier sees the images through (budget, mask and rounding stay
                in the images' own grid).
            luminance_only: the same change on R, G and B.
            on_step: called with the number of iterations done (over all restarts) after each one.
            init: the first restart's starting perturbation ``[N, H, W, 3]``, projected onto the budget,
                instead of the stripes (L-inf) or the block grid (L2).
        """
        x0 = _check_images(images)
        n, h, w, _ = x0.shape
        if quantize and not np.array_equal(x0, np.rint(x0)):
            raise InputError("quantize=True needs integer-valued images (the decoded 8-bit photo)")
        weights = _check_mask(mask, x0.shape)
        if luminance_only:
            weights = weights.min(axis=3, keepdims=True)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        view, labels = classifier_of(victims, (h, w), input_map)
        victim = victims[0]
        references = np.asarray(victim.references, dtype=np.float32)
        if references.shape[0] != n:
            raise InputError(f"{victim.key}: {references.shape[0]} references for {n} images")
        start = None
        if init is not None:
            start = np.ascontiguousarray(init, dtype=np.float32)
            if start.shape != x0.shape:
                raise InputError(f"init must have shape {list(x0.shape)}, got {list(start.shape)}")

        space = _Space(x0, weights, self.norm, self.eps, quantize, luminance_only)
        kept_images = x0.copy()
        kept_margin = np.full(n, np.inf, np.float32)
        kept_log_probs = np.zeros((n, view.classes), np.float32)
        frozen = np.zeros(n, dtype=bool)
        steps = np.zeros(n, dtype=np.int64)
        history: list[Float32Array] = []
        iterations = 0

        for restart in range(self.restarts):
            todo = np.flatnonzero(~frozen)
            if todo.size == 0:
                break
            run = _Run(self, space, view, todo, labels[todo], targeted, rng)
            run.begin(None if start is None or restart > 0 else start[todo])

            for i in range(self.queries):
                margin, log_probs = kept_margin.copy(), kept_log_probs.copy()
                margin[todo], log_probs[todo] = run.margin, run.log_probs
                if stop_when is not None:
                    objective = (log_probs * references).sum(axis=1)
                    state = ModelState(victim.session.info.kind, None, log_probs, objective, references)
                    run.done |= np.asarray(stop_when({victim.key: state}), dtype=bool)[todo]
                history.append(margin)
                if i == self.queries - 1 or run.done.all():
                    break
                run.iterate(i)
                iterations += 1
                if on_step is not None:
                    on_step(iterations)

            steps[todo] += run.spent
            better = run.broken | (run.margin < kept_margin[todo])
            chosen = todo[better]
            kept_images[chosen] = run.images[better]
            kept_margin[chosen] = run.margin[better]
            kept_log_probs[chosen] = run.log_probs[better]
            frozen[todo] = run.done

        final = np.asarray(np.clip(kept_images, 0.0, 255.0), dtype=np.float32)
        log_probs = view.log_probs(final)
        margin, _, broken = _scores(log_probs, labels, targeted)
        key = victim.key
        return AttackResult(
            images=final,
            originals=x0,
            history={key: np.stack(history) if history else np.zeros((0, n), np.float32)},
            objective={key: margin},
            features={key: log_probs},
            success={key: broken},
            steps=steps,
        )


def _scores(
    log_probs: Float32Array, labels: NDArray[np.intp], targeted: bool
) -> tuple[Float32Array, Float32Array, BoolArray]:
    """``(margin, loss, broken)`` per image: the margin is negative once broken, the loss is what the
    search lowers (the margin untargeted, the cross-entropy towards the target when targeted)."""
    rows = np.arange(log_probs.shape[0])
    own = log_probs[rows, labels]
    others = log_probs.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1)
    predicted = np.argmax(log_probs, axis=1)
    if targeted:
        margin, loss, broken = top - own, -own, predicted == labels
    else:
        margin, loss, broken = own - top, own - top, predicted != labels
    return margin.astype(np.float32), loss.astype(np.float32), np.asarray(broken, dtype=bool)


def _p_selection(p_init: float, iteration: int, queries: int) -> float:
    """The window's share of the image at ``iteration``: the reference's schedule rescaled to ``queries``."""
    it = int(iteration / queries * _SCHEDULE_LENGTH)
    halvings = sum(it > t for t in _P_HALVINGS)
    return p_init / float(2**halvings)


class _Space:
    """The budget of one call: what a latent perturbation is, what the model is shown, the pixel range.

    L-inf: the latent ``delta`` is the perturbation itself, in ``[-eps m, eps m]``. L2: the latent ``u``
    has ``||u||_2 <= eps`` and the perturbation is ``m u`` (``u = 0`` where ``m = 0``). Both are kept
    inside the pixel range (the same range on R, G and B with ``luminance_only``), and shown rounded
    with ``quantize``.
    """

    def __init__(
        self,
        x0: Float32Array,
        weights: Float32Array,
        norm: str,
        eps: float,
        quantize: bool,
        luminance_only: bool,
    ) -> None:
        self.x0, self.norm, self.eps, self.quantize = x0, norm, np.float32(eps), quantize
        self.channels = 1 if luminance_only else 3
        self.weights = np.ascontiguousarray(np.broadcast_to(weights, x0.shape), dtype=np.float32)
        self.allowed = self.weights > 0
        self.bound = _per_pixel_bound(eps, weights, x0.shape)
        self.integer_bound = np.floor(self.bound)
        low, high = -x0, 255.0 - x0
        if luminance_only:
            low = np.broadcast_to(low.max(axis=3, keepdims=True), x0.shape)
            high = np.broadcast_to(high.min(axis=3, keepdims=True), x0.shape)
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)

    def signs(self, rng: np.random.Generator, shape: tuple[int, ...]) -> Float32Array:
        """Random +-1 of ``shape`` whose last axis is the channel: one draw for all three with
        ``luminance_only``."""
        drawn = rng.integers(0, 2, size=(*shape[:-1], self.channels)) * 2 - 1
        return np.ascontiguousarray(np.broadcast_to(drawn, shape), dtype=np.float32)

    def perturbation(self, latent: Float32Array, idx: NDArray[np.intp]) -> Float32Array:
        """The (unrounded) perturbation of ``latent`` for images ``idx``, inside the pixel range."""
        delta = latent if self.norm == "linf" else self.weights[idx] * latent
        return np.asarray(np.clip(delta, self.low[idx], self.high[idx]), dtype=np.float32)

    def latent(self, delta: Float32Array, idx: NDArray[np.intp]) -> Float32Array:
        """The latent of a perturbation ``delta`` already inside the budget (the inverse of the above)."""
        if self.norm == "linf":
            return delta
        m = self.weights[idx]
        return np.asarray(np.where(m > 0, delta / np.where(m > 0, m, 1.0), 0.0), dtype=np.float32)

    def shown(self, delta: Float32Array, idx: NDArray[np.intp]) -> Float32Array:
        """What the model sees and the result holds: ``x0 + delta``, rounded with ``quantize``. With
        integer ``x0`` rounding stays in the pixel range; L-inf clips to the integer radius, L2 truncates
        towards 0 the images that rounding pushed out of the ball."""
        if self.quantize:
            q = np.rint(delta)
            if self.norm == "linf":
                q = np.clip(q, -self.integer_bound[idx], self.integer_bound[idx])
            else:
                over = self.l2_norms(self.latent(q, idx)) > self.eps
                q[over] = np.trunc(delta[over])
            delta = q
        return np.asarray(np.clip(self.x0[idx] + delta, 0.0, 255.0), dtype=np.float32)

    @staticmethod
    def l2_norms(latent: Float32Array) -> NDArray[np.float64]:
        return np.asarray(np.sqrt(np.square(latent, dtype=np.float64).sum(axis=(1, 2, 3))), np.float64)

    def to_ball(self, latent: Float32Array, idx: NDArray[np.intp], *, exact: bool) -> Float32Array:
        """L2: ``u`` of images ``idx`` restricted to their unmasked pixels and scaled to norm ``eps``
        (``exact``) or to at most ``eps``."""
        u = latent * self.allowed[idx]
        norms = self.l2_norms(u)[:, None, None, None]
        scale = self.eps / (norms + 1e-12) if exact else np.minimum(1.0, self.eps / np.maximum(norms, 1e-12))
        return np.asarray(u * scale, dtype=np.float32)


class _Run:
    """One restart's search over the images ``todo``: their current points and what they cost."""

    def __init__(
        self,
        attack: Square,
        space: _Space,
        view: ClassifierView,
        todo: NDArray[np.intp],
        labels: NDArray[np.intp],
        targeted: bool,
        rng: np.random.Generator,
    ) -> None:
        self.attack, self.space, self.view, self.todo = attack, space, view, todo
        self.labels, self.targeted, self.rng = labels, targeted, rng
        n = todo.size
        shape = (n, *space.x0.shape[1:])
        self.latent = np.zeros(shape, np.float32)
        self.images = space.x0[todo].copy()
        self.log_probs = np.zeros((n, view.classes), np.float32)
        self.margin = np.full(n, np.inf, np.float32)
        self.loss = np.full(n, np.inf, np.float32)
        self.broken = np.zeros(n, dtype=bool)
        self.done = np.zeros(n, dtype=bool)
        self.spent = np.zeros(n, dtype=np.int64)

    def begin(self, init: Float32Array | None) -> None:
        """The starting point (the first query of every image)."""
        space, idx = self.space, self.todo
        n, h, w, _ = self.latent.shape
        if init is not None:
            if space.channels == 1:
                init = np.ascontiguousarray(np.broadcast_to(init[..., :1], init.shape))
            if space.norm == "linf":
                latent = np.clip(init, -space.bound[idx], space.bound[idx])
            else:
                latent = space.to_ball(space.latent(init, idx), idx, exact=False)
        elif space.norm == "linf":
            latent = space.signs(self.rng, (n, 1, w, 3)) * space.bound[idx]
        else:
            latent = self._block_grid(n, h, w)
        self._offer(np.arange(n), np.asarray(latent, np.float32), first=True)

    def _block_grid(self, n: int, h: int, w: int) -> Float32Array:
        """The L2 start: a grid of pyramid blocks of side ``min(H, W) // 5`` with random signs per image
        and channel, scaled to norm ``eps``."""
        s = max(min(h, w) // 5, 1)
        pattern = _eta(s)[None, :, :, None]
        u = np.zeros((n, h, w, 3), np.float32)
        top, left = (h - s * (h // s)) // 2, (w - s * (w // s)) // 2
        for r in range(h // s):
            for c in range(w // s):
                rows = slice(top + r * s, top + (r + 1) * s)
                cols = slice(left + c * s, left + (c + 1) * s)
                u[:, rows, cols] += pattern * self.space.signs(self.rng, (n, 1, 1, 3))
        return self.space.to_ball(u, self.todo, exact=True)

    def iterate(self, i: int) -> None:
        """One proposal per image still running, queried in one batch."""
        live = np.flatnonzero(~self.done)
        h, w = self.latent.shape[1:3]
        p = _p_selection(self.attack.p_init, i, self.attack.queries)
        side = round(math.sqrt(p * h * w))
        if self.space.norm == "linf":
            s = min(max(side, 1), h, w)
            proposal = self._linf_proposal(live, s)
        else:
            s = max(side, 3)
            s = min(s + 1 if s % 2 == 0 else s, h, w)
            proposal = self._l2_proposal(live, s)
        self._offer(live, proposal, first=False)

    def _window(self, m: int, s: int) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Rows ``[m, s]`` and columns ``[m, s]`` of one random ``s x s`` window per image."""
        h, w = self.latent.shape[1:3]
        top = self.rng.integers(0, h - s + 1, size=m)
        left = self.rng.integers(0, w - s + 1, size=m)
        offsets = np.arange(s)
        return top[:, None] + offsets, left[:, None] + offsets

    def _linf_proposal(self, live: NDArray[np.intp], s: int) -> Float32Array:
        rows, cols = self._window(live.size, s)
        at = np.arange(live.size)[:, None, None]
        proposal = self.latent[live].copy()
        bound = self.space.bound[self.todo[live]]
        signs = self.space.signs(self.rng, (live.size, 1, 1, 3))
        proposal[at, rows[:, :, None], cols[:, None, :]] = (
            signs * bound[at, rows[:, :, None], cols[:, None, :]]
        )
        return np.asarray(proposal, dtype=np.float32)

    def _l2_proposal(self, live: NDArray[np.intp], s: int) -> Float32Array:
        """The paper's L2 update: the window's old content (per channel, at unit norm) plus a fresh
        pyramid with random signs, at the norm the window and a second, emptied window held plus what the
        ball has left; a random transpose of the pyramid per image."""
        m = live.size
        u = self.latent[live]
        at = np.arange(m)[:, None, None]
        rows1, cols1 = self._window(m, s)
        rows2, cols2 = self._window(m, s)
        first = (at, rows1[:, :, None], cols1[:, None, :])
        second = (at, rows2[:, :, None], cols2[:, None, :])
        union = np.zeros(u.shape[:3], dtype=bool)
        union[first] = True
        union[second] = True

        old = u[first]
        old_norm = np.sqrt(np.square(old).sum(axis=(1, 2), keepdims=True))
        image_norm = self.space.l2_norms(u)[:, None, None, None]
        window_norm = np.sqrt(np.square(u * union[..., None]).sum(axis=(1, 2), keepdims=True))
        eta = _eta(s)
        flip = self.rng.integers(0, 2, size=m).astype(bool)
        pyramid = np.where(flip[:, None, None], eta.T[None], eta[None])[..., None]
        fresh = pyramid * self.space.signs(self.rng, (m, 1, 1, 3)) + old / (1e-12 + old_norm)
        fresh_norm = np.sqrt(np.square(fresh).sum(axis=(1, 2), keepdims=True))
        room = np.maximum(np.float64(self.space.eps) ** 2 - image_norm**2, 0.0) / 3.0 + window_norm**2
        proposal = u.copy()
        proposal[second] = 0.0
        proposal[first] = fresh / (1e-12 + fresh_norm) * np.sqrt(room)
        return self.space.to_ball(proposal, self.todo[live], exact=True)

    def _offer(self, live: NDArray[np.intp], latent: Float32Array, *, first: bool) -> None:
        """Query the proposals of images ``live`` and keep each one that lowers the loss or breaks it."""
        idx = self.todo[live]
        delta = self.space.perturbation(latent, idx)
        shown = self.space.shown(delta, idx)
        log_probs = self.view.log_probs(shown)
        self.spent[live] += 1
        margin, loss, broken = _scores(log_probs, self.labels[live], self.targeted)
        take = np.ones(live.size, dtype=bool) if first else (loss < self.loss[live]) | broken
        chosen = live[take]
        self.latent[chosen] = self.space.latent(delta[take], idx[take])
        self.images[chosen] = shown[take]
        self.log_probs[chosen] = log_probs[take]
        self.margin[chosen] = margin[take]
        self.loss[chosen] = loss[take]
        self.broken[chosen] = broken[take]
        self.done[chosen] |= broken[take]


def _eta(s: int) -> Float32Array:
    """The paper's L2 window pattern ``[s, s]``: two opposite-signed halves, each a pyramid of concentric
    rectangles whose ring ``k`` (Chebyshev distance from the centre) weighs ``sum_{j >= k} 1 / (j + 1)^2``,
    each half and the whole at unit L2 norm."""
    top = _pyramid(s // 2, s)
    bottom = _pyramid(s - s // 2, s)
    pattern = np.concatenate([top, -bottom], axis=0)
    return np.asarray(pattern / np.sqrt(np.square(pattern).sum()), dtype=np.float32)


def _pyramid(rows: int, cols: int) -> NDArray[np.float64]:
    if rows == 0:
        return np.zeros((0, cols))
    centre_r, centre_c = rows // 2, cols // 2
    rings = max(centre_r, centre_c) + 1
    weights = 1.0 / np.arange(1, rings + 1) ** 2
    tail = np.cumsum(weights[::-1])[::-1]  # tail[k] = sum_{j >= k} 1 / (j + 1)^2
    ring = np.maximum(
        np.abs(np.arange(rows) - centre_r)[:, None], np.abs(np.arange(cols) - centre_c)[None, :]
    )
    pattern = tail[ring]
    return np.asarray(pattern / np.sqrt(np.square(pattern).sum()))
