"""FAB (L-inf, untargeted and FAB-T) against the linear classifier, whose boundaries are known exactly:
between classes ``y`` and ``j`` the smallest L-inf change is ``margin / ||w_y - w_j||_1 * 255`` (pixel
units, where the pixel range does not bind), and the linear approximation FAB makes is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import LinearGraph, _common_meta, _constants, _graph_io, _save
from onnx import helper, numpy_helper
from scipy.optimize import linprog

from uncnn_rt.runtime import contract
from uncnn_rt.runtime.attacks.classifier import ClassifierView
from uncnn_rt.runtime.attacks.criteria import Misclassified
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.attacks.fab import FAB, project_linf
from uncnn_rt.runtime.attacks.linear import Resize
from uncnn_rt.runtime.attacks.pgd import LinfPGD
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession

KEY = "linear_classifier"


def _logits(graph: LinearGraph, images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0 - 0.5
    return x @ graph.weights.astype(np.float64) + graph.bias


def _minimal_distance(graph: LinearGraph, images: np.ndarray) -> np.ndarray:
    """``[N]``: the exact L-inf distance (0..255) from each image to the nearest other class."""
    z = _logits(graph, images)
    y = z.argmax(axis=1)
    w = graph.weights.astype(np.float64)
    out = []
    for i in range(len(images)):
        out.append(
            min(
                (z[i, y[i]] - z[i, j]) / np.abs(w[:, y[i]] - w[:, j]).sum() * 255.0
                for j in range(w.shape[1])
                if j != y[i]
            )
        )
    return np.asarray(out)


def _victim(graph: LinearGraph, classes: np.ndarray) -> list[Victim]:
    session = AttackSession(graph.path, device="cpu")
    return [Victim(session, np.eye(10, dtype=np.float32)[classes])]


def _near_grey(n: int, seed: int = 0) -> np.ndarray:
    """Images whose minimal adversarial changes no pixel by more than a few grey levels, so the pixel
    range never binds and the closed-form distance is exact."""
    return np.random.default_rng(seed).uniform(96, 160, (n, 16, 16, 3)).astype(np.float32)


def _labels(graph: LinearGraph, images: np.ndarray) -> np.ndarray:
    return _logits(graph, images).argmax(axis=1)


def _linf(result_images: np.ndarray, images: np.ndarray) -> np.ndarray:
    return np.abs(result_images.astype(np.float64) - images).reshape(len(images), -1).max(axis=1)


@pytest.mark.parametrize("seed", range(6))
def test_the_projection_is_the_linear_programs_optimum(seed: int) -> None:
    """min ||d||_inf s.t. w . d = r, lower <= d <= upper, against scipy's LP solver (variables d, t;
    minimise t with -t <= d_i <= t); small boxes make the box bind on some rows."""
    rng = np.random.default_rng(seed)
    m, n = 5, 12
    w = rng.standard_normal((m, n)) * (rng.uniform(size=(m, n)) > 0.2)
    lower = -rng.uniform(0.0, 1.5, (m, n))
    upper = rng.uniform(0.0, 1.5, (m, n))
    r = rng.standard_normal(m) * 2.0
    d = project_linf(w, r, lower, upper)
    for i in range(m):
        cost = np.r_[np.zeros(n), 1.0]
        a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
        bounds = [(lower[i, k], upper[i, k]) for k in range(n)] + [(0, None)]
        lp = linprog(
            cost, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w[i], 0.0][None], b_eq=[r[i]], bounds=bounds
        )
        if lp.status == 0:
            assert np.dot(w[i], d[i]) == pytest.approx(r[i], abs=1e-9)
            assert np.all(d[i] >= lower[i] - 1e-12) and np.all(d[i] <= upper[i] + 1e-12)
            assert np.abs(d[i]).max() == pytest.approx(lp.fun, rel=1e-7, abs=1e-9)
        else:
            # Infeasible: the box's corner closest to the hyperplane.
            assert lp.status == 2
            corner = np.where(w[i] * np.sign(r[i]) > 0, upper[i], lower[i]) * (w[i] != 0)
            np.testing.assert_allclose(d[i], corner)


def test_untargeted_fab_finds_the_minimal_distance(linear_classifier_graph: LinearGraph) -> None:
    images = _near_grey(8)
    labels = _labels(linear_classifier_graph, images)
    truth = _minimal_distance(linear_classifier_graph, images)
    result = FAB(eps=255.0, steps=100)(images, _victim(linear_classifier_graph, labels))
    found = _linf(result.images, images)
    assert result.success[KEY].all()
    assert np.all(found >= truth * (1 - 1e-4)), "no attack can beat the exact distance"
    assert np.all(found <= truth * 1.03), (found / truth).round(4).tolist()
    assert np.all(np.argmax(_logits(linear_classifier_graph, result.images), axis=1) != labels)


def test_fab_t_breaks_exactly_the_images_within_eps(linear_classifier_graph: LinearGraph) -> None:
    """FAB-T (9 target classes) breaks every image whose minimal distance is below eps (by 3%), and
    none above it (which no attack can); eps sits in the widest gap between the distances."""
    images = _near_grey(16, seed=3)
    labels = _labels(linear_classifier_graph, images)
    truth = _minimal_distance(linear_classifier_graph, images)
    ordered = np.sort(truth)
    gap = int(np.argmax(ordered[1:] / ordered[:-1]))
    eps = float(np.sqrt(ordered[gap] * ordered[gap + 1]))
    assert ordered[gap + 1] / ordered[gap] > 1.08, "the test needs distances on both sides of eps"
    result = FAB(eps=eps, steps=100, target_classes=9)(images, _victim(linear_classifier_graph, labels))
    np.testing.assert_array_equal(result.success[KEY], truth < eps)
    assert np.all(_linf(result.images, images) <= eps + 1e-4)
    # Success is what the returned images show.
    broken = np.argmax(_logits(linear_classifier_graph, result.images), axis=1) != labels
    np.testing.assert_array_equal(result.success[KEY], broken)
    # Each run after the first attacks only the images the earlier ones left unbroken.
    assert np.all(result.steps[truth > eps] == 9 * 100)
    assert result.history[KEY].shape == (9 * 100, 16)


def test_fab_t_distance_matches_the_minimal_one(linear_classifier_graph: LinearGraph) -> None:
    images = _near_grey(6, seed=5)
    labels = _labels(linear_classifier_graph, images)
    truth = _minimal_distance(linear_classifier_graph, images)
    result = FAB(eps=255.0, steps=100, target_classes=9)(images, _victim(linear_classifier_graph, labels))
    found = _linf(result.images, images)
    # The first target (the runner-up by clean logits) need not be the closest boundary, so FAB-T's
    # first success may be up to a few times farther: compare with the distance to that target's
    # boundary instead, and with the true minimum where the two classes agree.
    assert result.success[KEY].all()
    assert np.all(found >= truth * (1 - 1e-4))
    z = _logits(linear_classifier_graph, images)
    runner_up = np.argsort(-z, axis=1)[:, 1]
    w = linear_classifier_graph.weights.astype(np.float64)
    to_target = np.array(
        [
            (z[i, labels[i]] - z[i, runner_up[i]]) / np.abs(w[:, labels[i]] - w[:, runner_up[i]]).sum() * 255
            for i in range(len(images))
        ]
    )
    assert np.all(found <= to_target * 1.03), (found / to_target).round(4).tolist()


def test_it_never_leaves_the_budget_or_the_pixel_range(linear_classifier_graph: LinearGraph) -> None:
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (6, 16, 16, 3)).astype(np.float32)
    images[0] = 0.0  # every box binds on one side
    images[1] = 255.0
    labels = _labels(linear_classifier_graph, images)
    mask = rng.uniform(0.0, 1.0, (16, 16)).astype(np.float32)
    for m in (None, mask):
        result = FAB(eps=3.0, steps=30, restarts=2)(images, _victim(linear_classifier_graph, labels), mask=m)
        bound = 3.0 * (np.ones((16, 16)) if m is None else m)[None, :, :, None]
        assert np.all(np.abs(result.perturbation) <= bound + 1e-4)
        assert result.images.min() >= 0.0 and result.images.max() <= 255.0


def test_quantize_gives_integers_and_honest_success(linear_classifier_graph: LinearGraph) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    labels = _labels(linear_classifier_graph, images)
    truth = _minimal_distance(linear_classifier_graph, images)
    for eps in (1.0, 4.0, 2.5):
        result = FAB(eps=eps, steps=40)(images, _victim(linear_classifier_graph, labels), quantize=True)
        np.testing.assert_array_equal(result.images, np.rint(result.images))
        assert np.all(np.abs(result.perturbation) <= np.floor(eps))
        predicted = np.argmax(_logits(linear_classifier_graph, result.images), axis=1)
        np.testing.assert_array_equal(result.success[KEY], predicted != labels)
        assert not result.success[KEY][truth > eps].any()
    assert result.success[KEY].any(), "the test needs some images broken after rounding"


def test_eps_zero_breaks_nothing_and_changes_nothing(linear_classifier_graph: LinearGraph) -> None:
    images = _near_grey(4)
    labels = _labels(linear_classifier_graph, images)
    for target_classes in (0, 9):
        result = FAB(eps=0.0, steps=20, target_classes=target_classes)(
            images, _victim(linear_classifier_graph, labels)
        )
        assert not result.success[KEY].any()
        np.testing.assert_array_equal(result.images, images)


def test_a_large_eps_breaks_everything(linear_classifier_graph: LinearGraph) -> None:
    images = np.random.default_rng(4).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    labels = _labels(linear_classifier_graph, images)
    result = FAB(eps=32.0, steps=50)(images, _victim(linear_classifier_graph, labels))
    assert result.success[KEY].all()
    assert np.all(result.objective[KEY] < 0), "the margin of a misclassified image is negative"


def test_misclassified_images_count_as_broken_unchanged(linear_classifier_graph: LinearGraph) -> None:
    images = _near_grey(4)
    labels = _labels(linear_classifier_graph, images)
    wrong = (labels + 1) % 10
    result = FAB(eps=4.0, steps=10)(images, _victim(linear_classifier_graph, wrong))
    assert result.success[KEY].all()
    np.testing.assert_array_equal(result.images, images)
    assert np.all(result.steps == 0)


def test_targeted_mode_reaches_the_target(linear_classifier_graph: LinearGraph) -> None:
    images = np.random.default_rng(5).uniform(0, 255, (6, 16, 16, 3)).astype(np.float32)
    labels = _labels(linear_classifier_graph, images)
    targets = (labels + np.arange(1, 7)) % 10
    result = FAB(eps=64.0, steps=100)(images, _victim(linear_classifier_graph, targets), targeted=True)
    predicted = np.argmax(_logits(linear_classifier_graph, result.images), axis=1)
    np.testing.assert_array_equal(predicted, targets)
    assert result.success[KEY].all()
    assert np.all(result.objective[KEY] > 0)


def test_the_same_seed_gives_the_same_result(linear_classifier_graph: LinearGraph) -> None:
    images = np.random.default_rng(6).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    labels = _labels(linear_classifier_graph, images)
    attack = FAB(eps=1.0, steps=15, restarts=3)  # small eps: the random restarts run
    first = attack(images, _victim(linear_classifier_graph, labels), seed=7)
    second = attack(images, _victim(linear_classifier_graph, labels), seed=7)
    assert (first.steps == 45).any(), "the restarts must run for the test to mean anything"
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.history[KEY], second.history[KEY])
    other = attack(images, _victim(linear_classifier_graph, labels), seed=8)
    assert not np.array_equal(first.history[KEY], other.history[KEY])


def test_luminance_only_keeps_grey_images_grey(linear_classifier_graph: LinearGraph) -> None:
    grey = np.random.default_rng(7).uniform(0, 255, (5, 16, 16, 1)).astype(np.float32)
    images = np.repeat(grey, 3, axis=3)
    labels = _labels(linear_classifier_graph, images)
    result = FAB(eps=24.0, steps=40, restarts=2)(
        images, _victim(linear_classifier_graph, labels), luminance_only=True
    )
    assert result.success[KEY].any()
    np.testing.assert_array_equal(result.images[..., 0], result.images[..., 1])
    np.testing.assert_array_equal(result.images[..., 0], result.images[..., 2])


def test_masked_pixels_never_change(linear_classifier_graph: LinearGraph) -> None:
    images = np.random.default_rng(8).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    labels = _labels(linear_classifier_graph, images)
    mask = np.zeros((16, 16), np.float32)
    mask[:, :8] = 1.0
    result = FAB(eps=64.0, steps=40, restarts=2, target_classes=3)(
        images, _victim(linear_classifier_graph, labels), mask=mask
    )
    assert result.success[KEY].any()
    np.testing.assert_array_equal(result.images[:, :, 8:], images[:, :, 8:])


def test_a_masked_budget_is_the_weighted_distance(linear_classifier_graph: LinearGraph) -> None:
    """With mask ``m`` FAB minimises ``max_i |d_i| / m_i``: for a uniform mask 0.5 the pixel distance is
    the unmasked one and the budget that breaks it doubles."""
    images = _near_grey(4, seed=9)
    labels = _labels(linear_classifier_graph, images)
    truth = _minimal_distance(linear_classifier_graph, images)
    half = np.full((16, 16), 0.5, np.float32)
    result = FAB(eps=255.0, steps=100)(images, _victim(linear_classifier_graph, labels), mask=half)
    found = _linf(result.images, images)
    assert np.all((found >= truth * (1 - 1e-4)) & (found <= truth * 1.03))
    eps = float(np.median(truth)) * 1.5
    below = FAB(eps=eps, steps=100)(images, _victim(linear_classifier_graph, labels), mask=half)
    np.testing.assert_array_equal(below.success[KEY], 2 * truth * 1.03 < eps)


def test_on_step_history_and_stop_when(linear_classifier_graph: LinearGraph) -> None:
    images = _near_grey(4)
    labels = _labels(linear_classifier_graph, images)
    calls: list[int] = []
    result = FAB(eps=255.0, steps=12, target_classes=2)(
        images, _victim(linear_classifier_graph, labels), on_step=calls.append
    )
    assert result.success[KEY].all()
    assert calls == list(range(1, 13)), "the second target finds every image broken and does not run"
    assert result.history[KEY].shape == (12, 4) and np.isfinite(result.history[KEY]).all()
    stopped = FAB(eps=255.0, steps=12)(
        images, _victim(linear_classifier_graph, labels), stop_when=Misclassified(KEY)
    )
    assert stopped.success[KEY].all()
    assert np.all(stopped.steps < 12)


def test_bad_arguments_are_refused(linear_classifier_graph: LinearGraph) -> None:
    images = _near_grey(2)
    labels = _labels(linear_classifier_graph, images)
    with pytest.raises(InputError, match="target_classes"):
        FAB(target_classes=9)(images, _victim(linear_classifier_graph, labels), targeted=True)
    with pytest.raises(InputError, match="integer-valued"):
        FAB()(images + 0.5, _victim(linear_classifier_graph, labels), quantize=True)
    with pytest.raises(InputError, match="eta"):
        FAB(eta=0.5)
    with pytest.raises(InputError, match="steps"):
        FAB(steps=0)


def test_an_init_outside_the_budget_still_returns_images_inside(linear_classifier_graph: LinearGraph) -> None:
    rng = np.random.default_rng(10)
    images = rng.uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    labels = _labels(linear_classifier_graph, images)
    init = rng.uniform(-60, 60, images.shape).astype(np.float32)
    result = FAB(eps=2.0, steps=10)(images, _victim(linear_classifier_graph, labels), init=init)
    assert np.all(np.abs(result.perturbation) <= 2.0 + 1e-4)
    with pytest.raises(InputError, match="init"):
        FAB(eps=2.0, steps=1)(images, _victim(linear_classifier_graph, labels), init=init[:2])


def test_images_larger_than_the_model_attack_through_the_resize(linear_classifier_graph: LinearGraph) -> None:
    """32x32 images reach the 16x16 model through the view's resize (linear), the gradient back through
    its adjoint: the composition is a linear classifier on 32x32 images, with weights ``R^T W / 255``,
    and FAB finds its minimal distance."""
    images = np.random.default_rng(11).uniform(96, 160, (4, 32, 32, 3)).astype(np.float32)
    resize = Resize((32, 32), (16, 16))
    seen = resize.forward(images)
    z = _logits(linear_classifier_graph, seen)
    labels = z.argmax(axis=1)
    w = linear_classifier_graph.weights.astype(np.float64)
    truth = []
    for i in range(len(images)):
        per_class = []
        for j in range(10):
            if j != labels[i]:
                normal = (w[:, j] - w[:, labels[i]]).reshape(1, 16, 16, 3).astype(np.float32) / 255.0
                per_class.append((z[i, labels[i]] - z[i, j]) / np.abs(resize.adjoint(normal)).sum())
        truth.append(min(per_class))
    result = FAB(eps=255.0, steps=60)(images, _victim(linear_classifier_graph, labels))
    assert result.success[KEY].all()
    found = _linf(result.images, images)
    assert np.all((found >= np.array(truth) * (1 - 1e-3)) & (found <= np.array(truth) * 1.05))


def test_quantized_fab_finds_the_minimal_integer_distance(linear_classifier_graph: LinearGraph) -> None:
    """On integer images the smallest integer L-inf change is ``ceil(distance)`` (the minimal real
    change's signs at that radius; no integer radius below it reaches the boundary), and FAB with
    ``quantize`` finds it: rounding its iterates to the nearest integer alone would often fall short."""
    images = np.rint(np.random.default_rng(12).uniform(40, 215, (8, 16, 16, 3))).astype(np.float32)
    labels = _labels(linear_classifier_graph, images)
    truth = _minimal_distance(linear_classifier_graph, images)
    assert np.ptp(np.ceil(truth)) > 0, "the test needs more than one integer distance"
    result = FAB(eps=255.0, steps=100)(images, _victim(linear_classifier_graph, labels), quantize=True)
    assert result.success[KEY].all()
    np.testing.assert_array_equal(_linf(result.images, images), np.ceil(truth))


def _relu_classifier(path: Path, size: int = 16, hidden: int = 64, classes: int = 10) -> Path:
    """A one-hidden-layer ReLU classifier attack graph, its gradient written out by hand: ``logits =
    relu(x W1 + b1) W2 + b2`` with ``x = flatten(image) / 255 - 0.5``; the gradient of ``features . r``
    is ``((r - softmax sum(r)) W2^T * [h > 0]) W1^T / 255``."""
    rng = np.random.default_rng(2)
    d = size * size * 3
    w1 = (rng.standard_normal((d, hidden)) / np.sqrt(d) * 6).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden) * 2).astype(np.float32)
    n = helper.make_node
    nodes = [
        n("Reshape", ["image", "flat_shape"], ["flat"]),
        n("Mul", ["flat", "inv255"], ["unit"]),
        n("Sub", ["unit", "half"], ["x"]),
        n("MatMul", ["x", "W"], ["xw"]),
        n("Add", ["xw", "b1"], ["pre"]),
        n("Relu", ["pre"], ["h"]),
        n("MatMul", ["h", "W2"], ["hw"]),
        n("Add", ["hw", "b2"], ["logits"]),
        n("LogSoftmax", ["logits"], [contract.OUTPUT_FEATURES], axis=1),
        n("Mul", [contract.OUTPUT_FEATURES, contract.INPUT_REFERENCE], ["fr"]),
        n("ReduceSum", ["fr", "axis1"], [contract.OUTPUT_OBJECTIVE], keepdims=0),
        n("Softmax", ["logits"], ["p"], axis=1),
        n("ReduceSum", [contract.INPUT_REFERENCE, "axis1"], ["r_sum"], keepdims=1),
        n("Mul", ["p", "r_sum"], ["p_r"]),
        n("Sub", [contract.INPUT_REFERENCE, "p_r"], ["grad_logits"]),
        n("MatMul", ["grad_logits", "W2T"], ["grad_h"]),
        n("Sign", ["h"], ["active"]),
        n("Mul", ["grad_h", "active"], ["grad_pre"]),
        n("MatMul", ["grad_pre", "WT"], ["grad_x"]),
        n("Mul", ["grad_x", "inv255"], ["grad_flat"]),
        n("Reshape", ["grad_flat", "image_shape"], [contract.OUTPUT_GRAD]),
    ]
    initializers = [
        *_constants(size, w1),
        numpy_helper.from_array((rng.standard_normal(hidden) * 0.3).astype(np.float32), "b1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(np.ascontiguousarray(w2.T), "W2T"),
        numpy_helper.from_array((rng.standard_normal(classes) * 0.1).astype(np.float32), "b2"),
    ]
    inputs, outputs = _graph_io(size, classes)
    graph = helper.make_graph(nodes, "relu_classifier", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    labels = json.dumps([f"class_{i}" for i in range(classes)])
    meta = _common_meta("relu_classifier", "classifier", size, classes) | {contract.META_LABELS: labels}
    return _save(model, path, meta)


def test_on_a_relu_network_fab_needs_no_more_than_pgd(tmp_path: Path) -> None:
    """Off the linear model the boundary is curved and FAB's linearisation only local. For each image
    and each of a few budgets at which 60-step PGD breaks it, FAB's distance is at most that budget."""
    session = AttackSession(_relu_classifier(tmp_path / "relu.onnx"), device="cpu")
    view = ClassifierView(session, (16, 16))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (10, 16, 16, 3)).astype(np.float32)
    labels = np.argmax(view.log_probs(images), axis=1)
    # The hand-written gradient against central differences along a random direction.
    c = np.eye(10, dtype=np.float32)[labels] - np.eye(10, dtype=np.float32)[(labels + 1) % 10]
    _, _, grad = view.value_and_grad(images, c)
    direction = rng.standard_normal(images.shape).astype(np.float32)
    ahead = (view.log_probs(images + 1e-2 * direction) * c).sum(axis=1)
    behind = (view.log_probs(images - 1e-2 * direction) * c).sum(axis=1)
    np.testing.assert_allclose((ahead - behind) / 2e-2, (grad * direction).sum(axis=(1, 2, 3)), atol=2e-3)

    victims = [Victim(session, np.eye(10, dtype=np.float32)[labels])]
    result = FAB(eps=255.0, steps=100, target_classes=9)(images, victims)
    assert result.success["relu_classifier"].all()
    found = _linf(result.images, images)
    pgd_broke_any = False
    for eps in (1.0, 2.0, 3.0):
        pgd = LinfPGD(eps=eps, steps=60)(images, victims, seed=0)
        broken = pgd.success["relu_classifier"]
        pgd_broke_any |= broken.any()
        assert np.all(found[broken] <= eps), (eps, found[broken].round(3).tolist())
    assert pgd_broke_any
