"""``uncnn_rt.augment``: adversarial variants of a data set, manifest, resume, determinism, CLI.

The small tests run on the hand-built linear classifier and face graphs of ``conftest.py`` over folders
of random images labelled with the model's own clean prediction; one test runs the shipped
EfficientNet-Lite0 on a real photo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import LinearGraph
from numpy.typing import NDArray
from PIL import Image
from typer.testing import CliRunner

from uncnn_rt.augment import AugmentConfig, augment, iter_dataset, plan_item, read_manifest
from uncnn_rt.cli.app import app
from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.cloak.verify import classify_image
from uncnn_rt.runtime.errors import InputError, OutputPathError
from uncnn_rt.runtime.jobs.augment import MANIFEST, SETTINGS
from uncnn_rt.runtime.jobs.variants import View
from uncnn_rt.runtime.sessions import AttackSession, open_session

# Square at the model's size, non-square (the model sees the centred square), and larger (resized).
SIZES = ((16, 16), (20, 28), (16, 16), (32, 32), (28, 20), (16, 16))


def predicted(session: AttackSession, rgb: NDArray[np.uint8]) -> int:
    """The model's top class for an image, through the view the augmentation uses."""
    x = rgb[None].astype(np.float32)
    return int(
        np.argmax(session.features(View.of(rgb.shape[0], rgb.shape[1], session.info.canonical_size)(x)))
    )


def make_folder(root: Path, session: AttackSession, count: int = 12, *, seed: int = 0) -> Path:
    """An ImageFolder of random images, each filed under the class the model predicts for it (so the
    clean accuracy is 100%); every fourth image is greyscale."""
    rng = np.random.default_rng(seed)
    labels = session.info.labels
    assert labels is not None
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(rgb)
        if i % 4 == 3:
            image = image.convert("L")
            rgb = np.repeat(np.asarray(image)[..., None], 3, axis=2)
        folder = root / labels[predicted(session, rgb)]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i:02d}.png")
    return root


def rgb_of(path: Path) -> NDArray[np.uint8]:
    return np.asarray(Image.open(path).convert("RGB"))


def written_files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png")}


@pytest.fixture
def classifier(linear_classifier_graph: LinearGraph) -> AttackSession:
    return open_session(linear_classifier_graph.path, device="cpu", intra_op_threads=1)


@pytest.fixture
def folder(tmp_path: Path, classifier: AttackSession) -> Path:
    return make_folder(tmp_path / "data", classifier)


def test_manifest_rows_match_files_and_eps_range_holds(
    tmp_path: Path, folder: Path, classifier: AttackSession
) -> None:
    out = tmp_path / "out"
    config = AugmentConfig(attack="pgd", eps=(2.0, 6.5), steps=5, seed=3)
    summary = augment(classifier.path, folder, out, config)
    rows = read_manifest(out)
    assert summary.written == len(rows) == 12 and not summary.errors
    assert {r["path"] for r in rows} == written_files(out)
    assert len({r["path"] for r in rows}) == len(rows)
    eps_seen = set()
    for row in rows:
        source = rgb_of(folder / row["source"])
        adv = rgb_of(out / row["path"])
        assert adv.shape == source.shape
        change = np.abs(adv.astype(int) - source.astype(int))
        assert 2.0 <= row["eps"] <= 6.5
        assert change.max() == row["linf"] <= np.floor(row["eps"])
        eps_seen.add(row["eps"])
        assert row["eps"] == plan_item(config, row["source"]).eps
        h, w = source.shape[:2]
        if h != w:  # only the centred square the model sees may change
            side, top, left = min(h, w), (h - min(h, w)) // 2, (w - min(h, w)) // 2
            outside = np.ones((h, w), bool)
            outside[top : top + side, left : left + side] = False
            assert change[outside].max() == 0 and change[~outside].max() > 0
        # The manifest's verdict is the saved file's: re-classify it independently.
        after = predicted(classifier, adv)
        assert row["label"] == row["source"].split("/")[0]
        assert row["label_index"] == predicted(classifier, source)
        assert row["success"] == (after != row["label_index"])
        assert row["predicted_after"] == classifier.info.labels[after]  # type: ignore[index]
        assert row["confidence_after"] < row["confidence_before"]
    assert len(eps_seen) > 6  # drawn per image, not one value
    assert sum(r["success"] for r in rows) >= 6
    grey = [r for r in rows if int(r["source"][-6:-4]) % 4 == 3]
    for row in grey:  # greyscale sources stay grey
        assert Image.open(out / row["path"]).mode == "L"


def test_fixed_eps_fgsm_moves_every_pixel_by_eps(
    tmp_path: Path, folder: Path, classifier: AttackSession
) -> None:
    out = tmp_path / "out"
    augment(classifier.path, folder, out, AugmentConfig(attack="fgsm", eps=(4.0, 4.0)))
    for row in read_manifest(out):
        assert row["eps"] == 4.0 and row["steps"] == 1
        source, adv = rgb_of(folder / row["source"]), rgb_of(out / row["path"])
        change = np.abs(adv.astype(int) - source.astype(int))
        h, w = source.shape[:2]
        if h == w:  # one signed step of eps, clipped only at 0 and 255
            clipped = (adv == 0) | (adv == 255)
            assert np.all((change == 4) | clipped)


def test_rerun_skips_finished_and_redoes_what_a_crash_lost(
    tmp_path: Path, folder: Path, classifier: AttackSession
) -> None:
    out = tmp_path / "out"
    config = AugmentConfig(attack="bim", eps=(3.0, 3.0), steps=3)
    augment(classifier.path, folder, out, config)
    first = {p: (out / p).read_bytes() for p in written_files(out)}
    stamps = {p: (out / p).stat().st_mtime_ns for p in first}

    again = augment(classifier.path, folder, out, config)
    assert (again.written, again.already_done) == (0, 12)
    assert {p: (out / p).stat().st_mtime_ns for p in first} == stamps

    # A crash: one output lost, and a torn half line at the end of the journal.
    lost = sorted(first)[4]
    (out / lost).unlink()
    with (out / MANIFEST).open("a") as fh:
        fh.write('{"path": "class_')
    resumed = augment(classifier.path, folder, out, config)
    assert (resumed.written, resumed.already_done) == (1, 11)
    rows = read_manifest(out)
    assert sorted(r["path"] for r in rows) == sorted(first) == sorted(written_files(out))
    assert (out / lost).read_bytes() == first[lost]


def test_other_settings_into_the_same_output_are_refused(
    tmp_path: Path, folder: Path, classifier: AttackSession
) -> None:
    out = tmp_path / "out"
    augment(classifier.path, folder, out, AugmentConfig(eps=(4.0, 4.0), steps=2))
    with pytest.raises(InputError, match=r"other settings.*eps"):
        augment(classifier.path, folder, out, AugmentConfig(eps=(8.0, 8.0), steps=2))
    assert json.loads((out / SETTINGS).read_text())["config"]["eps"] == [4.0, 4.0]


def test_two_workers_write_the_same_bytes_as_one(
    tmp_path: Path, folder: Path, classifier: AttackSession
) -> None:
    config = AugmentConfig(attack="pgd", eps=(1.0, 8.0), steps=4, seed=11)
    one, two = tmp_path / "one", tmp_path / "two"
    augment(classifier.path, folder, one, config, workers=1)
    augment(classifier.path, folder, two, config, workers=2)
    assert (one / MANIFEST).read_bytes() == (two / MANIFEST).read_bytes()
    assert written_files(one) == written_files(two)
    for name in written_files(one):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_ratio_draws_the_same_images_every_time(tmp_path: Path, classifier: AttackSession) -> None:
    data = make_folder(tmp_path / "data", classifier, count=24)
    config = AugmentConfig(attack="fgsm", eps=(2.0, 2.0), ratio=0.5, seed=5)
    summary = augment(classifier.path, data, tmp_path / "out", config)
    expected = {item.name for item in iter_dataset(data) if plan_item(config, item.name).selected}
    written = {r["source"] for r in read_manifest(tmp_path / "out")}
    assert written == expected
    assert 0 < len(written) < 24
    assert summary.not_selected == 24 - len(written)
    other_seed = {
        item.name
        for item in iter_dataset(data)
        if plan_item(AugmentConfig(ratio=0.5, seed=6), item.name).selected
    }
    assert other_seed != expected


def test_targeted_rows_name_their_target(tmp_path: Path, folder: Path, classifier: AttackSession) -> None:
    out = tmp_path / "out"
    augment(
        classifier.path, folder, out, AugmentConfig(attack="pgd", eps=(24.0, 24.0), steps=10, targeted=True)
    )
    rows = read_manifest(out)
    labels = classifier.info.labels
    assert labels is not None
    for row in rows:
        assert row["targeted"] and row["target_index"] != row["label_index"]
        assert row["target"] == labels[row["target_index"]]
        reached = predicted(classifier, rgb_of(out / row["path"])) == row["target_index"]
        assert row["success"] == reached
        assert row["target_confidence_after"] > row["target_confidence_before"]
    assert len({r["target_index"] for r in rows}) > 1  # drawn per image
    assert sum(r["success"] for r in rows) >= 8

    fixed = tmp_path / "fixed"
    augment(
        classifier.path,
        folder,
        fixed,
        AugmentConfig(attack="pgd", eps=(24.0, 24.0), targeted=True, target="7"),
    )
    assert {r["target_index"] for r in read_manifest(fixed)} <= {7}


def test_face_model_moves_away_from_the_clean_embedding(
    tmp_path: Path, linear_face_graph: LinearGraph
) -> None:
    data = tmp_path / "people"
    rng = np.random.default_rng(2)
    for person in ("ann", "bob"):
        (data / person).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                data / person / f"{i}.png"
            )
    out = tmp_path / "out"
    augment(linear_face_graph.path, data, out, AugmentConfig(attack="pgd", eps=(16.0, 16.0), steps=10))
    face = open_session(linear_face_graph.path, device="cpu")
    for row in read_manifest(out):
        assert row["label"] == row["source"].split("/")[0] and row["label_index"] is None
        clean = face.features(rgb_of(data / row["source"])[None].astype(np.float32))[0]
        adv = face.features(rgb_of(out / row["path"])[None].astype(np.float32))[0]
        assert row["confidence_before"] == pytest.approx(1.0, abs=1e-5)
        assert row["confidence_after"] == pytest.approx(float(clean @ adv), abs=1e-4)
        assert row["success"] == (row["confidence_after"] < 0.5)  # the graph's threshold
    with pytest.raises(InputError, match="targeted augmentation needs a classifier"):
        augment(linear_face_graph.path, data, tmp_path / "t", AugmentConfig(targeted=True))
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_csv_data_set(tmp_path: Path, classifier: AttackSession) -> None:
    images = tmp_path / "set" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(9)
    lines = ["path,label"]
    for i in range(4):
        rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(images / f"{i}.jpg")
        lines.append(f"images/{i}.jpg,{predicted(classifier, np.asarray(Image.open(images / f'{i}.jpg')))}")
    csv = tmp_path / "set" / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = augment(classifier.path, csv, out, AugmentConfig(attack="fgsm", eps=(3.0, 3.0)))
    rows = read_manifest(out)
    assert summary.written == 4
    assert [r["path"] for r in rows] == [f"images/{i}.png" for i in range(4)]
    assert [r["label_index"] for r in rows] == [int(line.split(",")[1]) for line in lines[1:]]

    outside = tmp_path / "set" / "bad.csv"
    outside.write_text("path,label\n../elsewhere.png,1\n")
    with pytest.raises(InputError, match="outside the CSV's folder"):
        augment(classifier.path, outside, tmp_path / "out2")
    unknown = tmp_path / "set" / "unknown.csv"
    unknown.write_text("path,label\nimages/0.jpg,zebra\n")
    with pytest.raises(InputError, match="'zebra' is not one of its labels"):
        augment(classifier.path, unknown, tmp_path / "out3")
    headless = tmp_path / "set" / "headless.csv"
    headless.write_text("images/0.jpg,1\n")
    with pytest.raises(InputError, match="'path' column"):
        augment(classifier.path, headless, tmp_path / "out4")


def test_output_inside_the_data_set_is_refused(
    tmp_path: Path, folder: Path, classifier: AttackSession
) -> None:
    with pytest.raises(OutputPathError, match="inside it"):
        augment(classifier.path, folder, folder / "adv")
    with pytest.raises(OutputPathError):
        augment(classifier.path, folder, folder)
    assert not (folder / "adv").exists()


def test_cli_augment_writes_and_reports(tmp_path: Path, folder: Path, classifier: AttackSession) -> None:
    bad = folder / "class_0"
    bad.mkdir(exist_ok=True)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            *("-q", "--device", "cpu", "augment", str(classifier.path), str(folder), "-o", str(out)),
            *("--attack", "fgsm", "--eps", "2:4", "--workers", "1", "--json"),
        ],
    )
    assert result.exit_code == 2, result.output
    summary = json.loads(result.stdout)
    assert summary["written"] == 12 and summary["images"] == 13
    assert [e["source"] for e in summary["errors"]] == ["class_0/broken.png"]
    assert "error: class_0/broken.png" in result.stderr
    assert len(read_manifest(out)) == 12

    usage = runner.invoke(app, ["augment", str(classifier.path), str(folder), "-o", str(out), "--eps", "9:3"])
    assert usage.exit_code == 2
    assert usage.stderr.strip().splitlines() == [
        "error: eps range must satisfy 0 <= LOW <= HIGH <= 255, got '9:3'"
    ]


def test_cli_refuses_a_plain_onnx_model_with_the_convert_command(tmp_path: Path, folder: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(plain))
    result = CliRunner().invoke(app, ["augment", str(plain), str(folder), "-o", str(tmp_path / "out")])
    assert result.exit_code == 3
    assert "uncnn-rt convert grad" in result.stderr and "plain.attack.onnx" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_shipped_classifier_on_a_real_photo(tmp_path: Path) -> None:
    skdata = pytest.importorskip("skimage.data")
    entry = catalog.get_model("efficientnet_lite0")
    photo = skdata.chelsea()  # 300 x 451: not square, larger than the model's 224
    data = tmp_path / "photos" / "unlabelled"
    data.mkdir(parents=True)
    Image.fromarray(photo).save(data / "chelsea.png")
    # No ImageNet class is named "unlabelled": use a CSV without labels (the model's top class is attacked).
    csv = tmp_path / "photos" / "list.csv"
    csv.write_text("path\nunlabelled/chelsea.png\n")
    out = tmp_path / "out"
    summary = augment(entry.path, csv, out, AugmentConfig(attack="pgd", eps=(4.0, 4.0), steps=2))
    (row,) = read_manifest(out)
    assert summary.written == 1
    adv = rgb_of(out / row["path"])
    assert adv.shape == photo.shape
    assert row["linf"] == np.abs(adv.astype(int) - photo.astype(int)).max() <= 4
    session = open_session(entry.path, device="cpu")
    assert row["label"] is None
    assert row["predicted_before"] == classify_image(photo, session, top=1)[0][0]
    assert row["confidence_after"] < row["confidence_before"]
    assert np.array_equal(adv[:, :75], photo[:, :75]) and np.array_equal(adv[:, -76:], photo[:, -76:])


# ---- issue 25: a data set is checked whole before anything is written ------------------------------------


def _csv_set(tmp_path: Path, classifier: AttackSession, rows: list[str]) -> Path:
    """``set/images/0..3.png`` (labelled with the model's own class) and ``set/list.csv`` holding the
    header and ``rows`` (``{i}`` in a row is image i's label)."""
    images = tmp_path / "set" / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(9)
    labels = []
    for i in range(4):
        rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(images / f"{i}.png")
        labels.append(str(predicted(classifier, rgb)))
    csv = tmp_path / "set" / "list.csv"
    csv.write_text("\n".join(["path,label", *(r.format(*labels) for r in rows)]) + "\n")
    return csv


def test_a_job_that_fails_validation_writes_nothing_and_the_corrected_rerun_goes_on(
    tmp_path: Path, classifier: AttackSession
) -> None:
    """An unknown label on line 4 is found before anything is written, with its line; the corrected
    rerun into the same folder is then not refused as 'other settings' (augment.json was left behind)."""
    good = ["images/0.png,{0}", "images/1.png,{1}", "images/2.png,{2}", "images/3.png,{3}"]
    csv = _csv_set(tmp_path, classifier, [*good[:2], "images/2.png,zebra", good[3]])
    out = tmp_path / "out"
    config = AugmentConfig(attack="fgsm", eps=(2.0, 2.0))
    with pytest.raises(InputError, match=r"list\.csv, line 4: class 'zebra' is not one of"):
        augment(classifier.path, csv, out, config)
    assert not out.exists()
    _csv_set(tmp_path, classifier, good)
    assert augment(classifier.path, csv, out, config).written == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"path,label\nimages/0.png,1,extra\n", r"list\.csv, line 2: 3 fields where the header has 2"),
        (b"path,label\nimages/0.png,1\nimages/1.png\n", r"list\.csv, line 3: 1 field where the header has 2"),
        (b"path,label\nimages/0.png,1\n,2\n", r"list\.csv, line 3: no path"),
        (b"path,label\n", r"list\.csv: lists no images \(a header and no rows\)"),
        (b"path,label\nimages/0.png,1\nimages/\xff\xfe.png,2\n", r"list\.csv, line 3: not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, r"list\.csv, line 1: not UTF-8 text \(byte 0x89\)"),
    ],
    ids=["long-row", "short-row", "no-path", "header-only", "binary-row", "binary-file"],
)
def test_a_malformed_csv_is_refused_with_its_line_before_anything_is_written(
    tmp_path: Path, classifier: AttackSession, body: bytes, message: str
) -> None:
    csv = _csv_set(tmp_path, classifier, [])
    csv.write_bytes(body)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        augment(classifier.path, csv, out, AugmentConfig(attack="fgsm", eps=(2.0, 2.0)))
    assert not out.exists()
    result = CliRunner().invoke(app, ["augment", str(classifier.path), str(csv), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()


def test_the_manifest_a_run_reports_exists_even_when_no_image_was_drawn(
    tmp_path: Path, folder: Path, classifier: AttackSession
) -> None:
    out = tmp_path / "out"
    summary = augment(classifier.path, folder, out, AugmentConfig(attack="fgsm", ratio=0.0))
    assert summary.written == 0 and summary.not_selected == 12
    assert (out / MANIFEST).is_file() and read_manifest(out) == []


@pytest.mark.parametrize("where", ["file/adv", "file/sub/adv", "/proc/uncnn-rt-adv"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(
    tmp_path: Path, folder: Path, classifier: AttackSession, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Under a regular file or in /proc a folder cannot be made, for root too (unlike a chmod)."""
    from uncnn_rt.runtime.jobs import augment as job

    (tmp_path / "file").write_text("a regular file")
    target = Path(where) if where.startswith("/") else tmp_path / where
    monkeypatch.setattr(job, "plan_tasks", lambda *a, **k: pytest.fail("the work started"))
    result = CliRunner().invoke(app, ["augment", str(classifier.path), str(folder), "-o", str(target)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]


@pytest.mark.parametrize("eps", ["0", "0:0"])
def test_an_eps_of_0_is_refused_before_anything_is_written(tmp_path: Path, folder: Path, eps: str) -> None:
    """Every variant would be an unchanged copy of its image, listed in the manifest as an attack."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["augment", "nonesuch.onnx", str(folder), "-o", str(out), "--eps", eps])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: eps must be above 0 (an eps of 0 writes unchanged copies), got 0"
    ]
    assert not out.exists()
