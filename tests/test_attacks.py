"""The attack loop, its budgets, boosters, criteria and ensembles, on the hand-built attack graphs.

Tests on the shipped models (EfficientNet-Lite0, the face recognizers) at the end skip until the model
zoo's manifest lists them.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import LinearGraph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from uncnn_rt.runtime import catalog, image_ops
from uncnn_rt.runtime.attacks import (
    BIM,
    EOT,
    FGSM,
    L2PGD,
    MIFGSM,
    PGD,
    AttackResult,
    Blur,
    BoundCap,
    Chain,
    Downscale,
    Ensemble,
    GradientAttack,
    Grey,
    InputDiversity,
    Jpeg,
    Mirror,
    Misclassified,
    ModelState,
    PastThresholds,
    PerImage,
    PerImageCap,
    Resize,
    ResizePad,
    SimilarityAbove,
    SimilarityBelow,
    TargetReached,
    TranslationInvariance,
    Upsample,
    Victim,
    VisibilityCap,
    resize_matrix,
)
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession, open_session

FloatArray = NDArray[np.float32]


@pytest.fixture(scope="module")
def face(linear_face_graph: LinearGraph) -> AttackSession:
    return AttackSession(linear_face_graph.path, device="cpu")


@pytest.fixture(scope="module")
def face24(linear_face_graph_24: LinearGraph) -> AttackSession:
    return AttackSession(linear_face_graph_24.path, device="cpu")


@pytest.fixture(scope="module")
def classifier(linear_classifier_graph: LinearGraph) -> AttackSession:
    return AttackSession(linear_classifier_graph.path, device="cpu")


def _images(n: int, h: int, w: int | None = None, seed: int = 0) -> FloatArray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w or h, 3)).astype(np.float32)


def _own(session: AttackSession, images: FloatArray) -> Victim:
    """The untargeted cloaking victim: each image's own clean embedding at the model's size."""
    size = session.info.canonical_size
    at_size = (
        images
        if images.shape[1:3] == (size, size)
        else Resize(images.shape[1:3], (size, size)).forward(images)
    )
    return Victim(session, session.features(at_size))


# --- budgets: the property test ---------------------------------------------------------------------------


@st.composite
def _attack_cases(draw: st.DrawFn) -> tuple[GradientAttack, FloatArray, FloatArray | None, bool]:
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(11, 20)), draw(st.integers(11, 20))
    quantize = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, h, w, 3))
    images[rng.random(images.shape) < 0.2] = 0.0  # pixels at the ends of the range
    images[rng.random(images.shape) < 0.2] = 255.0
    images = np.rint(images) if quantize else images
    mask_kind = draw(st.sampled_from(["none", "binary", "soft"]))
    mask = None
    if mask_kind == "binary":
        mask = (rng.random((n, h, w)) < 0.5).astype(np.float32)
    elif mask_kind == "soft":
        mask = rng.random((h, w, 1)).astype(np.float32)
    eps = draw(st.floats(0.0, 24.0))
    l2 = draw(st.none() | st.floats(0.0, 200.0))
    ssim_min = draw(st.none() | st.floats(0.5, 0.99))
    kind = draw(st.sampled_from(["fgsm", "bim", "pgd", "mifgsm", "l2pgd"]))
    steps = draw(st.integers(1, 3))
    coarse = draw(st.sampled_from([1.0, 1.0, 2.5, 4.0]))
    scales = draw(st.sampled_from([(), (), (2.0,), (1.0, 8.0)]))
    schedule = draw(st.sampled_from(["constant", "cosine"]))
    common = {"eps": eps, "l2": l2, "ssim_min": ssim_min, "coarse": coarse}
    common.update(scales=scales, schedule=schedule)
    attack: GradientAttack
    if kind == "fgsm":
        attack = FGSM(**common)
    elif kind == "bim":
        attack = BIM(steps=steps, **common)
    elif kind == "pgd":
        attack = PGD(steps=steps, step_size=eps / 2 + 1, **common)
    elif kind == "mifgsm":
        attack = MIFGSM(steps=steps, **common)
    else:
        attack = L2PGD(
            eps=eps, l2=l2 if l2 is not None else 50.0, steps=steps, ssim_min=ssim_min, coarse=coarse
        )
    return attack, images.astype(np.float32), mask, quantize


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_attack_cases())
def test_budget_and_pixel_range_always_hold(face: AttackSession, case: tuple[GradientAttack, ...]) -> None:
    attack, images, mask, quantize = case
    assert isinstance(attack, GradientAttack)
    result = attack(images, [_own(face, images)], mask=mask, quantize=bool(quantize), seed=1)
    delta = result.images.astype(np.float64) - images
    assert result.images.min() >= 0.0 and result.images.max() <= 255.0
    weights = (
        np.ones_like(images)
        if mask is None
        else np.broadcast_to(
            mask if mask.ndim == 3 and mask.shape[-1] == 1 else mask[..., None], images.shape
        )
    )
    assert np.all(np.abs(delta) <= attack.eps * weights + 1e-3)
    assert np.all(delta[weights == 0] == 0.0)
    if attack.l2 is not None:
        assert np.all(np.sqrt((delta**2).sum(axis=(1, 2, 3))) <= attack.l2 + 1e-3)
    if quantize:
        np.testing.assert_array_equal(result.images, np.rint(result.images))
    if attack.ssim_min is not None:
        assert np.all(image_ops.ssim(images, result.images) >= attack.ssim_min)


def test_fgsm_with_zero_eps_is_the_identity(face: AttackSession) -> None:
    x = _images(3, 16)
    result = FGSM(eps=0.0)(x, [_own(face, x)])
    np.testing.assert_array_equal(result.images, x)
    assert result.steps.tolist() == [1, 1, 1]


def test_fgsm_is_one_signed_step_of_size_eps(face: AttackSession) -> None:
    x = _images(2, 16, seed=5) * 0.5 + 64  # well inside the range, so no pixel clips
    other = face.features(_images(2, 16, seed=6))  # a reference that is not x's own: nonzero gradient
    grad = face.run(x, other).grad
    result = FGSM(eps=4.0)(x, [Victim(face, other)])
    np.testing.assert_allclose(result.perturbation, -4.0 * np.sign(grad), atol=1e-4)  # untargeted descends


# --- attacks on the fixture models ------------------------------------------------------------------------


def test_untargeted_pgd_drives_similarity_below_threshold(face: AttackSession) -> None:
    x = _images(6, 16)
    clean = _own(face, x)
    result = PGD(eps=16, steps=20)(x, [clean], quantize=True, seed=0)
    threshold = face.info.threshold
    assert threshold is not None
    assert np.all(result.objective["linear_face"] < threshold)
    assert result.success["linear_face"].all() and result.succeeded.all()
    assert result.history["linear_face"].shape == (20, 6)
    np.testing.assert_allclose(result.history["linear_face"][0], 1.0, atol=0.05)  # random start near clean
    # the reported similarity is that of the stored 8-bit image
    np.testing.assert_allclose(
        result.objective["linear_face"],
        (face.features(result.to_uint8()) * clean.references).sum(1),
        atol=1e-6,
    )


def test_targeted_pgd_reaches_the_chosen_class(classifier: AttackSession) -> None:
    x = _images(4, 16, seed=2)
    clean = classifier.features(x).argmax(axis=1)
    targets = (clean + 5) % 10
    result = PGD(eps=12, steps=20)(
        x, [Victim(classifier, np.eye(10, dtype=np.float32)[targets])], targeted=True
    )
    np.testing.assert_array_equal(result.features["linear_classifier"].argmax(axis=1), targets)
    assert result.success["linear_classifier"].all()


def test_untargeted_classifier_attack_leaves_the_true_class(classifier: AttackSession) -> None:
    x = _images(4, 16, seed=3)
    labels = classifier.features(x).argmax(axis=1)
    result = BIM(eps=8, steps=10)(x, [Victim(classifier, np.eye(10, dtype=np.float32)[labels])])
    assert np.all(result.features["linear_classifier"].argmax(axis=1) != labels)


def test_ensemble_lowers_every_members_similarity(face: AttackSession, face24: AttackSession) -> None:
    x = _images(4, 32, seed=4)  # the common input: 32x32, seen at 16x16 and 24x24
    victims = [_own(face, x), _own(face24, x)]
    result = PGD(eps=12, steps=20)(x, victims, seed=0)
    for key, threshold in (("linear_face", 0.5), ("linear_face_24", 0.4)):
        assert np.all(result.objective[key] < threshold), key
        assert result.history[key].shape == (20, 4)
    assert result.succeeded.all()


def test_ensemble_gradient_is_the_adjoint_of_the_resize(face24: AttackSession) -> None:
    """The ensemble's gradient on a 20x20 input equals R^T g: check it against central differences."""
    x = _images(2, 20, seed=8) * 0.6 + 50
    refs = face24.features(_images(2, 24, seed=9))
    ensemble = Ensemble([Victim(face24, refs)], 2, (20, 20), targeted=True)
    grad = ensemble.gradient(x, np.random.default_rng(0)).grad.astype(np.float64)
    resize = Resize((20, 20), (24, 24))
    raw = resize.adjoint(face24.run(resize.forward(x), refs).grad).astype(np.float64)
    rng = np.random.default_rng(1)
    for _ in range(3):
        v = rng.standard_normal(x.shape).astype(np.float32)
        plus, minus = (face24.run(resize.forward(x + s * 2.0 * v), refs).objective for s in (1, -1))
        numeric = (plus - minus).astype(np.float64) / 4.0
        np.testing.assert_allclose((raw * v).sum(axis=(1, 2, 3)), numeric, rtol=2e-2, atol=1e-5)
    # the ensemble scales each image's gradient to unit mean magnitude (targeted: no sign flip)
    unit = raw / np.abs(raw).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(grad, unit, rtol=1e-4, atol=1e-6)


def test_same_seed_gives_identical_results(face: AttackSession) -> None:
    x = _images(3, 24, seed=10)
    attack = PGD(
        eps=8,
        steps=5,
        diversity=InputDiversity(probability=0.7),
        smoothing=TranslationInvariance(radius=2),
        eot=EOT(transforms=(Jpeg(), Downscale(), Blur()), samples=2),
    )
    victims = [_own(face, x)]
    first, second = attack(x, victims, seed=42), attack(x, victims, seed=42)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.history["linear_face"], second.history["linear_face"])
    other = attack(x, victims, seed=43)
    assert not np.array_equal(first.images, other.images)


def test_coarse_steps_are_upsampled_signs_of_the_pooled_gradient(face: AttackSession) -> None:
    x = _images(2, 16, seed=5) * 0.5 + 64  # well inside the range, so no pixel clips
    other = face.features(_images(2, 16, seed=6))
    grad = face.run(x, other).grad
    basis = Resize((4, 4), (16, 16))
    coarse = FGSM(eps=4.0, coarse=4.0)(x, [Victim(face, other)])
    expected = -4.0 * basis.forward(np.sign(basis.adjoint(grad)))
    np.testing.assert_allclose(coarse.perturbation, expected, atol=1e-4)
    fine = FGSM(eps=4.0)(x, [Victim(face, other)])

    def variation(d: FloatArray) -> float:
        return float(np.abs(np.diff(d, axis=1)).mean() + np.abs(np.diff(d, axis=2)).mean())

    assert variation(coarse.perturbation) < 0.5 * variation(fine.perturbation)
    with pytest.raises(InputError, match="coarse"):
        FGSM(eps=4.0, coarse=0.5)


def test_multi_scale_steps_average_the_grids_and_cosine_steps_shrink(face: AttackSession) -> None:
    x = _images(2, 16, seed=5) * 0.5 + 64  # well inside the range, so no pixel clips
    other = face.features(_images(2, 16, seed=6))
    victims = [Victim(face, other)]
    fine, coarse = FGSM(eps=4.0)(x, victims), FGSM(eps=4.0, coarse=4.0)(x, victims)
    both = FGSM(eps=4.0, scales=(4.0,))(x, victims)
    np.testing.assert_allclose(both.perturbation, (fine.perturbation + coarse.perturbation) / 2, atol=1e-4)
    # A cosine schedule's first step is the full step, the second of two half of it ((1 + cos(pi/2)) / 2).
    one = BIM(eps=50.0, steps=1, step_size=2.0, schedule="cosine")(x, victims, seed=0)
    two = BIM(eps=50.0, steps=2, step_size=2.0, schedule="cosine")(x, victims, seed=0)
    assert np.abs(one.perturbation).max() == pytest.approx(2.0, abs=1e-4)
    np.testing.assert_allclose(np.abs(two.perturbation - one.perturbation), 1.0, atol=1e-4)
    # A floor of 1 keeps the whole step: the same as a constant schedule.
    floored = BIM(eps=50.0, steps=3, step_size=2.0, schedule="cosine", schedule_floor=1.0)(x, victims, seed=0)
    constant = BIM(eps=50.0, steps=3, step_size=2.0)(x, victims, seed=0)
    np.testing.assert_array_equal(floored.images, constant.images)
    with pytest.raises(InputError, match="schedule"):
        FGSM(eps=4.0, schedule="linear")
    with pytest.raises(InputError, match="schedule_floor"):
        FGSM(eps=4.0, schedule="cosine", schedule_floor=1.5)


def test_ssim_floor_holds_inside_the_loop(face: AttackSession) -> None:
    x = np.asarray(Image.fromarray(data.astronaut()[36:180, 153:297]).resize((40, 40)), np.float32)[None]
    victims = [_own(face, x)]
    unconstrained = PGD(eps=24, steps=10)(x, victims, quantize=True, seed=0)
    assert image_ops.ssim(x, unconstrained.images)[0] < 0.9  # the floor below binds
    floored = PGD(eps=24, steps=10, ssim_min=0.9)(x, victims, quantize=True, seed=0)
    assert image_ops.ssim(x, floored.images)[0] >= 0.9
    assert np.abs(floored.perturbation).max() > 0  # it shrank the perturbation, it did not drop it


class _MeanChangeCap(VisibilityCap):
    """A cap whose answer is known: the mean absolute change, at most ``limit`` grey levels."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.seen: list[float] = []

    def bind(self, x0: FloatArray) -> BoundCap:
        cap = self

        class Bound(BoundCap):
            exponent = 1.0

            def fast(self, images: FloatArray, idx: NDArray[np.intp]) -> NDArray[np.float64]:
                return np.abs(images - x0[idx]).mean(axis=(1, 2, 3), dtype=np.float64) / cap.limit

            def checked(self, images: FloatArray) -> None:
                cap.seen.append(float(np.abs(images - x0).mean()))

        return Bound()


def test_visibility_cap_holds_inside_the_loop_and_on_the_result(face: AttackSession) -> None:
    x = np.asarray(Image.fromarray(data.astronaut()[36:180, 153:297]).resize((40, 40)), np.float32)[None]
    victims = [_own(face, x)]
    free = PGD(eps=24, steps=10)(x, victims, quantize=True, seed=0)
    assert np.abs(free.perturbation).mean() > 6.0  # the cap below binds
    cap = _MeanChangeCap(3.0)
    held = PGD(eps=24, steps=10, cap=cap, cap_every=3)(x, victims, quantize=True, seed=0)
    change = float(np.abs(held.perturbation).mean())
    assert change <= 3.0 and change > 2.5  # held, and not by dropping the perturbation
    assert cap.seen == [pytest.approx(change)]


def test_per_image_caps_hold_each_image_on_its_own(face: AttackSession) -> None:
    """Two images in one batch, each with its own cap (or none): each is held to its own limit."""
    crop = np.asarray(Image.fromarray(data.astronaut()[36:180, 153:297]).resize((40, 40)), np.float32)
    x = np.stack([crop, crop[::-1].copy(), crop[:, ::-1].copy()])
    victims = [_own(face, x)]
    caps = (_MeanChangeCap(3.0), None, _MeanChangeCap(1.5))
    held = PGD(eps=24, steps=10, cap=PerImageCap(caps), cap_every=3)(x, victims, quantize=True, seed=0)
    change = np.abs(held.perturbation).mean(axis=(1, 2, 3))
    assert 2.5 < change[0] <= 3.0
    assert change[1] > 6.0  # no cap: the L-inf budget alone
    assert 0.5 < change[2] <= 1.5
    assert caps[0].seen == [pytest.approx(change[0])] and caps[2].seen == [pytest.approx(change[2])]
    # With no random draw (BIM towards fixed targets), an image attacked alone ends where it does in
    # the batch, but for the last bits of the model's arithmetic, which differ between batch sizes.
    targets = np.random.default_rng(3).standard_normal((3, face.info.embedding_dim)).astype(np.float32)
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    bim = BIM(eps=24, steps=10, cap=PerImageCap(caps), cap_every=3)
    together = bim(x, [Victim(face, targets)], targeted=True, quantize=True)
    solo = replace(bim, cap=_MeanChangeCap(1.5))
    alone = solo(x[2:], [Victim(face, targets[2:])], targeted=True, quantize=True)
    assert np.abs(alone.images[0] - together.images[2]).mean() < 0.05
    with pytest.raises(InputError, match="3 caps for a batch of 1"):
        PerImageCap(caps).bind(x[:1])


def test_per_image_map_passes_the_dot_product_test_and_reads_only_each_extent() -> None:
    rng = np.random.default_rng(2)
    extents = [(20, 30), (32, 18), (9, 9)]
    per = PerImage([Resize(e, (16, 16)) for e in extents], extents)
    assert per.size == (32, 30)
    x = rng.standard_normal((3, 32, 30, 3)).astype(np.float32)
    y = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    lhs = np.vdot(per.forward(x).astype(np.float64), y)
    rhs = np.vdot(x.astype(np.float64), per.adjoint(y))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    back = per.adjoint(y)
    for k, (h, w) in enumerate(extents):  # the padding is never read, so its gradient is 0
        assert not back[k, h:].any() and not back[k, :, w:].any()
        np.testing.assert_allclose(
            per.forward(x)[k], Resize((h, w), (16, 16)).forward(x[k : k + 1, :h, :w])[0]
        )
    with pytest.raises(InputError, match="expected"):
        per.forward(x[:2])


def test_luminance_and_chroma_budgets(face: AttackSession) -> None:
    x = _images(2, 24, seed=3)
    victims = [_own(face, x)]
    grey = PGD(eps=12, steps=8, chroma=0.0)(x, victims, quantize=True, seed=0).perturbation
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])  # the same change on R, G and B
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    assert np.abs(grey).max() == 12
    some = PGD(eps=12, steps=8, chroma=0.25)(x, victims, quantize=True, seed=0).perturbation
    colour = some - some.mean(axis=3, keepdims=True)
    assert 0 < np.abs(colour).max() <= 0.25 * 12 + 1.0  # within its share, plus rounding
    full = PGD(eps=12, steps=8)(x, victims, quantize=True, seed=0).perturbation
    assert np.abs(full - full.mean(axis=3, keepdims=True)).max() > np.abs(colour).max()
    with pytest.raises(InputError, match="chroma"):
        PGD(eps=12, chroma=1.5)


def test_mask_confines_the_perturbation(face: AttackSession) -> None:
    x = _images(2, 16, seed=11)
    mask = np.zeros((16, 16), np.float32)
    mask[4:12, 4:12] = 1.0
    mask[4:12, 12:14] = 0.25
    result = PGD(eps=16, steps=10)(x, [_own(face, x)], mask=mask, quantize=True)
    delta = np.abs(result.perturbation)
    assert delta[:, mask == 0].max() == 0
    assert delta[:, mask == 0.25].max() <= 4.0
    assert delta[:, mask == 1].max() == 16.0


def test_l2_pgd_stays_in_its_ball_and_attacks(face: AttackSession) -> None:
    x = _images(3, 16, seed=12)
    result = L2PGD(l2=1500.0, steps=20)(x, [_own(face, x)], seed=0)
    norms = np.sqrt((result.perturbation.astype(np.float64) ** 2).sum(axis=(1, 2, 3)))
    assert np.all(norms <= 1500.0 + 1e-2)
    assert np.all(result.objective["linear_face"] < 0.5)


def test_momentum_changes_the_path(face: AttackSession) -> None:
    x = _images(2, 16, seed=13)
    victims = [Victim(face, face.features(_images(2, 16, seed=14)))]
    plain, momentum = BIM(eps=8, steps=6)(x, victims), MIFGSM(eps=8, steps=6)(x, victims)
    assert MIFGSM(eps=8).momentum == 1.0
    assert not np.array_equal(plain.images, momentum.images)


def test_early_stop_freezes_done_images(face: AttackSession) -> None:
    x = _images(4, 16, seed=15)
    victims = [_own(face, x)]
    stop = PastThresholds(margin=0.1)
    result = PGD(eps=16, steps=40)(x, victims, stop_when=stop, seed=0)
    assert np.all(result.objective["linear_face"] < 0.5 - 0.1)
    assert result.steps.max() < 40  # it stopped before the step budget


def test_a_victims_own_threshold_replaces_the_models_in_the_stop_and_the_success(face: AttackSession) -> None:
    """``Victim(threshold=...)`` (the cloak's aim): the early stop and the success are taken at it, not at
    the model's own threshold (0.5): at 0.8 the images stop sooner, between the two."""
    x = _images(4, 16, seed=15)
    stop = PastThresholds(margin=0.1)
    attack = PGD(eps=16, steps=40, success_margin=0.1)
    own = attack(x, [_own(face, x)], stop_when=stop, seed=0)
    aimed = attack(x, [replace(_own(face, x), threshold=0.8)], stop_when=stop, seed=0)
    assert np.all(own.objective["linear_face"] < 0.5 - 0.1)
    assert np.all(aimed.objective["linear_face"] < 0.8 - 0.1) and aimed.success["linear_face"].all()
    assert np.all(aimed.objective["linear_face"] > 0.5 - 0.1)
    # One path until the aimed image stops: past 0.8 - 0.1 it stops at the latest where past 0.5 - 0.1.
    assert np.all(aimed.steps <= own.steps) and aimed.steps.sum() < own.steps.sum()


def test_a_victim_that_does_not_gate_steers_but_never_holds_the_early_stop(
    face: AttackSession, tmp_path: Path
) -> None:
    """``Victim(gates=False)``: a helper whose threshold no image can pass (cosine below -1.5) would
    hold every image to the last step as a full member; as a helper it is run at its weight and the
    stop waits for the gating victim alone."""
    from conftest import build_linear_face

    from uncnn_rt.runtime.attacks.sampling import shares

    unreachable = build_linear_face(tmp_path / "helper.onnx", seed=3, name="helper", threshold=-1.5)
    helper = AttackSession(unreachable.path, device="cpu")
    x = _images(4, 16, seed=15)
    stop = PastThresholds(margin=0.1)
    attack = PGD(eps=32, steps=40, success_margin=0.1)

    def run(gates: bool) -> AttackResult:
        victims = [_own(face, x), replace(_own(helper, x), weight=0.25, gates=gates)]
        return attack(x, victims, stop_when=stop, seed=0)

    member, steering = run(True), run(False)
    assert member.steps.min() == 40 and not member.success["helper"].any()
    assert steering.steps.max() < 40
    assert np.all(steering.objective["linear_face"] < 0.5 - 0.1)
    assert "helper" not in steering.success and "helper" in steering.objective  # reported, never judged
    # The helper's state has no threshold: the focus runs it at its weight whatever its objective.
    states = Ensemble([replace(_own(helper, x), gates=False)], 4, (16, 16), targeted=False).evaluate(x)
    assert states["helper"].threshold is None
    np.testing.assert_array_equal(shares(states, targeted=False, margin=0.1)["helper"], np.ones(4))
    # With nothing left to gate, no image is past.
    assert not PastThresholds()(states).any()


def test_invalid_inputs_raise_input_errors(face: AttackSession) -> None:
    x = _images(2, 16)
    victims = [_own(face, x)]
    with pytest.raises(InputError, match=r"0\.\.255"):
        PGD()(x + 300, victims)
    with pytest.raises(InputError, match="integer-valued"):
        PGD()(np.full_like(x, 100.5), victims, quantize=True)
    with pytest.raises(InputError, match=r"mask values must be in \[0, 1\]"):
        PGD()(x, victims, mask=np.full((16, 16), 2.0))
    with pytest.raises(InputError, match="distinct names"):
        PGD()(x, victims * 2)
    with pytest.raises(InputError, match=r"references must have shape \[2, 8\]"):
        PGD()(x, [Victim(face, np.zeros((3, 8), np.float32))])
    with pytest.raises(InputError, match="L2PGD needs an L2 budget"):
        L2PGD()
    with pytest.raises(InputError, match="eps must be >= 0"):
        PGD(eps=-1)


# --- criteria ---------------------------------------------------------------------------------------------


def _state(objective: list[float], features: list[list[float]], references: list[list[float]]) -> ModelState:
    return ModelState(
        kind="face",
        threshold=0.5,
        features=np.asarray(features, np.float32),
        objective=np.asarray(objective, np.float32),
        references=np.asarray(references, np.float32),
    )


def test_criteria_compose() -> None:
    states = {
        "a": _state([0.2, 0.7, 0.44], [[1, 0], [0, 1], [1, 0]], [[1, 0], [1, 0], [0, 1]]),
        "b": _state([0.6, 0.1, 0.3], [[0, 1], [1, 0], [0, 1]], [[0, 1], [0, 1], [0, 1]]),
    }
    below_a, below_b = SimilarityBelow("a"), SimilarityBelow("b", 0.5)
    assert below_a(states).tolist() == [True, False, True]
    assert (below_a & below_b)(states).tolist() == [False, False, True]
    assert (below_a | below_b)(states).tolist() == [True, True, True]
    assert SimilarityBelow("a", margin=0.1)(states).tolist() == [True, False, False]
    assert SimilarityAbove("a", 0.4)(states).tolist() == [False, True, True]
    assert Misclassified("a")(states).tolist() == [False, True, True]
    assert TargetReached("b")(states).tolist() == [True, False, True]
    assert TargetReached("b", targets=[1, 0, 0])(states).tolist() == [True, True, False]
    assert PastThresholds(margin=0.05)(states).tolist() == [False, False, True]
    with pytest.raises(InputError, match=r"names model 'c', the victims are \['a', 'b'\]"):
        SimilarityBelow("c")(states)


# --- linear maps and boosters -----------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), [((20, 20), (16, 16)), ((16, 24), (40, 12)), ((7, 9), (7, 9))])
def test_resize_adjoint_passes_the_dot_product_test(source: tuple[int, int], target: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    resize = Resize(source, target)
    x = rng.standard_normal((2, *source, 3)).astype(np.float32)
    y = rng.standard_normal((2, *target, 3)).astype(np.float32)
    lhs = np.vdot(resize.forward(x).astype(np.float64), y)
    rhs = np.vdot(x.astype(np.float64), resize.adjoint(y))
    assert lhs == pytest.approx(rhs, rel=1e-5)


@pytest.mark.parametrize(("source", "target"), [((4, 4), (16, 16)), ((5, 7), (23, 41)), ((9, 9), (9, 9))])
def test_upsample_is_the_resize_from_two_taps(source: tuple[int, int], target: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, *source, 3)).astype(np.float32)
    g = rng.normal(size=(2, *target, 3)).astype(np.float32)
    fast, dense = Upsample(source, target), Resize(source, target)
    np.testing.assert_allclose(fast.forward(x), dense.forward(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast.adjoint(g), dense.adjoint(g), rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="at least as large"):
        Upsample(target, source) if target != source else Upsample((9, 9), (8, 8))


def test_di_resize_and_pad_adjoint_passes_the_dot_product_test() -> None:
    rng = np.random.default_rng(1)
    diversity = InputDiversity(probability=1.0, min_scale=0.6)
    for _ in range(10):
        view = diversity.sample((32, 32), rng)
        assert isinstance(view, ResizePad)
        x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
        y = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
        lhs = np.vdot(view.forward(x).astype(np.float64), y)
        rhs = np.vdot(x.astype(np.float64), view.adjoint(y))
        assert lhs == pytest.approx(rhs, rel=1e-5)
    assert InputDiversity(probability=0.0).sample((32, 32), rng) is None


def test_mirror_grey_and_their_chain_pass_the_dot_product_test() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 12, 10, 3)).astype(np.float32)
    y = rng.standard_normal((2, 12, 10, 3)).astype(np.float32)
    for view in (Mirror(), Grey(), Chain([Mirror(), Grey(), Resize((12, 10), (6, 5))])):
        out = view.forward(x)
        y_out = y if out.shape == y.shape else rng.standard_normal(out.shape).astype(np.float32)
        lhs = np.vdot(out.astype(np.float64), y_out)
        rhs = np.vdot(x.astype(np.float64), view.adjoint(y_out))
        assert lhs == pytest.approx(rhs, rel=1e-5)
    np.testing.assert_array_equal(Mirror().forward(x)[:, :, 0], x[:, :, -1])
    grey = Grey().forward(x)
    np.testing.assert_allclose(grey[..., 0], x @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-5)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_alignment_jitter_draws_mirror_and_grey_views_at_their_rates() -> None:
    from uncnn_rt.runtime.cloak.regions import AlignmentJitter

    rng = np.random.default_rng(4)
    jitter = AlignmentJitter(probability=0.0, mirror=0.5, grey=0.25)
    kinds = [type(jitter.sample((16, 16), rng)).__name__ for _ in range(400)]
    # Independent draws: mirror alone 3/8, grey alone 1/8, both 1/8, neither 3/8.
    assert 110 < kinds.count("Mirror") < 190
    assert 25 < kinds.count("Grey") < 80
    assert 25 < kinds.count("Chain") < 80
    assert 110 < kinds.count("NoneType") < 190
    # Off by default: the jitter's draws are the same as before the views existed.
    assert AlignmentJitter(probability=0.0).sample((16, 16), rng) is None
    with pytest.raises(InputError, match="mirror view's probability"):
        AlignmentJitter(mirror=1.5)
    with pytest.raises(InputError, match="grey view's probability"):
        AlignmentJitter(grey=-0.1)


def test_alignment_jitter_draws_a_blurred_view_of_one_112_crop_pixel() -> None:
    from uncnn_rt.runtime.attacks import Smooth
    from uncnn_rt.runtime.cloak.regions import AlignmentJitter

    rng = np.random.default_rng(5)
    jitter = AlignmentJitter(probability=0.0, blurred=0.5)
    views = [jitter.sample((224, 224), rng) for _ in range(400)]
    blurred = [v for v in views if v is not None]
    assert all(isinstance(v, Smooth) for v in blurred)
    assert 160 < len(blurred) < 240
    assert isinstance(blurred[0], Smooth) and blurred[0].sigmas == (2.0,)  # one pixel at 112, two at 224
    impulse = np.zeros((1, 224, 224, 3), np.float32)
    impulse[0, 100, 100] = 1.0
    spread = blurred[0].forward(impulse)[0, 100, 95:106, 0]
    # A 2-D Gaussian of sigma 2: 1 / (8 pi) at the centre, exp(-9 / 8) of that 3 pixels away.
    assert spread.argmax() == 5 and spread[5] == pytest.approx(1 / (8 * np.pi), rel=0.05)
    assert spread[2] == pytest.approx(spread[5] * np.exp(-9 / 8), rel=0.05)
    with pytest.raises(InputError, match="blurred view's probability"):
        AlignmentJitter(blurred=2.0)


def test_resize_matches_pillow_bilinear() -> None:
    image = np.random.default_rng(2).uniform(0, 255, (37, 29)).astype(np.float32)
    for size in ((16, 16), (50, 60)):
        ours = Resize(image.shape, size).forward(image[None, :, :, None])[0, :, :, 0]
        pillow = np.asarray(Image.fromarray(image, mode="F").resize(size[::-1], Image.Resampling.BILINEAR))
        np.testing.assert_allclose(ours, pillow, atol=1e-2)
    np.testing.assert_allclose(resize_matrix(37, 16).sum(axis=1), 1.0, atol=1e-6)


def test_ti_kernel_sums_to_one_and_smooths() -> None:
    ti = TranslationInvariance(radius=3)
    assert ti.kernel().shape == (7, 7)
    assert ti.kernel().sum() == pytest.approx(1.0)
    assert ti.kernel()[3, 3] == ti.kernel().max()
    impulse = np.zeros((1, 15, 15, 3), np.float32)
    impulse[0, 7, 7, 1] = 1.0
    smoothed = ti(impulse)
    np.testing.assert_allclose(smoothed[0, 4:11, 4:11, 1], ti.kernel(), atol=1e-7)
    assert smoothed[..., 0].max() == 0.0  # per channel


def test_eot_transforms_keep_shape_and_range() -> None:
    x = _images(2, 24, seed=16)
    rng = np.random.default_rng(0)
    for transform in (Jpeg(quality=(50, 50)), Downscale(factor=(0.5, 0.5)), Blur(radius=(1.0, 1.0))):
        out = transform(x, rng)
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 255
        assert not np.array_equal(out, x)
    # image_ops.jpeg is Pillow's own encode at that quality and decode, image by image.
    reference = []
    for image in x.astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=75)
        reference.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    got = image_ops.jpeg(x, 75)
    np.testing.assert_array_equal(got, np.stack(reference).astype(np.float32))
    assert not np.array_equal(got, image_ops.jpeg(x, 50))  # the quality is passed on


# --- quality measures -------------------------------------------------------------------------------------


def test_ssim_and_psnr_match_scikit_image() -> None:
    x = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64)), np.float32)[None]
    y = np.clip(x + np.random.default_rng(3).normal(0, 8, x.shape), 0, 255).astype(np.float32)
    expected = structural_similarity(
        x[0], y[0], channel_axis=-1, data_range=255, gaussian_weights=True, use_sample_covariance=False
    )
    assert image_ops.ssim(x, y)[0] == pytest.approx(expected, abs=1e-6)
    assert image_ops.psnr(x, y)[0] == pytest.approx(peak_signal_noise_ratio(x[0], y[0], data_range=255))
    assert image_ops.ssim(x, x)[0] == pytest.approx(1.0)


def test_filter_valid_is_the_plain_correlation() -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 255, (2, 30, 25, 3))
    k = image_ops.gaussian_kernel1d(image_ops.SSIM_SIGMA)
    h, w = 30 - k.size + 1, 25 - k.size + 1
    rows = sum(k[i] * x[:, i : i + h] for i in range(k.size))
    plain = sum(k[i] * rows[:, :, i : i + w] for i in range(k.size))
    np.testing.assert_allclose(image_ops.filter_valid(x, k), plain, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(image_ops.filter_valid(x.astype(np.float32), k), plain, atol=1e-3)
    with pytest.raises(InputError, match="symmetric"):
        image_ops.filter_valid(x, np.array([0.2, 0.8]))


@pytest.mark.parametrize("side", [64, 400])  # 400: split into row bands on the SSIM threads
def test_fast_ssim_of_the_floor_matches_float64_ssim(side: int) -> None:
    from uncnn_rt.runtime.attacks.base import _SsimTo

    x = np.asarray(Image.fromarray(data.astronaut()).resize((side, side)), np.float32)[None].repeat(2, 0)
    x[1] = x[1, ::-1]
    ssim = _SsimTo(x)
    rng = np.random.default_rng(5)
    for eps in (1, 8, 40):
        s = np.clip(x + np.rint(rng.uniform(-eps, eps, x.shape)), 0, 255).astype(np.float32) - x
        both = np.arange(2)
        expected = image_ops.ssim(x, x + s)
        np.testing.assert_allclose(ssim.fast(s, both), expected, atol=1e-7)
        np.testing.assert_allclose(ssim.exact(s, both), expected, atol=1e-12)
        np.testing.assert_allclose(ssim.fast(s[1:], both[1:]), expected[1:], atol=1e-7)


def test_result_uint8_is_the_stored_image(face: AttackSession) -> None:
    x = _images(2, 16, seed=17)
    result: AttackResult = PGD(eps=8, steps=3)(x, [_own(face, x)], quantize=True)
    assert result.to_uint8().dtype == np.uint8
    np.testing.assert_array_equal(result.to_uint8().astype(np.float32), result.images)


# --- shipped models (activate once the zoo lists them) -----------------------------------------------------


def _shipped(predicate: str) -> list[catalog.ModelEntry]:
    entries = catalog.load_manifest()
    if predicate == "efficientnet":
        return [e for e in entries if e.kind == "classifier" and "efficientnet" in e.name.lower()]
    return [e for e in entries if e.kind == "face" and e.threshold is not None]


def _square(image: NDArray[np.uint8], size: int) -> FloatArray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), np.float32)[None]


@pytest.mark.slow
def test_targeted_pgd_turns_a_photo_into_a_chosen_imagenet_class() -> None:
    entries = _shipped("efficientnet")
    if not entries:
        pytest.skip("the model zoo does not ship EfficientNet-Lite0 yet")
    session = open_session(entries[0].path, device="auto")
    x = _square(data.chelsea(), session.info.canonical_size)
    labels = session.info.labels or ()
    target = next((i for i, label in enumerate(labels) if "toaster" in label.lower()), 859)
    assert session.features(x).argmax() != target
    reference = np.eye(session.info.embedding_dim, dtype=np.float32)[[target]]
    result = PGD(eps=8, steps=40, step_size=1.0)(
        x, [Victim(session, reference)], targeted=True, quantize=True
    )
    assert result.features[session.name].argmax() == target
    assert result.success[session.name].all()


def _shipped_face_names() -> list[str]:
    """Every face recognizer the manifest lists with a threshold, read at collection time (none: a
    checkout without the zoo, where the test below is skipped)."""
    return [e.name for e in _shipped("face")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    _shipped_face_names()
    or [pytest.param("none", marks=pytest.mark.skip(reason="the model zoo ships no face recognizers"))],
)
def test_untargeted_pgd_breaks_each_shipped_face_recognizer(name: str) -> None:
    (entry,) = [e for e in _shipped("face") if e.name == name]
    session = open_session(entry.path, device="auto")
    face_crop = data.astronaut()[
        36:180, 153:297
    ]  # the astronaut's face, eyes at ~45% height, as aligned crops
    x = _square(face_crop, session.info.canonical_size)
    clean = session.features(x)
    result = PGD(eps=8, steps=30, step_size=1.0)(x, [Victim(session, clean)], quantize=True, seed=0)
    assert entry.threshold is not None
    similarity = float((session.features(result.to_uint8()) * clean).sum())
    assert similarity < entry.threshold, f"{entry.name}: similarity {similarity:.3f} >= {entry.threshold}"


def test_ssim_threads_work_in_a_forked_child() -> None:
    """The SSIM floor's thread pool, once used, must not hang a child made by fork (augment workers)."""
    import multiprocessing

    from uncnn_rt.runtime.attacks.base import _SsimTo

    x = np.asarray(Image.fromarray(data.astronaut()).resize((400, 400)), np.float32)[None]
    s = np.ones_like(x)
    expected = _SsimTo(x).fast(s, np.arange(1))  # starts the pool in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_fast_ssim_of, (x, s)).get(timeout=60)
    np.testing.assert_array_equal(got, expected)


def _fast_ssim_of(x: NDArray[np.float32], s: NDArray[np.float32]) -> NDArray[np.float64]:
    from uncnn_rt.runtime.attacks.base import _SsimTo

    return _SsimTo(x).fast(s, np.arange(1))
