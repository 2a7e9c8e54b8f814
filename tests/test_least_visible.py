"""The least visible cloak that protects (issue 26): the minimum-visibility attack and its pieces.

Known answers on the hand-built linear recognizers of ``conftest.py``, through the real pipeline (crop
warps, budgets, caps on the saved pixels) with a fake detector, as ``test_cloak.py`` runs it.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from conftest import LinearGraph, build_linear_face
from PIL import Image
from test_cloak import CROP, FakeDetector, loaded_photo, run, similarity

from uncnn_rt.runtime import cloak, visibility
from uncnn_rt.runtime.attacks import MIFGM, Smooth
from uncnn_rt.runtime.cloak import photo as cloak_photo
from uncnn_rt.runtime.cloak import report as cloak_report
from uncnn_rt.runtime.cloak.regions import region_box
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.geometry.faces import sites_from_detections
from uncnn_rt.runtime.geometry.warp import Warp
from uncnn_rt.runtime.imageio import LoadedImage, load_image
from uncnn_rt.runtime.sessions import AttackSession

ONE_FACE = similarity(3.0, 8.0, 60.0, 30.0)

# The loop without its random draws (no jitter, no EOT), so that each comparison is of the method alone.
BASE = replace(
    cloak.MODES["mid"],
    mode="test",
    eps=32.0,
    steps=40,
    step_size=2.0,
    schedule="constant",
    jnd_floor=None,
    chroma=1.0,  # the linear models weigh each channel apart
    diversity=0.5,
    eot_quality=None,
    refine_rounds=0,
    rescue_rounds=0,
    success_margin=0.1,
    check_every=1,
    cap_jpeg=75,
    cap_scale=3.0,
    cap_ciede2000=None,
    blur=0.0,
    prune=0.0,  # the even shrink; test_pruning_... turns pruning on
)
# The cap as a fixed budget: sign steps that may spend all of it from the first step, run to the end.
FIXED = replace(BASE, step="sign", cap_start=1.0, least=False, check_every=10_000)
# The minimum-visibility attack: steps along the gradient, the budget rising from a fifth of the ceiling,
# stopped at the first step past the margin, then shrunk to the least share that keeps it.
LEAST = replace(BASE, step="gradient", cap_start=0.2, least=True)


@pytest.fixture(scope="module")
def recognizers(linear_face_graph: LinearGraph, linear_face_graph_24: LinearGraph) -> list[AttackSession]:
    return [
        AttackSession(linear_face_graph.path, device="cpu"),
        AttackSession(linear_face_graph_24.path, device="cpu"),
    ]


def spent(loaded: LoadedImage, result: cloak.CloakResult) -> tuple[float, float]:
    """FLIP and CIEDE2000 mean of the one face's region."""
    face = result.faces[0]
    assert face.visibility is not None
    return face.visibility.flip, face.visibility.ciede2000_mean


def test_an_unknown_step_is_an_input_error(recognizers: list[AttackSession]) -> None:
    with pytest.raises(InputError, match="step must be"):
        run(loaded_photo(), recognizers, FakeDetector([ONE_FACE]), mode=replace(LEAST, step="signum"))


def test_smooth_is_its_own_adjoint_with_a_width_per_image() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 30, 40, 3)).astype(np.float32)
    y = rng.normal(size=(2, 30, 40, 3)).astype(np.float32)
    blur = Smooth((1.5, 0.0))
    lhs = float(np.sum(blur.forward(x).astype(np.float64) * y))
    rhs = float(np.sum(x.astype(np.float64) * blur.adjoint(y)))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    out = blur.forward(x)
    assert np.array_equal(out[1], x[1])  # sigma 0: unchanged
    # Smoothing removes most of white noise's pixel-to-pixel differences.
    assert np.abs(np.diff(out[0], axis=1)).mean() < 0.3 * np.abs(np.diff(x[0], axis=1)).mean()


def test_the_gradient_step_keeps_the_gradients_shape_at_unit_rms() -> None:
    v = np.zeros((2, 4, 4, 3), np.float32)
    v[0, 1, 1] = 3.0
    v[0, 2, 2] = -1.0
    v[1] = np.arange(48, dtype=np.float32).reshape(4, 4, 3) + 1
    d = MIFGM(eps=8.0).direction(v)
    for k in range(2):
        ratio = d[k][v[k] != 0] / v[k][v[k] != 0]
        assert np.allclose(ratio, ratio[0], rtol=1e-5)  # one positive factor per image: the same shape
        assert ratio[0] > 0 and np.array_equal(d[k] == 0, v[k] == 0)
        nonzero = d[k][d[k] != 0]
        assert float(np.sqrt(np.mean(nonzero.astype(np.float64) ** 2))) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_visible_reaches_the_margin_at_a_smaller_change_than_a_shrunk_fixed_cap(
    linear_face_graph: LinearGraph, seed: int
) -> None:
    """The known answer: for a linear recognizer ``w``, the sign step needs ``n ||w||_2^2 / ||w||_1^2``
    times the mean absolute change of the gradient step for the same movement (pi / 2 for white-noise
    weights; the crop warp smooths ``w`` in the photo, so less here), so the fixed-cap cloak shrunk to
    its least share past the margin is more visible. Measured over seeds 0-5: CIEDE2000 0.77-0.85
    times the shrunk fixed cap's, FLIP 0.79-0.87 times (``eps`` 32 and 64 alike)."""
    loaded = loaded_photo()
    detector = FakeDetector([ONE_FACE])
    recognizers = [AttackSession(linear_face_graph.path, device="cpu")]
    # The fixed cap shrunk to its least share past the margin: what holding a cap by shrinking can do.
    fixed = run(loaded, recognizers, detector, mode=replace(FIXED, least=True), seed=seed)
    least = run(loaded, recognizers, detector, mode=LEAST, seed=seed)
    assert fixed.passed and least.passed
    flip_fixed, de_fixed = spent(loaded, fixed)
    flip_least, de_least = spent(loaded, least)
    assert de_least < 0.92 * de_fixed, (de_least, de_fixed)
    assert flip_least < 0.95 * flip_fixed, (flip_least, flip_fixed)
    # And both past the margin on the saved pixels, as verify sees them.
    for result in (fixed, least):
        for o in result.faces[0].outcomes:
            assert o.threshold is not None and o.similarity < o.threshold - 0.09


@pytest.mark.parametrize("seed", [0, 1])
def test_a_face_that_needs_less_gets_less(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    """The same face against a recognizer that needs a small change (threshold 0.9) and one that needs a
    large one (0.4): the minimum-visibility cloak spends accordingly, where a fixed cap spends the same."""
    root = tmp_path_factory.mktemp("thresholds")
    loaded = loaded_photo()
    detector = FakeDetector([ONE_FACE])
    figures: dict[tuple[str, float], tuple[float, float]] = {}
    for threshold in (0.9, 0.4):
        graph = build_linear_face(root / f"t{threshold}.onnx", size=CROP, dim=8, seed=5, threshold=threshold)
        models = [AttackSession(graph.path, device="cpu")]
        for name, settings in (("least", LEAST), ("fixed", FIXED)):
            result = run(loaded, models, detector, mode=settings, seed=0)
            assert result.passed
            figures[name, threshold] = spent(loaded, result)
    # Seeds 0-3: 0.47-0.64 and 0.46-0.63 (CIEDE2000 mean).
    assert figures["least", 0.9][1] < 0.7 * figures["least", 0.4][1], figures
    assert figures["least", 0.9][1] < 0.75 * figures["fixed", 0.9][1], figures


def test_the_ceiling_is_never_passed(recognizers: list[AttackSession]) -> None:
    """Whatever the face needs, it gets at most its ceiling, on the pixels as saved; a face the ceiling
    stops short says so."""
    loaded = loaded_photo()
    detector = FakeDetector([ONE_FACE])
    tight = replace(LEAST, cap_scale=0.5, success_margin=0.4)  # far more than half of q75 can give
    for seed in range(3):
        result = run(loaded, recognizers, detector, mode=tight, seed=seed)
        face = result.faces[0]
        assert face.limits is not None and face.visibility is not None
        region = face.visible_region
        assert region is not None
        flip, de = visibility.colour_difference(loaded.rgb[region.slices], result.image[region.slices])
        assert flip <= face.limits.flip and de <= face.limits.ciede2000
        assert face.short and not result.passed
        # It spent its ceiling (the loop's holds leave it at about 0.8 of it: 0.807-0.812 on seeds 0-2),
        # so the report says the ceiling stopped it.
        spent = max(flip / face.limits.flip, de / face.limits.ciede2000)
        assert spent >= cloak_report.CEILING_REACHED


def _lattice_ratio(delta: np.ndarray, origin: int, period: int) -> float:
    """Mean absolute step between neighbouring columns across the lines of the ``period`` lattice (which
    starts at column ``origin``) over the mean step across the other columns."""
    steps = np.abs(np.diff(delta, axis=1)).mean(axis=0)  # steps[x]: between columns x and x + 1
    on = (np.arange(steps.size) + 1 - origin) % period == 0
    return float(steps[on].mean() / max(float(steps[~on].mean()), 1e-9))


def test_a_large_faces_perturbation_has_no_edges_on_the_crop_grid(recognizers: list[AttackSession]) -> None:
    """A face 6 photo pixels per crop pixel: the crop warp averages 6 x 6 blocks, so sign steps come back
    as hard-edged squares on the blocks' lattice; on the smooth basis the steps across the lattice's
    lines are no larger than across any other column. Measured: 24.4 against 1.04."""
    small = loaded_photo().rgb
    big = np.asarray(Image.fromarray(small).resize((2 * small.shape[1], 2 * small.shape[0])))
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    loaded = load_image(buffer.getvalue(), name="big.png")
    matrix = similarity(6.0, 0.0, 130.0, 90.0)  # a 144-px face, upright
    ratios = {}
    for name, settings in (("sign", replace(FIXED, least=False)), ("smooth", replace(LEAST, blur=0.5))):
        result = run(loaded, recognizers, FakeDetector([matrix]), mode=settings, seed=0, cap="none")
        d = result.image.astype(np.float32).mean(axis=2) - loaded.rgb.astype(np.float32).mean(axis=2)
        box = Warp(result.faces[0].site.crop_to_photo, loaded.rgb.shape[:2], CROP).box
        assert box.width > 100  # the block average is 6 pixels wide
        rows = slice(box.top + box.height // 4, box.bottom - box.height // 4)
        cols = slice(box.left + box.width // 4, box.right - box.width // 4)
        ratios[name] = _lattice_ratio(d[rows, cols], (box.left - cols.start) % 6, 6)
    assert ratios["sign"] > 3.0, ratios  # the control: the squares are there without the smooth basis
    assert ratios["smooth"] < 1.5, ratios


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_to_where_the_change_pays_costs_less_at_the_same_margin(
    recognizers: list[AttackSession], seed: int
) -> None:
    """``prune``: the change kept where its protection per unit of FLIP is high and scaled to its own
    least share reaches the same margin at a lower FLIP and CIEDE2000 than the whole change shrunk
    evenly, and keeps the per-pixel bound. Measured over seeds 0-5: FLIP 0.78-0.87 times, CIEDE2000
    0.74-0.85 times the even shrink's (0.78-0.95 and 0.74-0.93 when the pruned change could carry at most
    twice the attack's)."""
    loaded = loaded_photo()
    detector = FakeDetector([ONE_FACE])
    even = run(loaded, recognizers, detector, mode=LEAST, seed=seed)
    pruned = run(loaded, recognizers, detector, mode=replace(LEAST, prune=1.0), seed=seed)
    assert even.passed and pruned.passed
    flip_even, de_even = spent(loaded, even)
    flip_pruned, de_pruned = spent(loaded, pruned)
    assert flip_pruned < 0.97 * flip_even, (flip_pruned, flip_even)
    assert de_pruned <= de_even, (de_pruned, de_even)
    for o in pruned.faces[0].outcomes:
        assert o.threshold is not None and o.similarity < o.threshold - 0.09
    change = np.abs(pruned.image.astype(np.int16) - loaded.rgb)
    assert int(change.max()) <= LEAST.eps
    # The pruned change is concentrated: a larger share of the face's pixels is left as it was.
    unchanged = (change.max(axis=2) == 0).mean()
    assert unchanged > (np.abs(even.image.astype(np.int16) - loaded.rgb).max(axis=2) == 0).mean()


def test_pruning_reads_a_realigned_crop_that_reaches_past_the_faces_region(
    recognizers: list[AttackSession],
) -> None:
    """The face re-detected on the cloaked photo may frame a crop that reaches past the region the attack
    changed (no refinement round grew it): the pruning mask is still taken, on the region."""
    loaded = loaded_photo()
    original = loaded.rgb
    size = CROP
    first = sites_from_detections(FakeDetector([ONE_FACE]).detect(original), size)[0]
    face = cloak_photo._Face.of(0, first, original, size, LEAST, recognizers, None)
    cloak_photo._share_the_budget([face], original, LEAST)
    height, width = original.shape[:2]
    below = face.region.bottom - Warp(first.crop_to_photo, (height, width), size).box.bottom
    moved = similarity(3.0, 8.0, 60.0, 30.0 + below + 3)
    again = sites_from_detections(FakeDetector([moved]).detect(original), size)[0]
    reach = region_box(Warp(again.crop_to_photo, (height, width), size), height, width)
    assert reach.bottom > face.region.bottom
    rng = np.random.default_rng(0)
    photo = original.copy()
    noise = rng.integers(-6, 7, size=(face.region.height, face.region.width, 3))
    photo[face.region.slices] = np.clip(original[face.region.slices] + noise, 0, 255).astype(np.uint8)
    payoff = cloak_photo._payoff(
        original, photo, face, again, cloak_photo._Steering(recognizers, (), 0.0), False, 0.5
    )
    assert payoff is not None
    keep = payoff.kept(1.0)
    assert keep.shape == (face.region.height, face.region.width)
    assert float(keep.min()) >= 0.0 and float(keep.max()) <= 1.0 + 1e-6
    assert 0.0 < float(keep.mean()) < 1.0


@pytest.mark.parametrize(("steps", "seed"), [(5, 6), (5, 3), (7, 7)])
def test_a_face_short_at_its_whole_change_reaches_the_margin_pruned(
    tmp_path_factory: pytest.TempPathFactory, steps: int, seed: int
) -> None:
    """An attack stopped after a few steps leaves the face short of its margin (in one case not even past
    its threshold) at its whole change. Concentrated where it pays and scaled up to
    :data:`~uncnn_rt.runtime.cloak.photo.PRUNE_MOST` within eps, the same change reaches the margin, at a
    lower FLIP than the whole change: the face takes it and is no longer short. Measured (each photo's
    own draws, run 25): margins -0.052, -0.019 and +0.066 against the threshold before, about -0.10
    after; FLIP 0.78-0.82 times. Steps and seeds that leave the face short were searched for: with more
    steps the attack reaches the margin, with fewer the pruned change cannot either."""
    root = tmp_path_factory.mktemp("short")
    graph = build_linear_face(root / "t04.onnx", size=CROP, dim=8, seed=5, threshold=0.4)
    models = [AttackSession(graph.path, device="cpu")]
    loaded = loaded_photo()
    detector = FakeDetector([ONE_FACE])
    few = replace(LEAST, steps=steps)
    even = run(loaded, models, detector, mode=few, seed=seed)
    pruned = run(loaded, models, detector, mode=replace(few, prune=1.0), seed=seed)
    margin = LEAST.success_margin
    (before,) = even.faces[0].outcomes
    assert even.faces[0].short and before.threshold is not None
    assert before.similarity > before.threshold - margin + 0.02, before
    (after,) = pruned.faces[0].outcomes
    assert not pruned.faces[0].short and pruned.passed
    assert after.threshold is not None and after.similarity < after.threshold - margin + 0.01, after
    assert spent(loaded, pruned)[0] < spent(loaded, even)[0]
    assert int(np.abs(pruned.image.astype(np.int16) - loaded.rgb).max()) <= LEAST.eps


def test_rescue_rounds_run_only_for_a_face_still_short_after_the_least_visible_step(
    tmp_path_factory: pytest.TempPathFactory, recognizers: list[AttackSession]
) -> None:
    """``rescue_rounds``: a face short of its margin at its whole change after the first pass (5 steps, as
    in the test above, unpruned) continues its attack in rescue rounds and reaches the margin, exactly as
    the same number of refinement rounds would have taken it there (one face: the same draws, from the
    same whole change). A face the least-visible step protects runs none: its cloak is the same."""
    root = tmp_path_factory.mktemp("rescue")
    graph = build_linear_face(root / "t04.onnx", size=CROP, dim=8, seed=5, threshold=0.4)
    models = [AttackSession(graph.path, device="cpu")]
    loaded = loaded_photo()
    detector = FakeDetector([ONE_FACE])
    few = replace(LEAST, steps=5, refine_steps=8)
    short = run(loaded, models, detector, mode=few, seed=6)
    assert short.faces[0].short and short.faces[0].steps == 5
    rescued = run(loaded, models, detector, mode=replace(few, rescue_rounds=3), seed=6)
    face = rescued.faces[0]
    assert not face.short and rescued.passed
    assert 5 < face.steps <= replace(few, rescue_rounds=3).most_steps
    refined = run(loaded, models, detector, mode=replace(few, refine_rounds=3), seed=6)
    assert refined.faces[0].steps == face.steps
    assert np.array_equal(refined.image, rescued.image)

    protected = run(loaded, recognizers, detector, mode=LEAST, seed=0)
    assert protected.passed and not protected.faces[0].short
    again = run(loaded, recognizers, detector, mode=replace(LEAST, rescue_rounds=3), seed=0)
    assert again.faces[0].steps == protected.faces[0].steps
    assert np.array_equal(again.image, protected.image)


def test_the_margin_check_stops_at_the_first_model_short_and_tries_it_first_next(
    recognizers: list[AttackSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The least-share search asks "is every recognizer past its margin?" a dozen times per face; a model
    short of its margin answers it alone, and is asked first the next time, with the answer that
    checking every model gives."""
    original = loaded_photo().rgb
    site = sites_from_detections(FakeDetector([ONE_FACE]).detect(original), CROP)[0]
    clean = cloak_photo.embed(original, site, recognizers)
    first, second = recognizers
    # The first model's reference is the face's opposite (far past its threshold), the second's the face
    # itself (similarity 1: short).
    references = {first.name: -clean[first.name], second.name: clean[second.name]}
    calls: list[str] = []
    for r in recognizers:
        monkeypatch.setattr(r, "features", lambda x, r=r, f=r.features: calls.append(r.name) or f(x))
    steering = cloak_photo._Steering(recognizers, (), 0.0)
    check = cloak_photo._MarginCheck(steering, references, False, 0.05)
    every = all(
        o.passed and o.similarity < (o.threshold or 0.0) - 0.05
        for o in cloak_photo._outcomes_at(original, site, steering, references, False)
    )
    calls.clear()
    assert check(original, site) is every is False
    assert calls == [first.name, second.name]
    calls.clear()
    assert check(original, site) is False
    assert calls == [second.name]  # the model that fell short is asked first, and alone
    # Both past: every model is asked, and the check says so.
    passing = cloak_photo._MarginCheck(steering, {r.name: -clean[r.name] for r in recognizers}, False, 0.05)
    calls.clear()
    assert passing(original, site) is True
    assert sorted(calls) == sorted(r.name for r in recognizers)
