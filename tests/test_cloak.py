"""The cloak pipeline: regions, budgets, grey photos, face choice, targeted cloaks, verify, compare, classify.

Most tests run the real pipeline on the hand-built linear attack graphs of ``conftest.py`` (16 and 24 px)
with a fake detector that reports faces at known similarity transforms. The tests at the end run the
shipped detector and recognizers and skip until the model zoo ships them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import LinearGraph, build_linear_face
from numpy.typing import NDArray
from PIL import Image
from skimage import data
from skimage.metrics import structural_similarity

from uncnn_rt.runtime import catalog, cloak, evaluate, image_ops, visibility
from uncnn_rt.runtime.attacks import MIFGSM, Resize, Victim
from uncnn_rt.runtime.cloak import photo as cloak_photo
from uncnn_rt.runtime.cloak import regions
from uncnn_rt.runtime.cloak.verify import classify_image, compare_faces, verify
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.geometry import faces
from uncnn_rt.runtime.geometry.align import blazeface_template
from uncnn_rt.runtime.geometry.warp import Box, Warp, apply_affine
from uncnn_rt.runtime.imageio import LoadedImage, load_image, lossy_round_trip, save_image
from uncnn_rt.runtime.sessions import AttackSession

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEV_PHOTOS = SHARED / "faces" / "dev" / "photos"
CROP = 24  # the larger canonical size of the two linear face graphs


@dataclass(frozen=True)
class FakeFace:
    box: tuple[float, float, float, float]
    landmarks: NDArray[np.float32]
    score: float = 0.99


class FakeDetector:
    """Reports a face at each crop-to-photo matrix (landmarks = the template mapped into the photo),
    except on a flat image, where it finds nothing."""

    def __init__(self, matrices: Sequence[NDArray[np.float64]], size: int = CROP) -> None:
        self.faces = []
        for m in matrices:
            landmarks = apply_affine(m, blazeface_template(size)).astype(np.float32)
            corners = apply_affine(m, [[0, 0], [size, 0], [size, size], [0, size]])
            box = (*corners.min(axis=0), *corners.max(axis=0))
            self.faces.append(
                FakeFace((float(box[0]), float(box[1]), float(box[2]), float(box[3])), landmarks)
            )
        self.calls = 0

    def detect(self, rgb: NDArray[np.uint8]) -> list[FakeFace]:
        self.calls += 1
        return [] if np.ptp(rgb) == 0 else list(self.faces)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> NDArray[np.float64]:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def encode(array: NDArray[np.uint8], fmt: str = "PNG", mode: str | None = None, **params: object) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(height: int = 160, width: int = 200) -> NDArray[np.uint8]:
    """A real photo (the astronaut) at a small size, so the linear models see texture."""
    return np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BILINEAR))


def loaded_photo(gray: bool = False) -> LoadedImage:
    return load_image(encode(photo(), mode="L" if gray else None), name="photo.png")


ONE_FACE = similarity(3.0, 8.0, 60.0, 30.0)  # a 72-px face, slightly rotated
# The linear fixture models weigh every crop pixel independently (white-noise weights), which a smooth
# perturbation on the modes' coarse grids cannot follow, so the strong cloak steps per pixel.
STRONG: dict[str, object] = {
    "mode": replace(
        cloak.MODES["mid"],
        coarse=1.0,
        scales=(),
        schedule="constant",
        step_size=2.5,
        chroma=1.0,
        jnd_floor=None,
        check_every=3,
        refine_steps=12,
    ),
    "eps": 32,
    "steps": 20,
    "ssim_min": 0,
    "cap": "none",  # these tests are of the loop; tests/test_cloak.py::*cap* test the cap
}


@pytest.fixture(scope="module")
def recognizers(linear_face_graph: LinearGraph, linear_face_graph_24: LinearGraph) -> list[AttackSession]:
    return [
        AttackSession(linear_face_graph.path, device="cpu"),
        AttackSession(linear_face_graph_24.path, device="cpu"),
    ]


def run(
    loaded: LoadedImage, recognizers: list[AttackSession], detector: FakeDetector | None, **kwargs: object
) -> cloak.CloakResult:
    return cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# building blocks


def test_crop_map_is_the_adjoint_of_itself() -> None:
    warp = Warp(ONE_FACE, (160, 200), CROP)
    region = regions.region_box(warp, 160, 200)
    crop_map = regions.CropMap(warp, region)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, region.height, region.width, 3)).astype(np.float32)
    g = rng.normal(size=(2, CROP, CROP, 3)).astype(np.float32)
    lhs = float(np.sum(crop_map.forward(x).astype(np.float64) * g))
    rhs = float(np.sum(x.astype(np.float64) * crop_map.adjoint(g)))
    assert lhs == pytest.approx(rhs, rel=1e-5)
    # The crop from the region equals the crop from the whole photo.
    full = rng.uniform(0, 255, (160, 200, 3)).astype(np.float32)
    np.testing.assert_allclose(crop_map.forward(full[region.slices][None])[0], warp.apply(full), atol=1e-4)


def test_region_box_holds_the_warp_box_with_margin_on_the_jpeg_grid() -> None:
    warp = Warp(ONE_FACE, (160, 200), CROP)
    region = regions.region_box(warp, 160, 200)
    b = warp.box
    assert region.top <= b.top - regions.SSIM_MARGIN or region.top == 0
    assert region.left <= b.left - regions.SSIM_MARGIN or region.left == 0
    assert region.bottom >= min(160, b.bottom + regions.SSIM_MARGIN)
    assert region.right >= min(200, b.right + regions.SSIM_MARGIN)
    assert region.top % regions.JPEG_BLOCK == 0 and region.left % regions.JPEG_BLOCK == 0


def test_texture_weight_is_low_on_flat_areas_and_full_on_texture() -> None:
    flat = np.full((40, 40, 3), 120, np.uint8)
    noisy = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    np.testing.assert_allclose(regions.texture_weight(flat, 0.3), 0.3)
    assert regions.texture_weight(noisy, 0.3).min() == pytest.approx(1.0)
    np.testing.assert_array_equal(regions.texture_weight(flat, 1.0), 1.0)


def test_image_quality_equals_whole_image_ssim_and_psnr() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (70, 90, 3)).astype(np.uint8)
    b = a.copy()
    b[20:40, 30:55] = np.clip(b[20:40, 30:55].astype(int) + rng.integers(-9, 10, (20, 25, 3)), 0, 255)
    ssim, psnr = visibility.image_quality(a, b, strip=7)
    assert ssim == pytest.approx(float(image_ops.ssim(a[None], b[None])[0]), abs=1e-9)
    assert ssim == pytest.approx(
        structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
                              use_sample_covariance=False),
        abs=1e-7,
    )  # fmt: skip
    assert psnr == pytest.approx(float(image_ops.psnr(a[None], b[None])[0]))
    assert visibility.image_quality(a, a) == (1.0, math.inf)


def test_settings_for_applies_overrides_and_rejects_bad_values() -> None:
    mid = cloak.settings_for("mid")
    assert mid == cloak.MODES["mid"]
    custom = cloak.settings_for("mid", eps=4, steps=3, ssim_min=0)
    assert (custom.eps, custom.steps, custom.ssim_min) == (4.0, 3, None)
    assert custom.step_size == pytest.approx(mid.step_size * 4 / mid.eps)
    assert custom.mode == "mid (custom)"
    assert custom.refine_steps == 3  # a refinement round never takes more steps than the user allowed
    assert cloak.settings_for("mid", coarse=1).coarse == 1.0
    assert cloak.settings_for("mid", coarse=1).scales == ()  # one grid: per pixel means per pixel
    scattered = cloak.settings_for("mid", scatter=0.5)
    assert scattered.scatter == 0.5 and "scatter 0.5" in scattered.describe() and mid.scatter == 0
    for bad in ({"eps": -1}, {"eps": 300}, {"steps": 0}, {"ssim_min": 1.5}, {"coarse": 0.5}, {"scatter": -1}):
        with pytest.raises(InputError):
            cloak.settings_for("mid", **bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown mode"):
        cloak.settings_for("extreme")


def test_modes_trade_strength_for_invisibility() -> None:
    low, mid, high = (cloak.MODES[m] for m in ("low", "mid", "high"))
    assert low.steps <= mid.steps <= high.steps
    # Each mode is a protection level: a margin past every threshold, and a ceiling on visibility as a
    # multiple of the photo's own JPEG q75 re-encode (low 1x, mid and high 3x, high with twice mid's
    # margin), each face spending the least change that reaches its margin, pruned to where it pays.
    assert (low.cap_jpeg, mid.cap_jpeg, high.cap_jpeg) == (75, 75, 75)
    assert (low.cap_scale, mid.cap_scale, high.cap_scale) == (1.0, 3.0, 3.0)
    assert low.success_margin < mid.success_margin < high.success_margin
    assert low.least and mid.least and high.least
    assert low.prune > 0 and mid.prune > 0 and high.prune > 0
    assert cloak.DEFAULT_MODE == "mid"


def test_loop_extensions_the_cloak_relies_on(recognizers: list[AttackSession]) -> None:
    """One victim per step (the others' objective is NaN that step), a start from a given perturbation,
    and an SSIM floor checked every few steps that still holds on the result."""
    rng = np.random.default_rng(0)
    x = np.rint(rng.uniform(30, 220, (1, 48, 48, 3))).astype(np.float32)
    victims = [
        Victim(r, r.features(Resize((48, 48), (r.info.canonical_size,) * 2).forward(x)), name=r.name)
        for r in recognizers
    ]
    attack = MIFGSM(eps=12, steps=6, random_start=True, victims_per_step=1, ssim_min=0.9, ssim_every=4)
    result = attack(x, victims, quantize=True, seed=1)
    ran = ~np.isnan(np.stack([result.history[v.key][:, 0] for v in victims]))
    assert np.all(ran.sum(axis=0) == 1) and ran.any(axis=1).all()
    assert image_ops.ssim(x, result.images)[0] >= 0.9
    init = np.clip(np.rint(rng.normal(0, 20, x.shape)), -12, 12).astype(np.float32)
    held = MIFGSM(eps=6, steps=1, step_size=0.0)(x, victims, quantize=True, init=init)
    np.testing.assert_array_equal(held.images - x, np.clip(init, -6, 6))


# ---------------------------------------------------------------------------------------------------
# cloak_image


def test_cloak_keeps_the_size_and_changes_only_the_face_region(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo()
    result = run(loaded, recognizers, FakeDetector([ONE_FACE]), eps=6, steps=6)
    assert result.image.shape == loaded.rgb.shape and result.image.dtype == np.uint8
    assert len(result.faces) == 1
    face = result.faces[0]
    delta = result.image.astype(int) - loaded.rgb
    assert np.abs(delta).max() <= 6  # the L-inf budget on the whole image
    assert np.abs(delta).max() > 0
    # Nothing changes outside the crop's footprint (where the mask is 0), nor outside the region box.
    warp = Warp(face.site.crop_to_photo, loaded.rgb.shape, result.crop_size)
    outside = np.ones(loaded.rgb.shape[:2], bool)
    outside[face.region.slices] = regions.face_mask(warp, face.region) == 0
    assert np.all(delta[outside] == 0)
    assert face.linf == np.abs(delta).max()


def test_cloak_protects_against_the_white_box_models(recognizers: list[AttackSession]) -> None:
    # The linear models average the whole crop, so they need a larger budget than deep recognizers.
    result = run(loaded_photo(), recognizers, FakeDetector([ONE_FACE]), **STRONG)
    face = result.faces[0]
    assert {o.name for o in face.outcomes} == {"linear_face", "linear_face_24"}
    for outcome in face.outcomes:
        assert outcome.threshold is not None
        assert outcome.passed == (outcome.similarity < outcome.threshold)
    assert result.passed
    settings = result.settings
    assert face.steps <= settings.most_steps


def test_ssim_floor_holds_on_the_face_region_and_the_whole_image(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo()
    floor = 0.97
    result = run(loaded, recognizers, FakeDetector([ONE_FACE]), eps=40, steps=8, ssim_min=floor)
    region = result.faces[0].region
    assert (
        float(image_ops.ssim(loaded.rgb[region.slices][None], result.image[region.slices][None])[0]) >= floor
    )
    whole = structural_similarity(
        loaded.rgb, result.image, channel_axis=-1, data_range=255, gaussian_weights=True,
        use_sample_covariance=False,
    )  # fmt: skip
    assert whole >= floor
    # Without the floor the same budget goes below it: the floor was binding.
    free = run(loaded, recognizers, FakeDetector([ONE_FACE]), eps=40, steps=8, ssim_min=0)
    assert float(image_ops.ssim(loaded.rgb[region.slices][None], free.image[region.slices][None])[0]) < floor


def test_grayscale_photo_stays_gray(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo(gray=True)
    assert loaded.is_grayscale
    result = run(loaded, recognizers, FakeDetector([ONE_FACE]), eps=8, steps=5)
    assert np.any(result.image != loaded.rgb)
    np.testing.assert_array_equal(result.image[..., 0], result.image[..., 1])
    np.testing.assert_array_equal(result.image[..., 0], result.image[..., 2])


def test_no_face_is_an_input_error_that_suggests_no_align(recognizers: list[AttackSession]) -> None:
    flat = load_image(encode(np.full((64, 64, 3), 90, np.uint8)), name="wall.png")
    with pytest.raises(cloak.NoFaceError, match=r"no face found in wall\.png; use --no-align") as info:
        run(flat, recognizers, FakeDetector([ONE_FACE]))
    assert info.value.exit_code == 2


def test_no_align_cloaks_the_centred_square_without_a_detector(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo()  # 160 x 200: the centred square is columns 20..180
    result = run(loaded, recognizers, None, no_align=True, eps=6, steps=4)
    delta = np.abs(result.image.astype(int) - loaded.rgb).max(axis=2)
    assert delta[:, :20].max() == 0 and delta[:, 180:].max() == 0
    assert delta[:, 20:180].max() > 0
    assert result.no_align and result.faces[0].site.box is None


def test_every_face_is_cloaked_unless_one_is_chosen(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo()
    left, right = similarity(2.0, 0.0, 8.0, 40.0), similarity(3.0, 0.0, 120.0, 50.0)  # 48 px and 72 px
    detector = FakeDetector([right, left])  # reported in any order; numbered left to right
    both = run(loaded, recognizers, detector, eps=4, steps=3)
    assert [f.number for f in both.faces] == [1, 2]
    assert both.faces[0].site.box is not None and both.faces[0].site.box[0] < 30

    def changed(result: cloak.CloakResult) -> tuple[bool, bool]:
        delta = np.abs(result.image.astype(int) - loaded.rgb).max(axis=2)
        return bool(delta[:, :70].any()), bool(delta[:, 110:].any())

    assert changed(both) == (True, True)
    assert changed(run(loaded, recognizers, detector, face=0, eps=4, steps=3)) == (True, False)
    assert changed(run(loaded, recognizers, detector, largest=True, eps=4, steps=3)) == (False, True)
    with pytest.raises(InputError, match="face 3 asked, but 2 face"):
        run(loaded, recognizers, detector, face=2)


def test_faces_attacked_in_one_batch_keep_their_own_budget_cap_and_verdict(
    recognizers: list[AttackSession],
) -> None:
    """Two faces of different sizes in one attack call: each is protected, stays inside its own region
    and budget, and meets its own visibility cap, as when they are attacked one after another."""
    loaded = loaded_photo()
    detector = FakeDetector([similarity(2.0, 0.0, 8.0, 40.0), similarity(3.0, 8.0, 90.0, 30.0)])
    events: list[cloak.CloakProgress] = []
    batched = run(loaded, recognizers, detector, **STRONG, progress=events.append)
    single = run(loaded, recognizers, detector, **STRONG, faces_per_batch=1)
    assert events[0].batch == 2 and events[0].label == "faces 1-2/2"  # the first pass: one batch
    for result in (batched, single):
        assert [f.passed for f in result.faces] == [True, True]
        assert np.abs(result.image.astype(int) - loaded.rgb).max() <= 32
        delta = np.abs(result.image.astype(int) - loaded.rgb).max(axis=2)
        for face in result.faces:
            inside = np.zeros(delta.shape, bool)
            inside[face.region.slices] = True
            assert delta[inside].any()
        assert not delta[~np.logical_or.reduce([_in(f.region, delta.shape) for f in result.faces])].any()
    capped = run(loaded, recognizers, detector, **{**STRONG, "cap": "jpeg75"})
    for face in capped.faces:
        assert face.limits is not None and face.visibility is not None
        assert not cloak.exceeds(face.visibility, face.limits)
        # The cloak spends its budget: the figure that binds (here CIEDE2000) is well past half its cap.
        # Over seeds 0-9 the larger of the two shares was 0.75-0.94 (FLIP alone 0.53-0.61, a knife-edge
        # against 0.5, so it is not asserted alone).
        seen, limit = face.visibility, face.limits
        used = max(seen.flip / limit.flip, seen.ciede2000_mean / limit.ciede2000)
        assert used > 0.5, (face.visibility, face.limits)


def test_more_faces_than_max_faces_is_refused_before_any_step(recognizers: list[AttackSession]) -> None:
    """The service's memory bound: the faces chosen are counted after detection, before any attack step."""
    loaded = loaded_photo()
    detector = FakeDetector([similarity(2.0, 0.0, 8.0, 40.0), similarity(3.0, 8.0, 90.0, 30.0)])
    steps: list[cloak.CloakProgress] = []
    with pytest.raises(cloak.TooManyFacesError, match=r"2 faces found in photo\.png; at most 1") as refused:
        run(loaded, recognizers, detector, **STRONG, max_faces=1, progress=steps.append)
    assert (refused.value.found, refused.value.limit) == (2, 1) and steps == []
    one = run(loaded, recognizers, detector, **{**STRONG, "steps": 1}, max_faces=1, largest=True)
    assert len(one.faces) == 1
    assert len(run(loaded, recognizers, detector, **{**STRONG, "steps": 1}, max_faces=2).faces) == 2


def _in(region: Box, shape: tuple[int, ...]) -> NDArray[np.bool_]:
    mask = np.zeros(shape[:2], bool)
    mask[region.slices] = True
    return mask


def test_a_thirty_face_photo_is_attacked_in_bounded_batches(
    recognizers: list[AttackSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches hold at most BATCH_FACES faces and BATCH_PIXELS padded pixels, so memory stays bounded
    whatever the number of faces: here 30 faces, with the pixel bound lowered to split them further."""
    import tracemalloc

    loaded = load_image(encode(photo(300, 360)), name="crowd.png")
    grid = [similarity(1.5, 0.0, 8.0 + 58.0 * (k % 6), 8.0 + 58.0 * (k // 6)) for k in range(30)]
    detector = FakeDetector(grid)
    events: list[cloak.CloakProgress] = []
    # The first pass alone: refinement and rescue rounds (as many as the mode allows) batch the faces
    # still short again, with the same steps, and their events would mix with the first pass's.
    strong = cloak.settings_for(STRONG["mode"])  # type: ignore[arg-type]
    once = replace(strong, refine_rounds=0, rescue_rounds=0)
    tracemalloc.start()
    result = run(
        loaded, recognizers, detector, **{**STRONG, "mode": once, "steps": 2}, progress=events.append
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(result.faces) == 30
    first_pass = {e.face: e.batch for e in events if e.steps == 2}
    assert sum(first_pass.values()) == 30 and max(first_pass.values()) <= cloak.BATCH_FACES
    assert peak < 200e6, f"peak traced memory {peak / 1e6:.0f} MB"
    monkeypatch.setattr(cloak_photo, "BATCH_PIXELS", 3 * 60 * 60)
    events.clear()
    run(loaded, recognizers, detector, **{**STRONG, "mode": once, "steps": 1}, progress=events.append)
    assert max(e.batch for e in events) <= 3


def test_plain_untargeted_cloaks_link_and_scattered_ones_do_not(tmp_path: Path) -> None:
    """Two people, five photos each, a linear recognizer of 64 dimensions (threshold 0.5). Untargeted
    cloaks with a large budget all leave their clean embeddings (P1: 10 of 10 protected), but the same
    way, towards the opposite of the person's embedding, so one person's cloaks still find each other
    (P3: next to none unlinked). With each photo's own random direction as the scatter term, they leave
    just as well and no longer find each other (P3: next to all unlinked)."""
    graph = build_linear_face(tmp_path / "f64.onnx", size=16, dim=64, seed=3, threshold=0.5)
    model = AttackSession(graph.path, device="cpu")
    rng = np.random.default_rng(0)
    people = [rng.uniform(40, 215, (16, 16, 3)) for _ in range(2)]
    photos = [np.clip(p[None] + rng.normal(0, 3, (5, 16, 16, 3)), 0, 255).round() for p in people]
    x = np.concatenate(photos).astype(np.float32)
    labels = np.repeat([0, 1], 5)
    clean = model.features(x)
    attack = MIFGSM(eps=128, steps=40, momentum=1.0, random_start=True)
    directions = [
        cloak.scatter_directions({"f": c}, cloak.scatter_rng(0, x[k], 0))["f"] for k, c in enumerate(clean)
    ]
    t = np.stack(directions)
    assert np.abs(np.einsum("nd,nd->n", t, clean)).max() < 1e-5  # orthogonal to each clean embedding
    # A verdict of a random-start attack is a rate, so six seeds. Measured over seeds 0-11: P1 10 of 10
    # both ways on every seed; plain cloaks unlinked 0 of 10 on every seed (the weakest link 0.53 on seed
    # 0, 0.95 or more on the others, against 0.5); scattered ones unlinked 10 of 10 on every seed (the
    # strongest link 0.41, against 0.5). The bounds leave a photo or two each way.
    p1 = {"plain": evaluate.Rate(0, 0), "scattered": evaluate.Rate(0, 0)}
    p3 = dict(p1)
    for seed in range(6):
        for name, steer in (("plain", None), ("scattered", -3.0 * t)):
            result = attack(x, [Victim(model, clean, steer=steer)], quantize=True, seed=seed)
            outcome = evaluate.run_protocols(clean, result.features[model.name], labels, 0.5, range(10))
            p1[name] += outcome.protection("p1")
            p3[name] += outcome.protection("p3")
            # The steer changes the gradient only: objectives and verdicts are the clean reference's.
            own = np.einsum("nd,nd->n", result.features[model.name], clean)
            np.testing.assert_allclose(result.objective[model.name], own, atol=1e-5)
    assert p1["plain"] == p1["scattered"] == evaluate.Rate(60, 60)
    assert p3["plain"].hits <= 2, p3
    assert p3["scattered"].hits >= 58, p3


def test_overlapping_faces_keep_the_budget(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo()
    detector = FakeDetector([similarity(3.0, 0.0, 40.0, 30.0), similarity(3.0, 10.0, 80.0, 40.0)])
    result = run(loaded, recognizers, detector, eps=5, steps=4, ssim_min=0.9)
    assert np.abs(result.image.astype(int) - loaded.rgb).max() <= 5
    assert visibility.image_quality(loaded.rgb, result.image)[0] >= 0.9


class MovingDetector(FakeDetector):
    """Finds the face at one alignment in the first photo it sees and a shifted one afterwards, as a
    detector run on the cloaked pixels would."""

    def __init__(self, first: NDArray[np.float64], later: NDArray[np.float64]) -> None:
        super().__init__([first])
        self.later = FakeDetector([later]).faces

    def detect(self, rgb: NDArray[np.uint8]) -> list[FakeFace]:
        found = super().detect(rgb)
        return found if self.calls == 1 else list(self.later)


def test_refinement_protects_under_the_alignment_found_on_the_cloaked_photo(
    recognizers: list[AttackSession], tmp_path: Path
) -> None:
    loaded = loaded_photo()
    moved = similarity(3.2, 2.0, 64.0, 26.0)
    detector = MovingDetector(ONE_FACE, moved)
    # Colour steps without the JND shaping: the linear models weigh every channel of every pixel alike.
    loop = replace(
        cloak.MODES["mid"], chroma=1.0, jnd_floor=None, cap_jpeg=None, refine_rounds=1, rescue_rounds=0
    )
    result = run(loaded, recognizers, detector, mode=loop, eps=32, steps=20, ssim_min=0)
    assert detector.calls == 3  # the cloak's, the refinement round's, the least-visible shrink's
    assert np.abs(result.image.astype(int) - loaded.rgb).max() <= 32
    written = save_image(result.image, loaded, tmp_path / "out.png")
    report = verify(loaded, written, result, recognizers=recognizers, detector=detector)
    assert report.faces[0].redetected and report.faces[0].iou is not None and report.faces[0].iou < 1
    assert report.protected, report.to_dict()
    # Without the refinement round the cloak fails at the alignment it was not made for.
    plain = replace(cloak.settings_for(loop, eps=32, steps=20, ssim_min=0), refine_rounds=0)
    unrefined = run(loaded, recognizers, MovingDetector(ONE_FACE, moved), mode=plain)
    written = save_image(unrefined.image, loaded, tmp_path / "plain.png")
    assert not verify(loaded, written, unrefined, recognizers=recognizers, detector=detector).protected
    # The cloak's own verdict is taken where the verify step looks, not where the cloak was made.
    assert result.faces[0].passed and not unrefined.faces[0].passed


def test_equal_seeds_give_equal_cloaks(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo()
    a = run(loaded, recognizers, FakeDetector([ONE_FACE]), steps=4, seed=3)
    b = run(loaded, recognizers, FakeDetector([ONE_FACE]), steps=4, seed=3)
    np.testing.assert_array_equal(a.image, b.image)


def test_each_photo_takes_its_own_draws_under_one_seed(recognizers: list[AttackSession]) -> None:
    """One seed, two photos that differ only in a corner pixel no attack step reaches: their face regions
    get different cloaks, since the photo's pixels seed its draws (jitter, EOT, random start), while each
    photo repeats itself under its seed. Seeded by the seed alone, every photo of a run took the same
    draws, and the run's pooled figures swung together from seed to seed (bench/RESULTS.md, run 24)."""
    loaded = loaded_photo()
    corner = loaded.rgb.copy()
    corner[0, 0] = 255 - corner[0, 0]
    other = load_image(encode(corner), name="corner.png")
    a = run(loaded, recognizers, FakeDetector([ONE_FACE]), steps=4, seed=3)
    b = run(other, recognizers, FakeDetector([ONE_FACE]), steps=4, seed=3)
    again = run(other, recognizers, FakeDetector([ONE_FACE]), steps=4, seed=3)
    np.testing.assert_array_equal(b.image, again.image)
    changed = (a.image != loaded.rgb).any(axis=2)
    changed[0, 0] = False
    assert changed.sum() > 100  # the face was cloaked
    delta_a = a.image.astype(int) - loaded.rgb
    delta_b = b.image.astype(int) - other.rgb
    differ = (delta_a != delta_b).any(axis=2)
    differ[0, 0] = False
    assert differ.sum() > changed.sum() // 4
    # The streams themselves: a seed and a photo name one stream, either one changed names another.
    draws = [
        tuple(cloak.photo_rng(s, img, *stream).integers(0, 2**32, 4))
        for s in (3, 4)
        for img in (loaded.rgb, corner)
        for stream in ((), (0,))
    ]
    assert len(set(draws)) == len(draws)
    assert draws[0] == tuple(cloak.photo_rng(3, loaded.rgb.copy()).integers(0, 2**32, 4))


def test_targeted_cloak_moves_towards_the_target(recognizers: list[AttackSession]) -> None:
    loaded = loaded_photo()
    other = load_image(encode(np.asarray(Image.fromarray(data.coffee()).resize((200, 160)))), name="t.png")
    target = cloak.target_embeddings(other, recognizers, FakeDetector([ONE_FACE]))
    result = run(loaded, recognizers, FakeDetector([ONE_FACE]), target=target, eps=16, steps=10, ssim_min=0)
    assert result.targeted
    site = result.faces[0].site
    before = faces.embed(loaded.rgb, site, recognizers)
    after = faces.embed(result.image, site, recognizers)
    for name, reference in target.items():
        assert float(after[name] @ reference) > float(before[name] @ reference) + 0.05
        assert np.allclose(result.faces[0].references[name], reference)
    with pytest.raises(InputError, match="no embedding for"):
        run(loaded, recognizers, FakeDetector([ONE_FACE]), target={"linear_face": target["linear_face"]})


def test_load_recognizers_names_unknown_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog, "load_manifest", lambda path=None: [])
    with pytest.raises(ModelError, match="no face recognizers are shipped"):
        cloak.load_recognizers()
    with pytest.raises(InputError, match="unknown recognizer"):
        cloak.load_recognizers(["nonesuch"])


# ---------------------------------------------------------------------------------------------------
# verify, compare, classify


def test_verify_reports_every_face_and_model_from_the_written_file(
    recognizers: list[AttackSession], tmp_path: Path
) -> None:
    loaded = loaded_photo()
    detector = FakeDetector([ONE_FACE])
    result = run(loaded, recognizers, detector, **STRONG)
    written = save_image(result.image, loaded, tmp_path / "out.png")
    before = detector.calls
    report = verify(loaded, written, result, recognizers=recognizers, detector=detector)
    assert detector.calls == before + 1  # verify detects the faces again, on the written file
    assert [f.number for f in report.faces] == [1]
    face = report.faces[0]
    assert face.redetected and face.iou == pytest.approx(1.0)
    for check in face.models:
        assert check.before == pytest.approx(1.0, abs=1e-5)  # same alignment, clean pixels
        assert check.protected == (check.after < check.threshold)
    # PNG is lossless: the file holds exactly the cloak, so verify agrees with the attack.
    for check, outcome in zip(face.models, result.faces[0].outcomes, strict=True):
        assert check.after == pytest.approx(outcome.similarity, abs=1e-4)
    assert report.protected == result.passed
    assert (report.ssim, report.psnr) == pytest.approx(visibility.image_quality(loaded.rgb, result.image))
    assert report.to_dict()["faces"][0]["models"][0]["name"] == "linear_face"


def test_verify_falls_back_to_the_original_alignment(
    recognizers: list[AttackSession], tmp_path: Path
) -> None:
    loaded = loaded_photo()
    result = run(loaded, recognizers, FakeDetector([ONE_FACE]), steps=3)
    written = save_image(result.image, loaded, tmp_path / "out.png")
    elsewhere = FakeDetector([similarity(1.0, 0.0, 0.0, 0.0)])  # finds a face that does not overlap
    report = verify(loaded, written, result, recognizers=recognizers, detector=elsewhere)
    assert not report.faces[0].redetected


def test_compare_and_classify(recognizers: list[AttackSession], linear_classifier_graph: LinearGraph) -> None:
    a = loaded_photo()
    same = compare_faces(a, a, recognizers=recognizers, detector=FakeDetector([ONE_FACE]))
    assert [s.name for s in same] == ["linear_face", "linear_face_24"]
    assert all(s.similarity == pytest.approx(1.0, abs=1e-5) and s.match for s in same)
    classifier = AttackSession(linear_classifier_graph.path, device="cpu")
    ranked = classify_image(a.rgb, classifier, top=3)
    assert len(ranked) == 3
    probabilities = [p for _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    assert all(label.startswith("class_") for label, _ in ranked)
    with pytest.raises(InputError, match="not a classifier"):
        classify_image(a.rgb, recognizers[0])


# ---------------------------------------------------------------------------------------------------
# the shipped models


def _shipped() -> tuple[list[AttackSession], cloak.Detector]:
    entries = catalog.load_manifest()
    if not any(e.kind == "face" and e.in_default_ensemble and e.path.is_file() for e in entries):
        pytest.skip("the model zoo ships no default face recognizers yet")
    if not any(e.name == "blazeface" and e.path.is_file() for e in entries):
        pytest.skip("the model zoo does not ship the BlazeFace detector yet")
    return cloak.load_recognizers(device="cpu"), cloak.load_detector(device="cpu")


@pytest.mark.slow
def test_astronaut_is_cloaked_and_verified_protected(tmp_path: Path) -> None:
    """The demo's case: the high mode on the astronaut, verified from the written file, on ten seeds.

    The verdict of a randomised attack is a rate, not one draw. Measured on seeds 0-29: every seed
    PROTECTED on one machine (the closest model 0.08 under its threshold); 27 of 30 on another, where
    seeds 0, 11 and 25 left one model 0.02-0.04 over it. So at least 7 of seeds 0-9 (9 and 10 measured)."""
    recognizers, detector = _shipped()
    loaded = load_image(encode(data.astronaut()), name="astronaut.png")
    protected = []
    for seed in range(10):
        result = cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, mode="high", seed=seed)
        assert len(result.faces) == 1
        written = save_image(result.image, loaded, tmp_path / f"astronaut.{seed}.cloaked.png")
        report = verify(loaded, written, result, recognizers=recognizers, detector=detector)
        assert report.faces[0].redetected
        assert report.ssim >= (result.settings.ssim_min or 0)
        protected.append(report.protected)
    assert sum(protected) >= 7, f"PROTECTED on seeds {[s for s, p in enumerate(protected) if p]} of 0-9"


@pytest.mark.slow
@pytest.mark.shared
def test_dev_group_photos_are_cloaked_and_verified_protected(tmp_path: Path) -> None:
    """The high mode on the dev group photos (faces of 60-110 px): every face found and cloaked within
    its cap, and most face-model pairs verified PROTECTED from the written file (GROUP_PROTECTED).

    Every face of a photo is attacked in one batch; attacked one after another instead (another draw of
    the same randomised attack), the batch protects about as many pairs in its own loop (BATCH_SHORTFALL).
    Which faces the two draws protect differs from machine to machine, so per-face agreement is reported,
    not asserted."""
    if not DEV_PHOTOS.is_dir():
        pytest.skip(f"{DEV_PHOTOS} is absent (the shared dev set)")
    recognizers, detector = _shipped()
    photos = sorted(DEV_PHOTOS.glob("*.jpg"))
    assert photos
    protected = pairs = agree = faces = batched_pairs = single_pairs = 0
    for path in photos:
        loaded = load_image(path)
        run = partial(
            cloak.cloak_image,
            loaded,
            recognizers=recognizers,
            detector=detector,
            mode=DEV_MODE,
            saved=lossy_round_trip(loaded, fmt="JPEG"),
        )
        result, single = run(), run(faces_per_batch=1)
        assert [f.number for f in single.faces] == [f.number for f in result.faces]
        agree += sum(a.passed == b.passed for a, b in zip(result.faces, single.faces, strict=True))
        faces += len(result.faces)
        batched_pairs += sum(o.passed for f in result.faces for o in f.outcomes)
        single_pairs += sum(o.passed for f in single.faces for o in f.outcomes)
        expected = DEV_FACES.get(path.name, 1)
        assert len(result.faces) >= expected, f"{path.name}: found {len(result.faces)} of {expected} faces"
        assert result.image.shape == loaded.rgb.shape
        assert np.abs(result.image.astype(int) - loaded.rgb).max() <= DEV_MODE.eps
        for figures, limits in _saved_face_figures(loaded, result, tmp_path / f"{path.stem}.cloaked.jpg"):
            assert figures.flip <= limits.flip and figures.ciede2000_mean <= limits.ciede2000
        written = tmp_path / f"{path.stem}.cloaked.jpg"
        assert Image.open(written).format == "JPEG"
        report = verify(loaded, written, result, recognizers=recognizers, detector=detector)
        for face in report.faces:
            protected += sum(m.protected for m in face.models)
            pairs += len(face.models)
    assert protected >= GROUP_PROTECTED * pairs, f"{protected} of {pairs} face-model pairs protected"
    figures = (
        f"batched {batched_pairs}, one at a time {single_pairs} of {pairs} pairs; {agree} of {faces} agree"
    )
    assert batched_pairs >= single_pairs - BATCH_SHORTFALL * pairs, figures


def _saved_face_figures(
    loaded: LoadedImage, result: cloak.CloakResult, path: Path
) -> list[tuple[visibility.Visibility, cloak.FaceLimits]]:
    """Each face's figures measured afresh on the written file, with the face's cap."""
    written = load_image(save_image(result.image, loaded, path, quality=result.output_quality)).rgb
    out = []
    for face in result.faces:
        assert face.visible_region is not None and face.limits is not None
        region = face.visible_region.slices
        out.append((visibility.measure(loaded.rgb[region], written[region]), face.limits))
    return out


@pytest.mark.slow
def test_mid_cap_holds_on_the_saved_astronaut(tmp_path: Path) -> None:
    """The default mode's promise on a real colour face: no more visible than its ceiling (the mode's
    multiple of the photo's own JPEG q75 re-encode), in FLIP and CIEDE2000, on the file as written; and
    the cloak is not nothing."""
    recognizers, detector = _shipped()
    loaded = load_image(encode(data.astronaut()), name="astronaut.png")
    result = cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, mode="mid")
    ((figures, limits),) = _saved_face_figures(loaded, result, tmp_path / "astronaut.cloaked.png")
    assert figures.flip <= limits.flip and figures.ciede2000_mean <= limits.ciede2000
    assert figures.flip > 0.2 * limits.flip  # not a cloak that does nothing
    region = result.faces[0].visible_region
    assert region is not None
    q75 = visibility.envelope(visibility.region_ladder(loaded.rgb, region))[75]
    scale = cloak.MODES["mid"].cap_scale
    assert limits.flip == pytest.approx(scale * q75.flip, rel=0.03)
    assert limits.ciede2000 == pytest.approx(scale * q75.ciede2000_mean, rel=0.03)


@pytest.mark.slow
def test_a_low_quality_jpeg_is_written_at_a_quality_that_leaves_the_cloak_room(tmp_path: Path) -> None:
    """A q60 JPEG saved at its own quality (75 at least) loses as much to the encoder as its whole low
    ceiling (the q75 re-encode) allows, so a cloak held to the cap would be 0. The cloak chooses a
    higher quality, whose loss takes at most ENCODER_SHARE of the cap, and the file written at it holds
    a real cloak within the cap."""
    recognizers, detector = _shipped()
    loaded = load_image(encode(data.astronaut(), "JPEG", quality=60), name="astronaut.jpg")
    saved = lossy_round_trip(loaded, fmt="JPEG")
    assert saved is not None and saved.quality == 75
    region = visibility.face_region(detector.detect(loaded.rgb)[0].box, loaded.rgb.shape)
    limits = cloak.face_limits(loaded.rgb, region, cloak.MODES["low"])
    assert limits is not None
    own = visibility.colour_difference(loaded.rgb[region.slices], saved(loaded.rgb)[region.slices])
    assert own[1] > 0.9 * limits.ciede2000  # at q75 the encoder takes (nearly) all of the cap
    result = cloak.cloak_image(loaded, recognizers=recognizers, detector=detector, mode="low", saved=saved)
    assert result.output_quality is not None and result.output_quality > 75
    written = load_image(
        save_image(result.image, loaded, tmp_path / "a.jpg", quality=result.output_quality)
    ).rgb
    figures = visibility.measure(loaded.rgb[region.slices], written[region.slices])
    assert figures.flip <= limits.flip and figures.ciede2000_mean <= limits.ciede2000
    clean = load_image(save_image(loaded.rgb, loaded, tmp_path / "c.jpg", quality=result.output_quality)).rgb
    encoder = visibility.colour_difference(loaded.rgb[region.slices], clean[region.slices])
    assert encoder[0] <= cloak.ENCODER_SHARE * limits.flip * 1.1  # strided estimate in the choice
    assert figures.flip > 1.3 * encoder[0]  # the file holds a cloak, not just its own re-encode


COLOUR = SHARED / "faces" / "colour"


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("mode", ["low", "mid", "high"])
def test_every_mode_meets_its_cap_on_colour_photos(mode: str, tmp_path: Path) -> None:
    """Each mode's cap, checked on JPEG photos of the colour set saved as JPEG (what a user gets)."""
    if not COLOUR.is_dir():
        pytest.skip(f"{COLOUR} is absent (the shared colour set)")
    recognizers, detector = _shipped()
    paths = [COLOUR / "identities" / p for p in ("Colin_Powell", "Family1-Mom", "vlado")]
    photos = [sorted(p.glob("*.jpg"))[0] for p in paths if p.is_dir()]
    assert photos, f"no photos under {COLOUR / 'identities'}"
    settings = cloak.MODES[mode]
    for path in photos:
        loaded = load_image(path)
        saved = lossy_round_trip(loaded, fmt="JPEG")
        result = cloak.cloak_image(
            loaded, recognizers=recognizers, detector=detector, mode=settings, largest=True, saved=saved
        )
        for figures, limits in _saved_face_figures(loaded, result, tmp_path / f"{path.stem}.cloaked.jpg"):
            assert figures.flip <= limits.flip, (path.name, figures, limits)
            assert figures.ciede2000_mean <= limits.ciede2000, (path.name, figures, limits)


# Faces of 60 to 110 pixels (the group photos, the 512-px astronaut) need the high mode's budget; see the
# mode table in runtime/cloak/photo.py.
DEV_MODE = cloak.MODES["high"]
# Share of face-model pairs of the dev group photos that the high mode protects, verified from the written
# file: 75 and 79 of 92 (82%, 86%) on seeds 0 and 1, 76 on an earlier run; the cap leaves some small faces
# matched by some models.
GROUP_PROTECTED = 0.75
# How many fewer pairs (a share of all) the batch may protect in its loop than one face at a time. Measured
# (batched against one at a time, of 92): 86 against 83 and 82 against 84 on seeds 0 and 1 on one machine,
# 81 against 88 on another, where 18 of 23 faces got the same verdict (20 of 23 here). A batch shares each
# step's random draws, so the two are different draws of the attack, not the same computation.
BATCH_SHORTFALL = 0.15
# Faces a person counts in each group photo (bbt2: the two in front; people further back may be found too).
DEV_FACES = {"bbt1.jpg": 4, "bbt2.jpg": 2, "bbt3.jpg": 5, "bbt4.jpg": 6, "bbt5.jpg": 5}
