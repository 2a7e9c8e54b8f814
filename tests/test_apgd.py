"""APGD (Croce & Hein, ICML 2020) on the linear classifier, whose decision boundaries are known exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import LinearGraph

from uncnn_rt.runtime.attacks.apgd import APGD, _halves, _Objective, checkpoints
from uncnn_rt.runtime.attacks.classifier import ClassifierView
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession

KEY = "linear"
VARIANTS = {
    "ce": APGD(loss="ce", steps=20),
    "dlr": APGD(loss="dlr", steps=20),
    "t": APGD(loss="dlr", steps=10, target_classes=9),
}


def _logits(graph: LinearGraph, images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1).astype(np.float64) / 255.0 - 0.5
    return x @ graph.weights.astype(np.float64) + graph.bias


def _boundary(graph: LinearGraph, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[N]``: the L-inf distance (0..255 units, ignoring the pixel range) to the nearest boundary of
    the linear classifier: ``min_j (z_y - z_j) / ||w_y - w_j||_1 * 255``."""
    z = _logits(graph, images)
    w = graph.weights.astype(np.float64)
    out = []
    for zi, y in zip(z, labels, strict=True):
        out.append(
            min((zi[y] - zi[j]) / np.abs(w[:, y] - w[:, j]).sum() * 255 for j in range(len(zi)) if j != y)
        )
    return np.array(out)


def _batch(
    graph: LinearGraph, n: int, seed: int, lo: int = 0, hi: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(lo, hi, (n, graph.size, graph.size, 3)).astype(np.float32)
    return images, _logits(graph, images).argmax(axis=1)


def _victim(graph: LinearGraph, classes: np.ndarray) -> list[Victim]:
    session = AttackSession(graph.path, device="cpu")
    return [Victim(session, np.eye(10, dtype=np.float32)[classes], name=KEY)]


def test_checkpoints_follow_the_papers_recursion() -> None:
    # p = 0, .22, .41 (+.19), .57 (+.16), .70 (+.13), .80 (+.10), .87 (+.07), .93 (+.06), .99 (+.06);
    # the next, 1.05, is past the end. w_j = ceil(100 p_j); for 10 steps ceil(2.2) = 3, ceil(4.1) = 5,
    # ceil(5.7) = 6, 7, 8, ceil(8.7) = 9, ceil(9.3) = 10 and ceil(9.9) = 10 once more.
    assert checkpoints(100) == (0, 22, 41, 57, 70, 80, 87, 93, 99)
    assert checkpoints(10) == (0, 3, 5, 6, 7, 8, 9, 10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("quantize", [False, True])
def test_never_leaves_the_budget_or_the_pixel_range(
    linear_classifier_graph: LinearGraph, variant: str, quantize: bool
) -> None:
    images, labels = _batch(linear_classifier_graph, 6, seed=1)
    mask = np.random.default_rng(2).uniform(0, 1, images.shape[1:3]).astype(np.float32)
    eps = 5.5
    result = replace(VARIANTS[variant], eps=eps)(
        images, _victim(linear_classifier_graph, labels), mask=mask, quantize=quantize
    )
    change = np.abs(result.images - images)
    assert np.all(change <= eps * mask[None, :, :, None] + 1e-4)
    assert result.images.min() >= 0 and result.images.max() <= 255
    if quantize:
        assert np.array_equal(result.images, np.rint(result.images))
        assert np.all(change <= np.floor(eps * mask)[None, :, :, None])


@pytest.mark.parametrize("variant", VARIANTS)
def test_quantized_success_is_judged_on_the_returned_integers(
    linear_classifier_graph: LinearGraph, variant: str
) -> None:
    images, labels = _batch(linear_classifier_graph, 8, seed=3)
    result = replace(VARIANTS[variant], eps=1.5)(
        images, _victim(linear_classifier_graph, labels), quantize=True
    )
    assert np.array_equal(result.images, np.rint(result.images))
    top = _logits(linear_classifier_graph, result.images).argmax(axis=1)
    np.testing.assert_array_equal(result.success[KEY], top != labels)
    assert 0 < result.success[KEY].sum() < len(labels), "eps chosen to break some, not all"
    np.testing.assert_allclose(
        result.features[KEY],
        AttackSession(linear_classifier_graph.path, device="cpu").features(result.images),
        atol=1e-5,
    )
    margin = result.objective[KEY]
    np.testing.assert_array_equal(margin > 0, result.success[KEY])


@pytest.mark.parametrize("variant", VARIANTS)
def test_eps_zero_breaks_nothing_and_changes_nothing(
    linear_classifier_graph: LinearGraph, variant: str
) -> None:
    images, labels = _batch(linear_classifier_graph, 4, seed=4)
    result = replace(VARIANTS[variant], eps=0.0)(images, _victim(linear_classifier_graph, labels))
    assert not result.success[KEY].any()
    np.testing.assert_array_equal(result.images, images)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_large_eps_breaks_everything(linear_classifier_graph: LinearGraph, variant: str) -> None:
    images, labels = _batch(linear_classifier_graph, 8, seed=5)
    result = replace(VARIANTS[variant], eps=32.0)(
        images, _victim(linear_classifier_graph, labels), quantize=True
    )
    assert result.success[KEY].all()


@pytest.mark.parametrize(("loss", "slack"), [("ce", 1.5), ("dlr", 1.1)])
def test_breaks_just_above_the_boundary_and_never_below_it(
    linear_classifier_graph: LinearGraph, loss: str, slack: float
) -> None:
    """Mid-grey images, so the nearest boundary is reachable without meeting the pixel range.

    DLR breaks within 5% of the distance. CE needs more: ``-log p_y`` rises towards all other classes at
    once, so its maximum over a box just past the nearest boundary can lie on the right side of it (here
    APGD-CE reaches a higher CE than the breaking corner ``x + eps sign(w_j - w_y)``, yet no break)
    below about 1.4x; that weakness is why the paper adds DLR.
    """
    images, labels = _batch(linear_classifier_graph, 8, seed=6, lo=96, hi=160)
    distance = _boundary(linear_classifier_graph, images, labels)
    session = AttackSession(linear_classifier_graph.path, device="cpu")
    attack = APGD(loss=loss, steps=50)  # type: ignore[arg-type]
    for i in range(len(images)):
        one = [Victim(session, np.eye(10, dtype=np.float32)[labels[i : i + 1]], name=KEY)]
        above = replace(attack, eps=slack * distance[i])(images[i : i + 1], one)
        below = replace(attack, eps=0.95 * distance[i])(images[i : i + 1], one)
        assert above.success[KEY][0], f"image {i} at {slack}x its distance {distance[i]:.3f}"
        assert not below.success[KEY][0], f"image {i} broken below its distance {distance[i]:.3f}"


def test_apgd_t_breaks_at_least_what_apgd_dlr_breaks(linear_classifier_graph: LinearGraph) -> None:
    images, labels = _batch(linear_classifier_graph, 10, seed=7)
    victims = _victim(linear_classifier_graph, labels)
    dlr = APGD(loss="dlr", eps=1.0, steps=30)(images, victims).success[KEY]
    apgd_t = APGD(loss="dlr", eps=1.0, steps=30, target_classes=9)(images, victims).success[KEY]
    assert 0 < dlr.sum() < len(labels), "eps chosen to break some, not all"
    assert np.all(apgd_t[dlr])


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_targeted_reaches_the_target(linear_classifier_graph: LinearGraph, loss: str) -> None:
    images, labels = _batch(linear_classifier_graph, 6, seed=8)
    targets = (labels + 1 + np.arange(6) % 9) % 10
    assert np.all(targets != labels)
    attack = APGD(loss=loss, eps=48.0, steps=30)  # type: ignore[arg-type]
    result = attack(images, _victim(linear_classifier_graph, targets), targeted=True, quantize=True)
    top = _logits(linear_classifier_graph, result.images).argmax(axis=1)
    np.testing.assert_array_equal(top, targets)
    assert result.success[KEY].all()
    # eps 0 reaches no target the clean image does not have already
    none = replace(attack, eps=0.0, steps=5)(images, _victim(linear_classifier_graph, targets), targeted=True)
    assert not none.success[KEY].any()


def test_the_same_seed_gives_the_same_result(linear_classifier_graph: LinearGraph) -> None:
    images, labels = _batch(linear_classifier_graph, 6, seed=9)
    victims = _victim(linear_classifier_graph, labels)
    attack = APGD(loss="dlr", eps=0.5, steps=15, restarts=2)
    first, second = attack(images, victims, seed=3), attack(images, victims, seed=3)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.history[KEY], second.history[KEY])
    np.testing.assert_array_equal(first.steps, second.steps)
    other = attack(images, victims, seed=4)
    assert not np.array_equal(first.images, other.images)


@pytest.mark.parametrize("variant", VARIANTS)
def test_luminance_only_keeps_grey_images_grey(linear_classifier_graph: LinearGraph, variant: str) -> None:
    rng = np.random.default_rng(10)
    grey = rng.integers(0, 256, (4, linear_classifier_graph.size, linear_classifier_graph.size, 1))
    images = np.repeat(grey, 3, axis=3).astype(np.float32)
    labels = _logits(linear_classifier_graph, images).argmax(axis=1)
    result = replace(VARIANTS[variant], eps=6.0)(
        images, _victim(linear_classifier_graph, labels), luminance_only=True, quantize=True
    )
    assert np.abs(result.images - images).max() > 0
    np.testing.assert_array_equal(result.images[..., 0], result.images[..., 1])
    np.testing.assert_array_equal(result.images[..., 0], result.images[..., 2])


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_out_pixels_never_change(linear_classifier_graph: LinearGraph, variant: str) -> None:
    images, labels = _batch(linear_classifier_graph, 4, seed=11)
    size = linear_classifier_graph.size
    mask = np.zeros((4, size, size), np.float32)
    mask[:, 4:12, 4:12] = 1.0
    result = replace(VARIANTS[variant], eps=16.0)(images, _victim(linear_classifier_graph, labels), mask=mask)
    outside = mask == 0
    np.testing.assert_array_equal(result.images[outside], images[outside])
    assert np.abs(result.images - images)[~outside].max() > 0


@pytest.mark.parametrize(("true", "target"), [(True, False), (True, True), (False, True)])
def test_the_dlr_gradient_is_exact(linear_classifier_graph: LinearGraph, true: bool, target: bool) -> None:
    """DLR untargeted, targeted with the true class, targeted without it: directional derivatives by
    central differences of the numpy loss agree with the one-pass gradient."""
    images, labels = _batch(linear_classifier_graph, 3, seed=12, lo=64, hi=192)
    targets = (labels + 3) % 10
    session = AttackSession(linear_classifier_graph.path, device="cpu")
    view = ClassifierView(session, (linear_classifier_graph.size, linear_classifier_graph.size))
    objective = _Objective(
        view,
        "dlr",
        labels if true else None,
        targets if target else None,
        targeted=not true,
        luminance_only=False,
    )
    _, loss, grad = objective(images, np.arange(3))

    def reference(x: np.ndarray) -> np.ndarray:
        z = _logits(linear_classifier_graph, x)
        s = -np.sort(-z, axis=1)
        rows = np.arange(len(z))
        if not target:
            others = np.where(np.eye(10, dtype=bool)[labels], -np.inf, z).max(axis=1)
            return -(z[rows, labels] - others) / (s[:, 0] - s[:, 2] + 1e-12)
        y = labels if true else np.where(np.eye(10, dtype=bool)[targets], -np.inf, z).argmax(axis=1)
        return -(z[rows, y] - z[rows, targets]) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12)

    np.testing.assert_allclose(loss, reference(images), rtol=1e-4, atol=1e-5)
    direction = np.random.default_rng(13).standard_normal(images.shape)
    h = 1e-3
    numeric = (reference(images + h * direction) - reference(images - h * direction)) / (2 * h)
    analytic = (grad.astype(np.float64) * direction).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=1e-6)


def test_progress_history_and_steps(linear_classifier_graph: LinearGraph) -> None:
    images, labels = _batch(linear_classifier_graph, 3, seed=14)
    seen: list[int] = []
    result = APGD(eps=0.05, steps=12, restarts=2)(
        images, _victim(linear_classifier_graph, labels), on_step=seen.append, init=np.zeros_like(images)
    )
    assert not result.success[KEY].any()
    assert seen == list(range(1, 25))
    assert result.history[KEY].shape == (24, 3)
    np.testing.assert_array_equal(result.steps, [24, 24, 24])


def test_rejects_bad_hyperparameters() -> None:
    with pytest.raises(InputError, match="eps"):
        APGD(eps=-1.0)
    with pytest.raises(InputError, match="loss"):
        APGD(loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="rho"):
        APGD(rho=0.0)
    with pytest.raises(InputError, match="norm"):
        APGD(norm="l1")  # type: ignore[arg-type]


def test_images_larger_than_the_model_keep_their_own_grid(linear_classifier_graph: LinearGraph) -> None:
    """32 x 32 images reach the 16 x 16 model through a resize; budget and quantisation stay in 32 x 32."""
    rng = np.random.default_rng(15)
    images = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    session = AttackSession(linear_classifier_graph.path, device="cpu")
    view = ClassifierView(session, (32, 32))
    labels = view.log_probs(images).argmax(axis=1)
    victims = [Victim(session, np.eye(10, dtype=np.float32)[labels], name=KEY)]
    result = APGD(loss="dlr", eps=8.0, steps=20)(images, victims, quantize=True)
    assert result.images.shape == images.shape
    assert np.abs(result.images - images).max() <= 8.0
    np.testing.assert_array_equal(result.success[KEY], view.log_probs(result.images).argmax(axis=1) != labels)
    assert result.success[KEY].all()


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("quantize", [False, True])
def test_l2_stays_in_its_ball_the_range_and_the_mask(
    linear_classifier_graph: LinearGraph, loss: str, quantize: bool
) -> None:
    images, labels = _batch(linear_classifier_graph, 6, seed=16)
    size = linear_classifier_graph.size
    mask = np.ones((size, size), np.float32)
    mask[:, :5] = 0.0
    attack = APGD(loss=loss, eps=40.0, steps=20, norm="l2", target_classes=3)  # type: ignore[arg-type]
    result = attack(images, _victim(linear_classifier_graph, labels), mask=mask, quantize=quantize)
    norms = np.sqrt(np.square(result.perturbation.astype(np.float64)).sum(axis=(1, 2, 3)))
    assert np.all(norms <= 40.0 + 1e-3) and norms.max() > 10.0
    assert result.images.min() >= 0 and result.images.max() <= 255
    np.testing.assert_array_equal(result.images[:, :, :5], images[:, :, :5])
    if quantize:
        assert np.array_equal(result.images, np.rint(result.images))
    np.testing.assert_array_equal(
        result.success[KEY], _logits(linear_classifier_graph, result.images).argmax(axis=1) != labels
    )


def test_l2_dlr_breaks_just_above_the_l2_boundary_and_never_below_it(
    linear_classifier_graph: LinearGraph,
) -> None:
    """The L2 distance to the boundary with class j is ``(z_y - z_j) / ||w_y - w_j||_2`` (0..1 units)."""
    images, labels = _batch(linear_classifier_graph, 6, seed=17, lo=96, hi=160)
    z, w = _logits(linear_classifier_graph, images), linear_classifier_graph.weights.astype(np.float64)
    session = AttackSession(linear_classifier_graph.path, device="cpu")
    for i, y in enumerate(labels):
        distance = min(
            (z[i, y] - z[i, j]) / np.linalg.norm(w[:, y] - w[:, j]) * 255 for j in range(10) if j != y
        )
        one = [Victim(session, np.eye(10, dtype=np.float32)[labels[i : i + 1]], name=KEY)]
        above = APGD(loss="dlr", eps=1.1 * distance, steps=50, norm="l2")(images[i : i + 1], one)
        below = APGD(loss="dlr", eps=0.95 * distance, steps=50, norm="l2")(images[i : i + 1], one)
        assert above.success[KEY][0], f"image {i} at 1.1x its L2 distance {distance:.3f}"
        assert not below.success[KEY][0], f"image {i} broken below its L2 distance {distance:.3f}"


def test_the_step_size_halves_on_the_papers_two_conditions() -> None:
    span, rho = 16, 0.75  # 12 of 16 raising steps is exactly rho: not below it
    raised = np.array([11, 12, 12, 12, 16])
    halved_before = np.array([False, False, False, True, False])
    best_before = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    best = np.array([2.0, 2.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(
        _halves(raised, span, rho, halved_before, best, best_before), [True, False, True, False, True]
    )


def test_more_restarts_break_a_superset(linear_classifier_graph: LinearGraph) -> None:
    """The first run is the same for the same seed; later runs only add images."""
    images, labels = _batch(linear_classifier_graph, 10, seed=18)
    victims = _victim(linear_classifier_graph, labels)
    one = APGD(loss="ce", eps=1.0, steps=10)(images, victims, seed=5)
    three = APGD(loss="ce", eps=1.0, steps=10, restarts=3)(images, victims, seed=5)
    assert 0 < one.success[KEY].sum() < len(labels)
    assert np.all(three.success[KEY][one.success[KEY]])
    np.testing.assert_array_equal(three.images[one.success[KEY]], one.images[one.success[KEY]])
    assert three.history[KEY].shape == (30, 10)
    assert np.isnan(three.history[KEY][10:, one.success[KEY]]).all()
