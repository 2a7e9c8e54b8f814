"""File writes that never leave a half-written output and never replace an input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
    output is as readable as any other file the user writes.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), _NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
