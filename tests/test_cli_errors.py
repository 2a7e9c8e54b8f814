"""Errors through the real ``uncnn-rt`` entry point, as a subprocess, and the atomic writer every output
goes through (``runtime/fileio.py``).

The subprocess tests catch what Typer's CliRunner cannot: how the process itself ends. ``cloak`` opens
its models on background threads while the first photo decodes; a photo that fails to decode used to
end the process during onnxruntime's session building, which aborted it (SIGABRT, exit 134,
``terminate called without an active exception``) after the right error line, in 25 runs of 26.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from uncnn_rt.runtime import fileio
from uncnn_rt.runtime.errors import OutputPathError

RUNS = 12


def entry_point() -> Path:
    """The installed ``uncnn-rt`` script beside this interpreter (the console script of pyproject)."""
    script = Path(sys.executable).parent / ("uncnn-rt.exe" if os.name == "nt" else "uncnn-rt")
    if not script.is_file():
        pytest.skip(f"the uncnn-rt entry point is not installed beside {sys.executable}")
    return script


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The astronaut as a PNG and as a JPEG, each cut in half: the header reads, the pixels do not."""
    skdata = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("truncated")
    paths = []
    for fmt, name in (("PNG", "astronaut.png"), ("JPEG", "astronaut.jpg")):
        buffer = io.BytesIO()
        Image.fromarray(skdata.astronaut()).save(buffer, format=fmt)
        data = buffer.getvalue()
        (folder / name).write_bytes(data[: len(data) // 2])
        paths.append(folder / name)
    return paths


def test_a_truncated_photo_exits_2_every_time_not_134(truncated: list[Path]) -> None:
    """Exit 2 and one error line, on every run (before the fix: 134 in nearly every run, both with and
    without --json, whose report said exit_code 2)."""
    script = entry_point()
    for run in range(RUNS):
        source = truncated[run % 2]
        as_json = run % 4 >= 2
        result = subprocess.run(
            [str(script), "cloak", str(source), *(["--json"] if as_json else [])],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=source.parent,
        )
        where = f"run {run} on {source.name}{' --json' if as_json else ''}: exit {result.returncode}"
        assert result.returncode == 2, f"{where}\n{result.stderr}"
        if as_json:  # the error is in the report, and nothing else is said
            report = json.loads(result.stdout)
            assert report["exit_code"] == 2 and result.stderr == "", f"{where}\n{result.stderr}"
            assert report["files"][0]["error"].startswith(f"{source}: truncated or corrupt")
        else:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {source}: truncated or corrupt"), where
        assert sorted(p.name for p in source.parent.iterdir()) == ["astronaut.jpg", "astronaut.png"]


# ---- the atomic writer --------------------------------------------------------------------------------


def _fail_midway(error: BaseException):  # type: ignore[no-untyped-def]
    def write(fh: io.BufferedWriter, data: bytes) -> None:
        fh.write(data[: len(data) // 2])
        fh.flush()
        raise error

    return write


def test_a_full_disk_leaves_the_old_file_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"the previous output")
    monkeypatch.setattr(fileio, "_write_all", _fail_midway(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(OutputPathError) as raised:
        fileio.atomic_write_bytes(target, b"new bytes " * 10_000)
    assert str(raised.value) == f"{target}: cannot write (No space left on device)"
    assert target.read_bytes() == b"the previous output"
    fresh = tmp_path / "new.bin"
    with pytest.raises(OutputPathError):
        fileio.atomic_write_bytes(fresh, b"new bytes " * 10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no partial file, no .tmp


def test_ctrl_c_during_a_write_removes_the_temporary_file_and_goes_on_as_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fileio, "_write_all", _fail_midway(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_bytes(tmp_path / "out.bin", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["file/x.onnx", "missing/x.onnx", "/proc/x.onnx"])
def test_an_unwritable_place_is_one_error_that_never_names_the_temporary_file(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("a regular file")
    target = Path(where) if where.startswith("/") else tmp_path / where
    with pytest.raises(OutputPathError) as raised:
        fileio.atomic_write_bytes(target, b"x")
    message = str(raised.value)
    assert ".tmp" not in message and str(target.parent) in message
    if where.startswith("missing"):
        assert message == f"{target.parent}: no such folder for the output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_checks_of_a_new_output_refuse_before_any_work_and_create_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a regular file")
    fileio.check_new_file(tmp_path / "a" / "b" / "r.json")  # missing folders a command may create
    fileio.check_new_folder(tmp_path / "a" / "b")
    for bad in (tmp_path / "file" / "r.json", tmp_path / "file" / "sub" / "r.json", Path("/proc/x/r.json")):
        with pytest.raises(OutputPathError):
            fileio.check_new_file(bad)
    with pytest.raises(OutputPathError, match="is a directory"):
        fileio.check_new_file(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
