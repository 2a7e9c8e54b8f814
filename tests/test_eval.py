"""``uncnn-rt eval``: the protocol on synthetic data where every figure is known, then the real pipeline.

The synthetic dataset: 16 x 16 grey photos, each identity a fixed random +-1 pattern (amplitude 60
around grey 128) plus a little noise. The fake recognizer is linear: the embedding is the photo minus
128, flattened and normalised. Photos of one identity then have cosine ~1, of different identities
|cosine| ~0.1, and uniform noise ~0.06 to anything, far below the 0.8 threshold. The cloak and the
recognizers are passed in (dependency injection), so no test patches the module.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import LinearGraph
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from uncnn_rt.cli.app import app
from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime import evaluate as ev
from uncnn_rt.runtime.cloak import settings_for
from uncnn_rt.runtime.errors import InputError, MissingExtraError
from uncnn_rt.runtime.geometry.align import transform_for_box, transform_for_whole_image
from uncnn_rt.runtime.geometry.faces import FaceSite
from uncnn_rt.runtime.geometry.warp import Warp
from uncnn_rt.runtime.imageio import LoadedImage, load_image
from uncnn_rt.runtime.sessions import open_session

SIZE = 16
THRESHOLD = 0.8
SHARED = Path(__file__).resolve().parents[2] / "shared"
DEV = SHARED / "faces" / "dev"
needs_dev = pytest.mark.skipif(not (DEV / "identities").is_dir(), reason=f"dev set {DEV} not present")


def _pattern(seed: int) -> NDArray[np.float64]:
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(SIZE, SIZE))


def _photo(pattern: NDArray[np.float64], seed: int) -> NDArray[np.uint8]:
    noise = np.random.default_rng(1000 + seed).normal(0, 3, pattern.shape)
    return np.clip(np.rint(128 + 60 * pattern + noise), 0, 255).astype(np.uint8)


def write_dataset(root: Path, *, outlier: bool = False) -> Path:
    """ann (3 photos), bob (3), cid (2); with ``outlier`` ann3 is half someone else (not recognized)."""
    members = {"ann": 3, "bob": 3, "cid": 2}
    for k, (name, count) in enumerate(members.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for j in range(count):
            pattern = _pattern(k)
            if outlier and name == "ann" and j == 2:
                pattern = 0.5 * pattern + 0.87 * _pattern(99)
            Image.fromarray(_photo(pattern, 10 * k + j), mode="L").save(folder / f"{name}{j + 1}.png")
    return root


class LinearEmbedder:
    """``normalize(crop - 128)`` of the face's crop (warped at the site's size)."""

    def __init__(
        self, name: str = "lin", threshold: float = THRESHOLD, duplicate_of: str | None = None
    ) -> None:
        self.name, self.threshold, self.duplicate_of = name, threshold, duplicate_of

    def embed(self, faces: Sequence[ev.FaceView]) -> NDArray[np.float32]:
        rows = []
        for f in faces:
            crop = Warp(f.site.crop_to_photo, f.rgb.shape, f.site.size).apply(f.rgb)
            x = crop.mean(axis=2).ravel() - 128.0
            rows.append(x / max(float(np.linalg.norm(x)), 1e-9))
        return np.asarray(rows, np.float32).reshape(len(faces), -1)


def whole(rgb: NDArray[np.uint8]) -> list[FaceSite]:
    return [FaceSite(transform_for_whole_image(rgb.shape[0], rgb.shape[1], SIZE), SIZE)]


def identity_cloak(photo: LoadedImage, ensemble: tuple[str, ...]) -> NDArray[np.uint8]:
    return photo.rgb.copy()


def noise_cloak(photo: LoadedImage, ensemble: tuple[str, ...]) -> NDArray[np.uint8]:
    seed = sum(photo.name.encode())
    grey = np.random.default_rng(seed).integers(0, 256, photo.rgb.shape[:2], dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def noise_for(names: set[str]) -> ev.CloakFunction:
    def cloak(photo: LoadedImage, ensemble: tuple[str, ...]) -> NDArray[np.uint8]:
        return (
            noise_cloak(photo, ensemble)
            if Path(photo.name).stem in names
            else identity_cloak(photo, ensemble)
        )

    return cloak


def run(
    root: Path,
    cloak: ev.CloakFunction,
    *,
    embedders: Sequence[ev.Embedder] | None = None,
    ensemble: Sequence[str] = ("lin",),
    **kwargs: object,
) -> ev.EvalReport:
    return ev.evaluate(
        ev.load_dataset(root),
        cloaks={"test": cloak},
        embedders=list(embedders or [LinearEmbedder()]),
        ensemble=list(ensemble),
        finder=whole,
        **kwargs,  # type: ignore[arg-type]
    )


def score(report: ev.EvalReport, evaluator: str = "lin", kind: str = "white-box") -> ev.Score:
    (found,) = [s for s in report.modes[0].scores if s.evaluator == evaluator and s.kind == kind]
    return found


# ---------------------------------------------------------------------------------------------------
# the protocol on known answers


def test_identity_cloak_protects_nobody(tmp_path: Path) -> None:
    report = run(write_dataset(tmp_path), identity_cloak)
    s = score(report)
    assert s.eligible == 8
    saved = s.conditions[ev.AS_SAVED]
    assert (saved.p1, saved.p2, saved.p3) == (ev.Rate(0, 8), ev.Rate(0, 8), ev.Rate(0, 8))
    assert saved.self_similarity == pytest.approx(1.0, abs=1e-6)
    # An unchanged photo under a transform is exactly the control: the transform's own effect.
    (info,) = report.evaluators
    for name, c in s.conditions.items():
        assert (c.p1, c.p2, c.p3) == info.controls[name]


def test_noise_protects_everyone_in_every_condition(tmp_path: Path) -> None:
    report = run(write_dataset(tmp_path), noise_cloak)
    s = score(report)
    for c in s.conditions.values():
        assert (c.p1, c.p2, c.p3) == (ev.Rate(8, 8), ev.Rate(8, 8), ev.Rate(8, 8))
        assert c.self_similarity is not None and abs(c.self_similarity) < 0.3
    (quality,) = report.modes[0].quality
    assert quality.photos == 8 and quality.ssim_mean < 0.5 and quality.linf_max > 100


def test_only_probes_recognized_when_clean_are_counted(tmp_path: Path) -> None:
    report = run(write_dataset(tmp_path, outlier=True), noise_cloak)
    (info,) = report.evaluators
    assert info.baseline == ev.Rate(7, 8)  # ann3 is not recognized when clean
    for c in score(report).conditions.values():
        assert (c.p1, c.p2) == (ev.Rate(7, 7), ev.Rate(7, 7))
    ann3_only = run(write_dataset(tmp_path / "again", outlier=True), noise_for({"ann3"}))
    saved = score(ann3_only).conditions[ev.AS_SAVED]
    # Cloaking only the unrecognized photo protects no eligible P1 probe; as a P2 gallery photo it
    # was never anyone's match.
    assert (saved.p1, saved.p2) == (ev.Rate(0, 7), ev.Rate(0, 7))


def test_p1_and_p2_differ_where_they_should(tmp_path: Path) -> None:
    # bob1 as noise: P1 protects the bob1 probe; in P2 bob2 and bob3 still match each other. cid has
    # two photos: cid1 as noise protects the cid1 probe in P1 and the clean cid2 probe in P2.
    report = run(write_dataset(tmp_path), noise_for({"bob1", "cid1"}))
    saved = score(report).conditions[ev.AS_SAVED]
    assert saved.p1 == ev.Rate(2, 8)
    assert saved.p2 == ev.Rate(1, 8)


def test_run_protocols_directly() -> None:
    # Three photos of A along e0, two of B along e1; threshold 0.5.
    e0, e1, e2 = np.eye(3, dtype=np.float32)
    clean = np.stack([e0, e0, e0, e1, e1])
    labels = np.array([0, 0, 0, 1, 1])
    cloaked = clean.copy()
    cloaked[0] = e2  # photo 0 moved away
    cloaked[3] = np.nan  # photo 3 lost: no face found after cloaking
    out = ev.run_protocols(clean, cloaked, labels, 0.5, [0, 1, 2, 3, 4])
    assert out.eligible.tolist() == [True] * 5
    assert out.p1_recognized.tolist() == [False, True, True, False, True]
    # P2: photo 4's only same-identity gallery photo (3) is lost; photo 3's (4) is clean.
    assert out.p2_recognized.tolist() == [True, True, True, True, False]
    assert out.lost.tolist() == [False, False, False, True, False]
    # P3, among the cloaked photos only: photos 1 and 2 still find each other; 0 moved away, 3 is lost,
    # and 4's only same-identity photo (3) is lost.
    assert out.p3_recognized.tolist() == [False, True, True, False, False]
    assert out.protection("p3") == ev.Rate(3, 5)


def test_attacks_white_box_leave_one_out_and_external(tmp_path: Path) -> None:
    calls: list[tuple[str, tuple[str, ...]]] = []

    def fools_m1_only(photo: LoadedImage, ensemble: tuple[str, ...]) -> NDArray[np.uint8]:
        calls.append((photo.name, ensemble))
        return noise_cloak(photo, ensemble) if "m1" in ensemble else identity_cloak(photo, ensemble)

    embedders = [LinearEmbedder("m1"), LinearEmbedder("m2"), LinearEmbedder("twin", duplicate_of="m1")]
    report = run(write_dataset(tmp_path), fools_m1_only, embedders=embedders, ensemble=("m1", "m2"))
    assert {e for _, e in calls} == {("m1", "m2"), ("m2",), ("m1",)}
    assert len(calls) == 3 * 8
    figure = {(s.evaluator, s.kind): s.conditions[ev.AS_SAVED].p1.hits for s in report.modes[0].scores}
    assert figure == {
        ("m1", "white-box"): 8,
        ("m2", "white-box"): 8,
        ("twin", "external"): 8,
        ("m1", "leave-one-out"): 0,  # cloaked without m1: left unchanged
        ("m2", "leave-one-out"): 8,  # cloaked without m2, i.e. with m1: noise
    }
    twin = score(report, "twin", "external")
    assert twin.duplicate_of == "m1" and not twin.independent
    summary = report.modes[0].summary(report.condition_names)
    assert summary["leave-one-out"]["conditions"][ev.AS_SAVED]["p1"] == {
        "protected": 8,
        "of": 16,
        "rate": 0.5,
    }
    assert "external" not in summary  # the only external evaluator is not independent
    # Never seen by its cloak: the members' leave-one-out scores, and no duplicate of a member.
    assert summary["unseen"]["evaluators"] == ["m1", "m2"]
    assert summary["unseen"]["conditions"][ev.AS_SAVED]["p1"]["protected"] == 8
    outsider = run(
        write_dataset(tmp_path / "outsider"),
        fools_m1_only,
        embedders=[*embedders, LinearEmbedder("other")],
        ensemble=("m1", "m2"),
    )
    unseen = outsider.modes[0].summary(outsider.condition_names)["unseen"]
    assert unseen["evaluators"] == ["m1", "m2", "other"]
    # m1 left unchanged by its leave-one-out cloak, m2 and the outsider fooled by m1's noise.
    assert unseen["conditions"][ev.AS_SAVED]["p1"] == {
        "protected": 16,
        "of": 24,
        "rate": pytest.approx(2 / 3),
    }
    no_transfer = run(
        write_dataset(tmp_path / "b"),
        fools_m1_only,
        embedders=embedders,
        ensemble=("m1", "m2"),
        transfer=False,
    )
    assert {s.kind for s in no_transfer.modes[0].scores} == {"white-box", "external"}


def test_limit_takes_whole_identities_and_keeps_the_gallery(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    data = ev.load_dataset(root)
    names = [Path(data.photos[i].name).stem for i in ev.probe_indices(data, 4)]
    assert names == ["ann1", "ann2", "ann3"]
    assert len(ev.probe_indices(data, 1)) == 3 and len(ev.probe_indices(data, 6)) == 6
    report = run(root, noise_cloak, limit=6)
    assert report.probes == 6 and report.photos == 8
    assert score(report).conditions[ev.AS_SAVED].p1 == ev.Rate(6, 6)


def test_dataset_skips_small_folders_and_needs_two_identities(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    (root / "solo").mkdir()
    Image.fromarray(_photo(_pattern(5), 1), mode="L").save(root / "solo" / "solo1.png")
    (root / "bob" / "notes.txt").write_text("not an image")
    data = ev.load_dataset(root)
    assert data.identities == ("ann", "bob", "cid")
    assert any("solo" in w for w in data.warnings)
    nested = tmp_path / "nested"
    (nested / "identities").mkdir(parents=True)
    write_dataset(nested / "identities")
    assert ev.load_dataset(nested).identities == ("ann", "bob", "cid")
    lonely = tmp_path / "lonely"
    write_dataset(lonely)
    for name in ("bob", "cid"):
        for f in (lonely / name).iterdir():
            f.unlink()
    with pytest.raises(InputError, match="at least 2 identities"):
        ev.load_dataset(lonely)


def test_json_schema_is_stable(tmp_path: Path) -> None:
    embedders = [LinearEmbedder("m1"), LinearEmbedder("m2")]
    report = run(write_dataset(tmp_path), noise_cloak, embedders=embedders, ensemble=("m1", "m2"))
    data = json.loads(json.dumps(report.to_dict()))  # plain JSON types only
    assert data["schema"] == "uncnn-rt.eval/1"
    assert set(data) == {
        "schema", "dataset", "identities", "photos", "probes", "ensemble", "transfer", "aligned",
        "protocol", "conditions", "evaluators", "modes", "warnings", "jpeg_ladder",
    }  # fmt: skip
    assert [c["name"] for c in data["conditions"]] == ["as_saved", "jpeg75", "downscale50"]
    assert list(data["jpeg_ladder"]) == ["q95", "q85", "q75"]
    ladder = [data["jpeg_ladder"][q]["flip"]["median"] for q in ("q95", "q85", "q75")]
    assert ladder == sorted(ladder) and ladder[0] > 0
    assert set(data["evaluators"][0]) == {
        "name", "threshold", "in_ensemble", "duplicate_of", "baseline", "no_face", "control",
    }  # fmt: skip
    (mode,) = data["modes"]
    assert set(mode) == {"mode", "settings", "quality", "summary", "scores", "group_photos"}
    assert set(mode["quality"][0]) == {
        "attack", "ensemble", "photos", "ssim_mean", "ssim_min", "psnr_mean", "linf_max", "linf_mean",
        "seconds_per_photo", "steps_mean", "visibility", "photo_visibility",
    }  # fmt: skip
    visible = mode["quality"][0]["visibility"]
    assert set(visible) == {"faces", "flip", "ciede2000_mean", "ciede2000_p95", "ssim", "psnr", "over_jnd"}
    assert visible["faces"] == data["probes"] and visible["flip"]["median"] > 0
    # The whole photo changes only where its face does: its figures are the face's, diluted.
    photo = mode["quality"][0]["photo_visibility"]
    assert 0 < photo["flip"]["median"] <= visible["flip"]["median"]
    assert set(mode["scores"][0]) == {
        "evaluator", "kind", "attack", "threshold", "duplicate_of", "independent", "eligible", "conditions",
    }  # fmt: skip
    jpeg75 = mode["scores"][0]["conditions"]["jpeg75"]
    assert {k: v for k, v in jpeg75.items() if k != "mean_self_similarity"} == {
        "p1": {"protected": 8, "of": 8, "rate": 1.0},
        "p2": {"protected": 8, "of": 8, "rate": 1.0},
        "p3": {"unlinked": 8, "of": 8, "rate": 1.0},
        "lost_faces": 0,
    }
    # The JSON carries the score's own mean, rounded; noise is unrelated to the clean photo (|cos| < 0.3,
    # as test_noise_protects_everyone_in_every_condition checks on the objects).
    (m1_white,) = [s for s in report.modes[0].scores if (s.evaluator, s.kind) == ("m1", "white-box")]
    expected = m1_white.conditions["jpeg75"].self_similarity
    assert mode["scores"][0]["evaluator"] == "m1" and mode["scores"][0]["kind"] == "white-box"
    assert expected is not None and abs(expected) < 0.3, expected
    assert isinstance(jpeg75["mean_self_similarity"], float)
    assert jpeg75["mean_self_similarity"] == pytest.approx(expected, abs=1e-6)
    assert set(mode["summary"]) == {"white-box", "leave-one-out", "unseen"}


# ---------------------------------------------------------------------------------------------------
# group photos


def test_group_photos_self_protection(tmp_path: Path) -> None:
    left, right = _photo(_pattern(0), 1), _photo(_pattern(1), 2)
    group = np.repeat(np.concatenate([left, right], axis=1)[..., None], 3, axis=2)
    Image.fromarray(group).save(tmp_path / "group.png")
    photo = load_image(tmp_path / "group.png")
    boxes = [(0.0, 0.0, 16.0, 16.0), (16.0, 0.0, 32.0, 16.0)]

    def two_faces(rgb: NDArray[np.uint8]) -> list[FaceSite]:
        return [FaceSite(transform_for_box(b, SIZE), SIZE, box=b) for b in boxes]

    def noise_right(photo: LoadedImage, ensemble: tuple[str, ...]) -> NDArray[np.uint8]:
        out = photo.rgb.copy()
        out[:, 16:] = noise_cloak(photo, ensemble)[:, 16:]
        return out

    embedders = [LinearEmbedder("m1"), LinearEmbedder("m2")]
    report = ev.evaluate_group_photos(
        [photo], cloak=noise_right, embedders=embedders, ensemble=["m1", "m2"], finder=two_faces
    )
    assert (report.photos, report.faces) == (1, 2)
    assert len(report.scores) == 4  # two white-box, two leave-one-out
    for s in report.scores:
        saved = s.conditions[ev.AS_SAVED]
        assert saved.protected == ev.Rate(1, 2)
        assert saved.not_redetected == 0
    assert json.dumps(report.to_dict())


# ---------------------------------------------------------------------------------------------------
# evaluators from ONNX files


def _plain_model(path: Path, *, size: int = 8, dim: int = 4, batch: int = 1) -> NDArray[np.float32]:
    weights = np.random.default_rng(3).standard_normal((3 * size * size, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["y"]),
        ],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, dim])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return weights


def test_plain_onnx_evaluator_preprocesses_like_its_reference(tmp_path: Path) -> None:
    weights = _plain_model(tmp_path / "plain.onnx")
    with pytest.raises(InputError, match="threshold"):
        ev.open_evaluator(tmp_path / "plain.onnx")
    prep = ev.OnnxPreprocessing(window="full", mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))
    model = ev.open_evaluator(tmp_path / "plain.onnx", threshold=0.3, preprocessing=prep, device="cpu")
    assert isinstance(model, ev.OnnxEmbedder) and model.size == 8 and model.name == "plain"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    faces = [ev.FaceView(im, FaceSite(transform_for_whole_image(8, 8, 8), 8)) for im in images]
    got = model.embed(faces)  # three faces through a model with a fixed batch of 1
    x = (np.stack(images).astype(np.float32) - [100.0, 110.0, 120.0]) / [50.0, 60.0, 70.0]
    want = x.transpose(0, 3, 1, 2).reshape(3, -1) @ weights
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attack_graph_evaluator_reads_its_threshold(tmp_path: Path, linear_face_graph: LinearGraph) -> None:
    model = ev.open_evaluator(linear_face_graph.path, device="cpu")
    assert isinstance(model, ev.SessionEmbedder)
    assert model.threshold == pytest.approx(0.5) and model.name == "linear_face"
    assert ev.open_evaluator(linear_face_graph.path, threshold=0.7, device="cpu").threshold == 0.7


def test_real_cloak_function_end_to_end(tmp_path: Path, linear_face_graph: LinearGraph) -> None:
    """The real cloak_image against a linear attack graph protects every white-box probe (P1 and P2)
    at the graph's own threshold, and every figure is well-formed. Independent of ../shared and of the
    shipped models.

    The configuration is one where the cloak has the room to reach its goal: ``mid`` at eps 32 without
    the visibility cap (on these flat +-60 grey patterns the JPEG q75 / CIEDE2000 cap allows about 7 grey
    levels: at eps 16 with the cap the cloaked probes kept a mean self-similarity of 0.94-0.98, P1 0 of 3,
    on seeds 0..9). The cloak stops a face once it is below the threshold minus the mode's margin
    (0.5 - 0.05 = 0.45), then shrinks it to the least change still past that margin, so the cloaked probes
    end under 0.45 on the cloak's own view. The evaluator frames the photos as the cloak did
    (``finder=whole``, the graph's 16 px): the default finder frames at 224 px and resizes to 16, which
    blurs a per-pixel cloak of a 16 px photo.

    Measured with seed 0: P1 3 of 3 and P2 3 of 3, mean self-similarity 0.432. P3 is not asserted:
    an untargeted cloak moves the near-identical photos of one identity the same way, so they still link
    to each other (P3 0 of 3 on 7 of the 10 seeds, measured at margin 0.04).
    """
    session = open_session(linear_face_graph.path, device="cpu")
    embedders = [ev.SessionEmbedder(session)]  # the graph's own threshold, the one the cloak attacks
    assert embedders[0].threshold == pytest.approx(0.5)
    settings = settings_for("mid", eps=32, steps=12, ssim_min=0, cap="none")
    cloak = ev.cloak_function({session.name: session}, settings, no_align=True, seed=0)
    report = ev.evaluate(
        ev.load_dataset(write_dataset(tmp_path)),
        cloaks={"mid": cloak},
        embedders=embedders,
        ensemble=[session.name],
        finder=whole,
        limit=3,
    )
    (q,) = report.modes[0].quality
    assert q.photos == 3 and 0 < q.linf_max <= 32 and q.steps_mean is not None
    (info,) = report.evaluators
    assert info.baseline == ev.Rate(8, 8)  # every clean photo is recognized: all three probes count
    saved = report.modes[0].scores[0].conditions[ev.AS_SAVED]
    assert (saved.p1, saved.p2) == (ev.Rate(3, 3), ev.Rate(3, 3))
    # The cloak's own goal is 0.45 (threshold 0.5 minus mid's margin 0.05), and it spends no more than that
    # takes: the probes end under the goal (0.432), not far past it.
    goal = 0.5 - settings.success_margin
    assert saved.self_similarity is not None and goal - 0.1 < saved.self_similarity <= goal + 0.005


# ---------------------------------------------------------------------------------------------------
# plots and the optional extra


def test_runtime_imports_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    from uncnn_rt.runtime import plotting
    from uncnn_rt.runtime.evaluate import plots  # noqa: F401  (plots imports without matplotlib)

    with pytest.raises(MissingExtraError, match=r"\[plot\]"):
        plotting.require_matplotlib()


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from uncnn_rt.runtime.evaluate import plots

    report = run(write_dataset(tmp_path / "data"), noise_for({"ann1", "bob2"}), samples=2)
    assert len(report.modes[0].samples) == 2
    written = plots.write_plots(report, tmp_path / "plots")
    assert sorted(p.name for p in written) == [
        "before_after_test.png",
        "faces_test_100.png",
        "faces_test_200.png",
        "protection_test.png",
        "protection_vs_flip.png",
        "protection_vs_ssim.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The face strips hold the faces at their own pixel scale: 200% is exactly twice 100%.
    from PIL import Image

    one, two = (Image.open(tmp_path / "plots" / f"faces_test_{z}.png") for z in (100, 200))
    assert two.height - 8 == 2 * (one.height - 8) or two.height == 2 * one.height - 8
    diff = plots.difference_image(np.full((2, 2, 3), 100, np.uint8), np.full((2, 2, 3), 103, np.uint8))
    assert (diff == 158).all()


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_input_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    lonely = tmp_path / "lonely"
    (lonely / "ann").mkdir(parents=True)
    result = runner.invoke(app, ["eval", str(lonely), "--aligned"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "identities" in result.output
    result = runner.invoke(app, ["eval", str(lonely), "--threshold", "0.5"])
    assert result.exit_code == 2 and "--evaluator" in result.output


def test_cli_refuses_bad_outputs_and_seeds_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evaluation takes minutes to half an hour: an output it cannot write, or a seed the cloak would
    reject, is one error line and exit 2 before a model loads, not a traceback after the work."""
    loads: list[object] = []
    monkeypatch.setattr(cloaking, "load_recognizers", lambda *a, **k: loads.append(a) or [])
    data = write_dataset(tmp_path / "data")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--json", str(a_file / "r.json")], "not a folder"),
        (["--json", "/proc/r.json"], "/proc"),
        (["--plots", str(a_file / "plots")], "not a folder"),
        (["--seed", "-1"], "seed must be a whole number"),
    ]
    for extra, said in cases:
        result = CliRunner().invoke(app, ["eval", str(data), "--aligned", *extra])
        assert result.exit_code == 2, (extra, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and said in lines[0], (extra, lines)
    assert loads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "data"]


@needs_dev
@pytest.mark.shared
@pytest.mark.slow
def test_cli_on_dev_chips(tmp_path: Path) -> None:
    # Two identities of two chips each, two attack steps: the real models and the whole CLI path.
    data = tmp_path / "dev"
    for name in ("amy", "raj"):
        (data / name).mkdir(parents=True)
        for j in (1, 2):
            (data / name / f"{name}{j}.png").write_bytes(
                (DEV / "identities" / name / f"{name}{j}.png").read_bytes()
            )
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "-q",
            "eval",
            str(data),
            "--aligned",
            "--no-transfer",
            "--steps",
            "2",
            "--mode",
            "low",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["probes"] == 4 and report["aligned"] is True
    names = {e["name"]: e for e in report["evaluators"]}
    assert names["expo_mobilefacenet"]["duplicate_of"] == "mobilefacenet"
    assert names["faceres"]["baseline"]["recognized"] == 4
    (mode,) = report["modes"]
    assert mode["quality"][0]["ssim_mean"] >= 0.97 - 1e-3  # the low mode's floor
    assert "Protection" in result.output and "expo_mobilefacenet" in result.output


def test_tables_keep_model_names_whole_at_120_columns(tmp_path: Path) -> None:
    """Two recognizers that share a prefix (mobileface, mobilefacenet) must not both read 'mobilefa…'."""
    import io

    from rich.console import Console

    from uncnn_rt.cli import eval_cmd

    embedders = [LinearEmbedder("mobileface"), LinearEmbedder("mobilefacenet")]
    report = run(
        write_dataset(tmp_path), noise_cloak, embedders=embedders, ensemble=("mobileface", "mobilefacenet")
    )
    buffer = io.StringIO()
    eval_cmd.print_report(report, Console(file=buffer, width=120))
    text = buffer.getvalue()
    assert "mobilefa…" not in text and "mobileface…" not in text
    rows = [line for line in text.splitlines() if "mobilefacenet" in line]
    assert len(rows) >= 4  # the evaluators' table, then white-box and leave-one-out rows
    assert any("mobileface " in line and "mobilefacenet" not in line for line in text.splitlines())


def test_the_mode_title_names_the_mode_once() -> None:
    from uncnn_rt.cli import eval_cmd
    from uncnn_rt.runtime.cloak import MODES

    mid = MODES["mid"]
    assert eval_cmd._mode_title("mid", mid.describe()) == mid.describe()
    assert not eval_cmd._mode_title("mid", mid.describe()).startswith("mid: mid:")
    assert eval_cmd._mode_title("test", "") == "test"


def test_plot_options_name_the_extra_in_their_help() -> None:
    for command in (["eval", "--help"], ["robustness", "--help"]):
        result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
        assert result.exit_code == 0
        assert "needs the [plot] extra" in result.output, command
