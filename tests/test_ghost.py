"""Ghost attack graphs (model augmentation at attack time, issue 27): ``converters/ghost.py`` and the
ensemble's use of a victim's ghost for its gradients only.

On the shipped ``mobileface`` (the smallest recognizer) and the astronaut's head (scikit-image), so a
fresh clone runs them all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray

from uncnn_rt.converters import ghost as gh
from uncnn_rt.converters import zoo
from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.attacks import Ensemble, Victim
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.sessions import AttackSession, open_session

NAME = "mobileface"


@pytest.fixture(scope="module")
def plain() -> AttackSession:
    return open_session(_shipped(NAME), device="cpu")


@pytest.fixture(scope="module")
def ghost_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, thinned = gh.ghost_graph(onnx.load(str(_shipped(NAME))), rate=0.05, every=3)
    assert thinned >= 3
    path = tmp_path_factory.mktemp("ghost") / f"{NAME}.onnx"
    onnx.save(model, str(path))
    return path


def _shipped(name: str) -> Path:
    return next(e.path for e in catalog.load_manifest() if e.name == name)


def _reference(dim: int, seed: int) -> NDArray[np.float32]:
    r = np.random.default_rng(seed).standard_normal((1, dim)).astype(np.float32)
    return r / np.linalg.norm(r)


def _head() -> NDArray[np.float32]:
    return zoo.source_probe().astype(np.float32)


def test_at_rate_zero_the_ghost_is_the_model(plain: AttackSession, tmp_path: Path) -> None:
    model, _ = gh.ghost_graph(onnx.load(str(_shipped(NAME))), rate=0.0, every=1)
    path = tmp_path / "zero.onnx"
    onnx.save(model, str(path))
    ghost = open_session(path, device="cpu")
    assert ghost.info == plain.info  # the contract's metadata is carried over
    x, ref = _head(), _reference(plain.info.embedding_dim, 0)
    a, b = plain.run(x, ref), ghost.run(x, ref)
    np.testing.assert_allclose(b.features, a.features, atol=1e-5)
    np.testing.assert_allclose(b.grad, a.grad, atol=1e-5 * float(np.abs(a.grad).max()))


def test_the_ghost_thins_the_model_the_same_way_for_the_same_image(
    plain: AttackSession, ghost_file: Path
) -> None:
    ghost = open_session(ghost_file, device="cpu")
    x = _head()
    clean = plain.features(x)[0]
    first, again = ghost.features(x)[0], ghost.features(x.copy())[0]
    np.testing.assert_array_equal(first, again)  # deterministic: the masks are drawn from the image
    # A different image (a one-grey-level shift of the mean) draws other masks: another thinned model.
    other = ghost.features(x + 1.0)[0]
    near = plain.features(x + 1.0)[0]
    assert float(first @ other) < float(clean @ near) - 0.01
    # Thinned, not broken: near the model's own embedding, yet not equal to it (measured 0.98-0.99).
    assert 0.8 < float(first @ clean) < 0.9999


def test_the_ghost_gradient_is_exact_for_its_masks(ghost_file: Path) -> None:
    """Along a zero-mean direction the image's mean, hence every mask, stays put: the directional
    derivative of the ghost's objective equals a central difference of it."""
    ghost = open_session(ghost_file, device="cpu")
    x, ref = _head(), _reference(ghost.info.embedding_dim, 1)
    grad = ghost.run(x, ref).grad
    direction = np.sign(grad).astype(np.float64)
    direction -= direction.mean()
    direction = direction.astype(np.float32)
    analytic = float(np.sum(grad.astype(np.float64) * direction))
    h = min(0.1, 0.02 / analytic)
    numeric = (
        float(ghost.run(x + h * direction, ref).objective[0])
        - float(ghost.run(x - h * direction, ref).objective[0])
    ) / (2 * h)
    assert analytic > 0
    assert numeric == pytest.approx(analytic, rel=0.1)


def test_an_ensemble_takes_gradients_from_the_ghost_and_everything_else_from_the_model(
    plain: AttackSession, ghost_file: Path
) -> None:
    ghost = open_session(ghost_file, device="cpu")
    x, ref = _head(), _reference(plain.info.embedding_dim, 2)
    size = (x.shape[1], x.shape[2])
    with_ghost = Ensemble([Victim(plain, ref, ghost=ghost)], 1, size, targeted=False)
    without = Ensemble([Victim(plain, ref)], 1, size, targeted=False)
    rng = np.random.default_rng(0)
    # Forward checks are the plain model's.
    np.testing.assert_array_equal(with_ghost.evaluate(x)[NAME].features, without.evaluate(x)[NAME].features)
    g_ghost = with_ghost.gradient(x, rng).grad.ravel()
    g_plain = without.gradient(x, rng).grad.ravel()
    cosine = float(g_ghost @ g_plain / np.linalg.norm(g_ghost) / np.linalg.norm(g_plain))
    assert 0.3 < cosine < 0.999  # another model's gradient, of the same model (measured about 0.9)
    # No clean state comes back from a ghost's run: its features are not the model's.
    assert with_ghost.gradient(x, rng).states is None


def test_bad_settings_and_non_attack_graphs_are_refused() -> None:
    model = onnx.load(str(_shipped(NAME)))
    with pytest.raises(InputError, match="dropout rate"):
        gh.ghost_graph(model, rate=0.7)
    with pytest.raises(InputError, match="every"):
        gh.ghost_graph(model, every=0)
    detector = next(e.path for e in catalog.load_manifest() if e.kind == "detector")
    with pytest.raises(ModelError, match="not an attack graph"):
        gh.ghost_graph(onnx.load(str(detector)))


def test_the_command_writes_one_ghost_per_model_and_refuses_unknown_names(tmp_path: Path) -> None:
    assert gh.main([str(tmp_path), "--models", NAME, "--rate", "0.05"]) == 0
    ghost = open_session(tmp_path / f"{NAME}.onnx", device="cpu")
    assert ghost.info.name == NAME
    assert gh.main([str(tmp_path), "--models", "nosuchmodel"]) == 2
