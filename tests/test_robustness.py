"""``uncnn-rt robustness``: accuracy under FGSM/PGD over eps, on the hand-built linear classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import LinearGraph
from PIL import Image
from test_augment import predicted
from typer.testing import CliRunner

from uncnn_rt.augment import RobustnessConfig, measure_robustness
from uncnn_rt.cli.app import app
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession, open_session


@pytest.fixture
def classifier(linear_classifier_graph: LinearGraph) -> AttackSession:
    return open_session(linear_classifier_graph.path, device="cpu", intra_op_threads=1)


@pytest.fixture
def labelled(tmp_path: Path, classifier: AttackSession) -> tuple[Path, float]:
    """16 images at the model's size; every third is filed under a wrong class. Returns the folder and
    its clean accuracy, computed here directly from the model's outputs."""
    rng = np.random.default_rng(4)
    correct = 0
    for i in range(16):
        rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        top = predicted(classifier, rgb)
        label = (top + 1) % 10 if i % 3 == 0 else top
        folder = tmp_path / "data" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:02d}.png")
        clean = int(np.argmax(classifier.features(rgb[None].astype(np.float32))[0]))
        correct += clean == label
    return tmp_path / "data", correct / 16


def test_eps_zero_is_the_clean_accuracy_and_attacks_lower_it(
    labelled: tuple[Path, float], classifier: AttackSession
) -> None:
    data, clean = labelled
    assert 0 < clean < 1
    config = RobustnessConfig(attacks=("fgsm", "pgd"), eps=(0, 2, 8, 32), steps=10)
    report = measure_robustness(classifier.path, data, config)
    assert report.images == 16
    assert report.clean_accuracy == clean
    for attack in ("fgsm", "pgd"):
        accuracy = report.accuracy(attack)
        assert accuracy[0] == clean
        assert all(a <= clean for a in accuracy)
        assert accuracy[-1] < clean
    assert report.accuracy("pgd")[-1] == 0.0  # eps 32 against a linear model: nothing survives
    payload = report.to_dict()
    assert payload["eps"] == [0, 2, 8, 32]
    assert payload["attacks"]["pgd"]["accuracy"][0] == payload["clean_accuracy"] == round(clean, 6)


def test_two_workers_measure_the_same(labelled: tuple[Path, float], classifier: AttackSession) -> None:
    data, _ = labelled
    config = RobustnessConfig(attacks=("pgd",), eps=(0, 3, 6), steps=4, seed=2)
    one = measure_robustness(classifier.path, data, config, workers=1)
    two = measure_robustness(classifier.path, data, config, workers=2)
    assert one.to_dict() == two.to_dict()


def test_limit_and_labels(tmp_path: Path, labelled: tuple[Path, float], classifier: AttackSession) -> None:
    data, _ = labelled
    assert measure_robustness(classifier.path, data, RobustnessConfig(eps=(0, 1), limit=5)).images == 5
    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(unlabelled / "a.png")
    with pytest.raises(InputError, match="no label"):
        measure_robustness(classifier.path, unlabelled)
    with pytest.raises(InputError, match="attacks must be among"):
        RobustnessConfig(attacks=("deepfool",))


def test_cli_table_json_and_plot(
    tmp_path: Path, labelled: tuple[Path, float], classifier: AttackSession, linear_face_graph: LinearGraph
) -> None:
    pytest.importorskip("matplotlib")
    data, clean = labelled
    report, plot = tmp_path / "r" / "robust.json", tmp_path / "r" / "robust.png"
    runner = CliRunner()
    args = ["-q", "robustness", str(classifier.path), str(data), "--eps", "0,4", "--steps", "3"]
    args += ["--workers", "1"]
    result = runner.invoke(app, [*args, "--json", str(report), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "fgsm" in result.stdout and "pgd (3 steps)" in result.stdout
    assert f"clean accuracy {100 * clean:.1f}" in result.stdout
    payload = json.loads(report.read_text())
    assert payload["clean_accuracy"] == round(clean, 6) and payload["images"] == 16
    with Image.open(plot) as png:
        assert png.format == "PNG" and png.width > 200

    printed = runner.invoke(app, [*args, "--json", "-"])
    assert json.loads(printed.stdout)["attacks"]["fgsm"]["accuracy"][0] == round(clean, 6)

    face = runner.invoke(app, ["robustness", str(linear_face_graph.path), str(data)])
    assert face.exit_code == 2
    assert "measures a classifier's accuracy" in face.stderr


def test_autoattack_is_never_above_pgd_and_says_what_broke_each_image(
    labelled: tuple[Path, float], classifier: AttackSession
) -> None:
    """``--attacks autoattack``: the robust accuracy is at most PGD's at every eps (the ensemble's first
    attack alone is as strong as fixed-step PGD on a linear model), every image it breaks is credited to
    one of its attacks, and the counts add up to the clean accuracy minus the robust one."""
    data, clean = labelled
    config = RobustnessConfig(attacks=("pgd", "autoattack"), eps=(0, 2, 4), steps=10)
    report = measure_robustness(classifier.path, data, config)
    pgd, auto = report.accuracy("pgd"), report.accuracy("autoattack")
    assert auto[0] == pgd[0] == clean
    assert all(a <= p for a, p in zip(auto, pgd, strict=True)), (auto, pgd)
    assert auto[-1] < clean
    payload = report.to_dict()
    broken = payload["attacks"]["autoattack"]["broken_by"]
    assert broken[0] == {}
    for eps_index, counts in enumerate(broken):
        assert set(counts) <= {"apgd-ce", "apgd-t", "fab-t", "square"}
        assert sum(counts.values()) == report.clean_correct - report.correct["autoattack"][eps_index]
    assert payload["attacks"]["autoattack"]["steps"] is None
    per_image = payload["attacks"]["autoattack"]["broken_images"]  # which attack broke each image
    assert sum(names[-1] is not None for names in per_image.values()) == sum(broken[-1].values())
    assert all(len(names) == 3 and names[0] is None for names in per_image.values())
    one = RobustnessConfig(attacks=("square",), eps=(0, 8), seed=1)
    assert measure_robustness(classifier.path, data, one).to_dict()["attacks"]["square"]["broken_by"][1]


# ---- issue 25: reports that cannot be written ----------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "where"),
    [
        ("--json", "file/r.json"),
        ("--json", "file/sub/r.json"),
        ("--json", "/proc/r.json"),
        ("--plot", "file/r.png"),
    ],
)
def test_an_unwritable_report_is_refused_before_the_measuring(
    tmp_path: Path,
    labelled: tuple[Path, float],
    classifier: AttackSession,
    monkeypatch: pytest.MonkeyPatch,
    option: str,
    where: str,
) -> None:
    """Under a regular file or in /proc nothing can be written, for root too (unlike a chmod)."""
    from uncnn_rt.runtime.jobs import robustness as rob

    if option == "--plot":
        pytest.importorskip("matplotlib")
    data, _ = labelled
    (tmp_path / "file").write_text("a regular file")
    target = Path(where) if where.startswith("/") else tmp_path / where
    monkeypatch.setattr(rob, "measure_robustness", lambda *a, **k: pytest.fail("the measuring started"))
    args = ["robustness", str(classifier.path), str(data), "--eps", "0,2", option, str(target)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ".tmp" not in lines[0], result.stderr
    assert str(target.parent if where.startswith("/") else tmp_path / "file") in lines[0]


def test_a_full_disk_when_the_report_is_written_is_one_line_and_leaves_nothing(
    tmp_path: Path, labelled: tuple[Path, float], classifier: AttackSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from uncnn_rt.runtime import fileio

    def full(fh: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio, "_write_all", full)
    data, _ = labelled
    report = tmp_path / "out" / "r.json"
    args = ["-q", "robustness", str(classifier.path), str(data), "--eps", "0,2", "--attacks", "fgsm"]
    result = CliRunner().invoke(app, [*args, "--workers", "1", "--json", str(report)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {report}: cannot write (No space left on device)"]
    assert list((tmp_path / "out").iterdir()) == []
