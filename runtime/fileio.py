"""File writes that never leave a half-written output and never replace an input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from uncnn_rt.runtime.errors import OutputPathError


def _read_umask() -> int:
    # Reading the umask means setting it; done once, at import, before any thread writes files.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_NEW_FILE_MODE = 0o666 & ~_read_umask()  # what open() gives a new file


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    The file gets the permissions a plain ``open(path, "w")`` would give it (mkstemp's are 0600), so an
    output is as readable as any other file the user writes. When the write fails (a full disk, a
    read-only folder, a missing one) :class:`OutputPathError` names ``path`` and the reason, never the
    temporary file; nothing is left behind and a file already at ``path`` is unchanged. An interruption
    (Ctrl-C) also removes the temporary file, and is raised as it is.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, data)
            os.fchmod(fh.fileno(), _NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from exc
        raise


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """The one place the bytes go out (tests make it fail midway, as a full disk would)."""
    fh.write(data)


def _cannot_write(path: Path, exc: OSError) -> OutputPathError:
    if isinstance(exc, FileNotFoundError) and not path.parent.exists():
        return OutputPathError(f"{path.parent}: no such folder for the output")
    return OutputPathError(f"{path}: cannot write ({exc.strerror or exc})")


def check_writable_folder(folder: Path) -> None:
    """Raise :class:`OutputPathError` unless a file can be created in ``folder``, before any work is done.

    It tries what :func:`atomic_write_bytes` will do (a temporary file, removed at once) rather than
    reading permission bits, which say nothing of read-only mounts, ACLs or root.
    """
    where = folder if str(folder) else Path(".")
    if not where.exists():
        raise OutputPathError(f"{where}: no such folder for the output")
    if not where.is_dir():
        raise OutputPathError(f"{where}: not a folder, cannot hold the output")
    try:
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".uncnn-rt-check.", suffix=".tmp")
    except OSError as exc:
        raise OutputPathError(f"{where}: cannot write the output there ({exc.strerror or exc})") from exc
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def check_new_file(path: Path) -> None:
    """Raise :class:`OutputPathError` unless ``path`` can be written, its missing folders created first.

    For outputs whose folders a command creates (``robustness --json``, ``--plot``): ``path`` must not
    be a folder, and its nearest existing ancestor must be a folder a file can be created in.
    """
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory, expected an output file path")
    check_new_folder(path.parent)


def check_new_folder(folder: Path) -> None:
    """Raise :class:`OutputPathError` unless ``folder`` is, or can be created as, a writable folder.

    Nothing is created: the nearest existing ancestor must be a folder a file can be written in (a path
    under a regular file, ``/proc`` or a read-only mount is refused before any work is done).
    """
    where = folder if str(folder) else Path(".")
    if where.exists():
        check_writable_folder(where)
        return
    ancestor = where
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{where}: cannot create the output folder ({ancestor} is not a folder)")
    try:
        fd, tmp = tempfile.mkstemp(dir=ancestor, prefix=".uncnn-rt-check.", suffix=".tmp")
    except OSError as exc:
        raise OutputPathError(
            f"{where}: cannot create the output folder in {ancestor} ({exc.strerror or exc})"
        ) from exc
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def make_folder(folder: Path) -> None:
    """Create ``folder`` and its parents (if missing); an :class:`OutputPathError` when that fails."""
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{folder}: not a folder, cannot hold the output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from exc
