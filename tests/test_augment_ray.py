"""``augment(engine="ray")``: the Ray Data pipeline writes what the local engine writes, on a local Ray
cluster this test starts (2 CPUs, a 100 MB object store, no dashboard) and shuts down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LinearGraph
from test_augment import make_folder, written_files

from uncnn_rt.augment import AugmentConfig, augment, read_manifest
from uncnn_rt.runtime.jobs.augment import MANIFEST
from uncnn_rt.runtime.sessions import open_session

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
pytest.importorskip("ray.data", reason="the [ray] extra (ray[data]) is not installed")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            object_store_memory=100 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_ray_writes_the_same_bytes_as_local(
    tmp_path: Path, linear_classifier_graph: LinearGraph, local_ray: None
) -> None:
    session = open_session(linear_classifier_graph.path, device="cpu", intra_op_threads=1)
    data = make_folder(tmp_path / "data", session, count=10, seed=1)
    config = AugmentConfig(attack="pgd", eps=(2.0, 8.0), steps=4, ratio=0.8, seed=21)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    expected = augment(session.path, data, local, config, workers=1)
    summary = augment(session.path, data, on_ray, config, workers=2, engine="ray")

    assert summary.to_dict() | {"out": "", "manifest": ""} == expected.to_dict() | {"out": "", "manifest": ""}
    assert 0 < summary.written < 10
    assert (on_ray / MANIFEST).read_bytes() == (local / MANIFEST).read_bytes()
    assert written_files(on_ray) == written_files(local) == {r["path"] for r in read_manifest(on_ray)}
    for name in written_files(local):
        assert (on_ray / name).read_bytes() == (local / name).read_bytes()
    assert not [p for p in on_ray.rglob("*.tmp")]

    again = augment(session.path, data, on_ray, config, workers=2, engine="ray")
    assert (again.written, again.already_done) == (0, summary.written)
