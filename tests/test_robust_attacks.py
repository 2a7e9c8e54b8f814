"""The robustness attacks (APGD, Square, FAB, AutoAttack) and the classifier view they share."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LinearGraph

from uncnn_rt.runtime.attacks.classifier import ClassifierView, classifier_of
from uncnn_rt.runtime.attacks.ensemble import Victim
from uncnn_rt.runtime.attacks.linear import Resize
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession


def _logits(graph: LinearGraph, images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1) / 255.0 - 0.5
    return x @ graph.weights + graph.bias


def test_a_zero_sum_combination_differentiates_the_logits_exactly(
    linear_classifier_graph: LinearGraph,
) -> None:
    """``c . log_softmax(z)`` with ``sum(c) = 0`` is ``c . z``: its value and gradient are the logits'
    (the linear classifier's gradient is ``W c / 255``, known in closed form)."""
    session = AttackSession(linear_classifier_graph.path, device="cpu")
    size = linear_classifier_graph.size
    view = ClassifierView(session, (size, size))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    c = np.zeros((3, view.classes), np.float32)
    c[np.arange(3), [1, 4, 7]] = 1.0
    c[np.arange(3), [0, 2, 9]] = -1.0
    log_probs, value, grad = view.value_and_grad(images, c)
    z = _logits(linear_classifier_graph, images)
    np.testing.assert_allclose(value, (z * c).sum(axis=1), rtol=1e-4, atol=1e-4)
    expected = (c @ linear_classifier_graph.weights.T / 255.0).reshape(images.shape)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, rtol=1e-5)
    assert view.forward_calls == 3 and view.gradient_calls == 3


def test_the_view_resizes_to_the_model_and_back(linear_classifier_graph: LinearGraph) -> None:
    session = AttackSession(linear_classifier_graph.path, device="cpu")
    size = linear_classifier_graph.size
    view = ClassifierView(session, (2 * size, 2 * size))
    images = np.random.default_rng(1).uniform(0, 255, (2, 2 * size, 2 * size, 3)).astype(np.float32)
    c = np.zeros((2, view.classes), np.float32)
    c[:, 3], c[:, 5] = 1.0, -1.0
    _, _, grad = view.value_and_grad(images, c)
    resize = Resize((2 * size, 2 * size), (size, size))
    direct = (c @ linear_classifier_graph.weights.T / 255.0).reshape(2, size, size, 3).astype(np.float32)
    np.testing.assert_allclose(grad, resize.adjoint(direct), rtol=1e-4, atol=1e-7)


def test_classifier_of_reads_labels_from_one_hot_references(
    linear_classifier_graph: LinearGraph, linear_face_graph: LinearGraph
) -> None:
    session = AttackSession(linear_classifier_graph.path, device="cpu")
    size = linear_classifier_graph.size
    references = np.eye(10, dtype=np.float32)[[2, 7]]
    view, labels = classifier_of([Victim(session, references)], (size, size), None)
    assert labels.tolist() == [2, 7] and view.classes == 10
    with pytest.raises(InputError, match="not a classifier"):
        ClassifierView(AttackSession(linear_face_graph.path, device="cpu"), (16, 16))
    with pytest.raises(InputError, match="one classifier victim"):
        classifier_of([], (size, size), None)


class _Breaks:
    """A stand-in attack that breaks the images whose first pixel is in ``values``, by painting them
    with a pattern the linear classifier calls ``class_to`` (found by search), and records what it saw."""

    def __init__(self, values: set[int], seen: list[list[int]], pattern: np.ndarray) -> None:
        self.values, self.seen, self.pattern = values, seen, pattern

    def __call__(self, images: np.ndarray, victims: list[Victim], **kwargs: object):  # type: ignore[no-untyped-def]
        from uncnn_rt.runtime.attacks.base import AttackResult

        x = np.asarray(images, np.float32)
        self.seen.append([int(v) for v in x[:, 0, 0, 0]])
        hit = np.array([int(v) in self.values for v in x[:, 0, 0, 0]])
        out = x.copy()
        out[hit] = self.pattern
        key = victims[0].key
        n = len(x)
        return AttackResult(
            images=out, originals=x, history={key: np.zeros((0, n), np.float32)},
            objective={key: np.zeros(n, np.float32)}, features={key: np.zeros((n, 10), np.float32)},
            success={key: hit}, steps=np.ones(n, np.int64),
        )  # fmt: skip


def test_autoattack_runs_each_attack_on_the_images_still_robust(
    linear_classifier_graph: LinearGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uncnn_rt.runtime.attacks import autoattack as aa

    session = AttackSession(linear_classifier_graph.path, device="cpu")
    size = linear_classifier_graph.size
    view = ClassifierView(session, (size, size))
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (6, size, size, 3)).astype(np.float32)
    images[:, 0, 0, 0] = np.arange(6) * 10  # the stand-ins tell images apart by this pixel
    labels = np.argmax(view.log_probs(images), axis=1)
    labels[5] = (labels[5] + 1) % 10  # image 5 is misclassified clean: no attack sees it
    # a pattern classified as something other than every label used: the linear model's best image for
    # the class that is nobody's label (or the least used one)
    free = int(np.argmin(np.bincount(labels, minlength=10)))
    pattern = (np.clip(np.sign(linear_classifier_graph.weights[:, free]), 0, 1) * 255).reshape(size, size, 3)
    assert int(np.argmax(view.log_probs(pattern[None])[0])) == free
    seen: list[list[int]] = []
    monkeypatch.setattr(aa, "ATTACKS", {
        "first": lambda eps: _Breaks({0, 20}, seen, pattern),
        "second": lambda eps: _Breaks({30}, seen, pattern),
        "third": lambda eps: _Breaks({10, 40}, seen, pattern),
    })  # fmt: skip
    references = np.eye(10, dtype=np.float32)[labels]
    result = aa.AutoAttack(eps=8, attacks=("first", "second", "third"))(
        images, [Victim(session, references, name="m")]
    )
    assert seen == [[0, 10, 20, 30, 40], [10, 30, 40], [10, 40]]
    assert result.broken_by == ("first", "third", "first", "second", "third", None)
    assert result.clean is not None and result.clean.tolist() == [True] * 5 + [False]
    assert aa.robust_accuracy(result) == 0.0
    assert result.success["m"].tolist() == [True] * 6  # every returned image is misclassified
    with pytest.raises(InputError, match="untargeted"):
        aa.AutoAttack(eps=8)(images, [Victim(session, references, name="m")], targeted=True)
    with pytest.raises(InputError, match="unknown attack"):
        aa.AutoAttack(eps=8, attacks=("nonesuch",))


def test_autoattack_standard_and_plus_follow_the_reference_order() -> None:
    from uncnn_rt.runtime.attacks import autoattack as aa

    assert [name for name, _ in aa.VERSIONS["standard"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [name for name, _ in aa.VERSIONS["plus"]] == [
        "apgd-ce",
        "apgd-dlr",
        "fab",
        "square",
        "apgd-t",
        "fab-t",
    ]
