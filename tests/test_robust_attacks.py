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
