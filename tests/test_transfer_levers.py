"""Transfer levers of issue 27 in the cloak: the mirrored, grey and blurred views, the centroid of views,
a far target, helpers that steer without gating.

On the astronaut (scikit-image) and the shipped ``mobileface``, so a fresh clone runs them. What each
lever buys is measured, not asserted here: ``bench/RESULTS.md``, runs 18, 22 and 29.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from numpy.typing import NDArray

from uncnn_rt.runtime import cloak
from uncnn_rt.runtime.cloak.photo import far_directions, view_centroids
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.geometry.faces import embed, find_faces
from uncnn_rt.runtime.geometry.warp import Warp
from uncnn_rt.runtime.imageio import LoadedImage
from uncnn_rt.runtime.sessions import AttackSession

NAME = "mobileface"


def test_the_centroid_of_two_views_is_the_mean_of_the_crop_and_its_mirror(
    mobileface_alone: list[AttackSession], astronaut_photo: LoadedImage
) -> None:
    (session,) = mobileface_alone
    site = find_faces(astronaut_photo.rgb, cloak.load_detector())[0]
    size = session.info.canonical_size
    crop = Warp(site.crop_to_photo, astronaut_photo.rgb.shape, size).apply(astronaut_photo.rgb)[None]
    both = session.features(np.concatenate([crop, crop[:, :, ::-1]]).astype(np.float32))
    expected = both.sum(axis=0) / np.linalg.norm(both.sum(axis=0))
    got = view_centroids(astronaut_photo.rgb, site, size, mobileface_alone, 2, np.random.default_rng(0))[NAME]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # More views (jittered crops) stay near the face's own embedding, as views of one person should.
    many = view_centroids(astronaut_photo.rgb, site, size, mobileface_alone, 8, np.random.default_rng(0))[
        NAME
    ]
    clean = embed(astronaut_photo.rgb, site, mobileface_alone)[NAME]
    assert float(np.linalg.norm(many)) == pytest.approx(1.0, abs=1e-5)
    assert float(many @ clean) > 0.8


def test_levers_steer_the_attack_but_the_verdict_stays_on_the_clean_face(
    mobileface_alone: list[AttackSession], astronaut_photo: LoadedImage
) -> None:
    settings = replace(cloak.MODES["mid"], centroid=6, mirror=0.5, grey=0.25, blurred=0.5, far=0.3)
    detector = cloak.load_detector()
    draw = np.random.default_rng(0).standard_normal((2, mobileface_alone[0].info.embedding_dim))
    pool = {NAME: (draw / np.linalg.norm(draw, axis=1, keepdims=True)).astype(np.float32)}
    first, again = (
        cloak.cloak_image(
            astronaut_photo,
            recognizers=mobileface_alone,
            detector=detector,
            mode=settings,
            seed=3,
            far_targets=pool,
        )
        for _ in range(2)
    )
    np.testing.assert_array_equal(first.image, again.image)  # deterministic for its seed
    (face,) = first.faces
    clean = embed(astronaut_photo.rgb, face.site, mobileface_alone)[NAME]
    np.testing.assert_allclose(face.references[NAME], clean, atol=1e-6)
    plain = cloak.cloak_image(
        astronaut_photo, recognizers=mobileface_alone, detector=detector, mode=cloak.MODES["mid"], seed=3
    )
    assert not np.array_equal(plain.image, first.image)  # the levers did change the attack


def test_a_helper_steers_the_cloak_and_the_verdict_stays_the_ensembles(
    mobileface_alone: list[AttackSession], astronaut_photo: LoadedImage
) -> None:
    """``helpers``: another family's recognizer (openface, 96 px) joins the gradients; the outcomes, the
    verdict and the margin checks are mobileface's alone."""
    detector = cloak.load_detector()
    helper = cloak.load_recognizers(["openface"], device="cpu")
    steered = cloak.cloak_image(
        astronaut_photo, recognizers=mobileface_alone, detector=detector, seed=3, helpers=helper
    )
    plain = cloak.cloak_image(astronaut_photo, recognizers=mobileface_alone, detector=detector, seed=3)
    assert steered.models == (NAME,) and steered.helpers == ("openface",)
    assert [o.name for f in steered.faces for o in f.outcomes] == [NAME]
    assert not np.array_equal(plain.image, steered.image)  # the helper did steer the change
    with pytest.raises(InputError, match="distinct names"):
        cloak.cloak_image(
            astronaut_photo, recognizers=mobileface_alone, detector=detector, helpers=mobileface_alone
        )
    with pytest.raises(InputError, match="helper_weight > 0"):
        cloak.cloak_image(
            astronaut_photo,
            recognizers=mobileface_alone,
            detector=detector,
            helpers=helper,
            mode=replace(cloak.MODES["mid"], helper_weight=0.0),
        )


def test_far_directions_aim_at_the_farthest_identity_in_every_space() -> None:
    """The far target is one identity for every recognizer: the pool's person of least cosine to the
    face, averaged over the recognizers, even where one recognizer alone would pick another."""
    rng = np.random.default_rng(5)

    def unit(x: NDArray[np.float64]) -> NDArray[np.float32]:
        return np.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), np.float32)

    clean = {"a": unit(rng.standard_normal(16)), "b": unit(rng.standard_normal(8))}
    # Person 1 is far from the face for both recognizers; person 2 is the farthest for "a" alone.
    pool = {
        "a": unit(np.stack([clean["a"] + 0.1 * rng.standard_normal(16), -clean["a"] + rng.standard_normal(16),
                            -clean["a"] + 0.1 * rng.standard_normal(16)])),
        "b": unit(np.stack([clean["b"], -clean["b"] + 0.5 * rng.standard_normal(8),
                            clean["b"] + 0.2 * rng.standard_normal(8)])),
    }  # fmt: skip
    k, towards = far_directions(clean, pool)
    assert k == 1 and far_directions({"a": clean["a"]}, {"a": pool["a"]})[0] == 2
    for n, d in towards.items():
        # The unit part of the target off the clean embedding: a move along it raises the cosine to it.
        assert abs(float(np.linalg.norm(d)) - 1) < 1e-5 and abs(float(d @ clean[n])) < 1e-5
        assert float(d @ pool[n][1]) > 0.1
    # A target exactly opposite the face: moving away already moves towards it, no steer.
    _, opposite = far_directions({"b": clean["b"]}, {"b": -clean["b"][None]})
    assert not opposite["b"].any()
    with pytest.raises(InputError, match="no embeddings for b"):
        far_directions(clean, {"a": pool["a"]})
    with pytest.raises(InputError, match="same K"):
        far_directions(clean, {"a": pool["a"], "b": pool["b"][:2]})


def test_a_model_past_its_margin_keeps_the_met_share_of_the_steps() -> None:
    """The focus of the ensemble: each model's share is its distance from the margin relative to the
    farthest; a model past the margin drops out (0) unless ``met`` keeps it steering."""
    from uncnn_rt.runtime.attacks.criteria import ModelState
    from uncnn_rt.runtime.attacks.sampling import MIN_SHARE, shares

    def state(similarity: float) -> ModelState:
        one = np.ones((1, 4), np.float32)
        return ModelState("face", 0.5, one, np.array([similarity], np.float32), one)

    # Margin 0.05: the goal is 0.45; distances 0.35, 0.07 and met (0.30 is 0.15 past the goal).
    states = {"far": state(0.80), "near": state(0.52), "past": state(0.30)}
    plain = shares(states, targeted=False, margin=0.05)
    kept = shares(states, targeted=False, margin=0.05, met=0.3)
    assert plain["far"][0] == pytest.approx(1.0)
    assert plain["near"][0] == pytest.approx(max(0.07 / 0.35, MIN_SHARE), rel=1e-4)
    assert plain["past"][0] == 0.0
    assert kept["past"][0] == pytest.approx(0.3)
    assert kept["far"][0] == plain["far"][0] and kept["near"][0] == plain["near"][0]


def test_a_classifier_that_met_its_criterion_leaves_the_draw_unless_met_keeps_it() -> None:
    from uncnn_rt.runtime.attacks.criteria import ModelState
    from uncnn_rt.runtime.attacks.sampling import shares

    # Untargeted classifier: met once the reference (true) class is no longer the top one.
    flipped = ModelState(
        "classifier", None, np.log(np.array([[0.1, 0.9]], np.float32)), np.log(np.array([0.1], np.float32)),
        np.array([[1.0, 0.0]], np.float32),
    )  # fmt: skip
    held = ModelState(
        "classifier", None, np.log(np.array([[0.9, 0.1]], np.float32)), np.log(np.array([0.9], np.float32)),
        np.array([[1.0, 0.0]], np.float32),
    )  # fmt: skip
    states = {"held": held, "flipped": flipped}
    assert shares(states, targeted=False, margin=0.05)["flipped"][0] == 0.0
    assert shares(states, targeted=False, margin=0.05)["held"][0] == pytest.approx(1.0)
    assert shares(states, targeted=False, margin=0.05, met=0.25)["flipped"][0] == pytest.approx(0.25)
