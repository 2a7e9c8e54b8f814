"""Image data sets as the batch jobs read them: an ImageFolder tree or a CSV of ``path,label`` rows,
streamed as :class:`Item` s, and the per-item hash every deterministic draw comes from.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.imageio import IMAGE_SUFFIXES
from uncnn_rt.runtime.sessions import AttackSession


@dataclass(frozen=True)
class Item:
    """One image of a data set.

    ``name`` is its path relative to the data set's root, with ``/`` separators: the key of its seed,
    of resuming and of its output path.
    """

    source: str
    name: str
    label: str | None


def data_root(data: str | Path) -> Path:
    """The folder the item names are relative to: the ImageFolder itself, or the CSV's folder."""
    path = Path(data)
    return path if path.is_dir() else path.parent


def iter_dataset(data: str | Path) -> Iterator[Item]:
    """The images of ``data``, streamed in a fixed order.

    - A folder is read as an ImageFolder: ``root/<class>/.../<image>``, the class being the first folder
      below the root; images directly in the root have no label. Hidden entries are skipped, and so are
      files whose suffix is not an image's. Folders are listed one at a time, sorted by name.
    - A ``.csv`` file needs a header with a ``path`` column (relative to the CSV's folder, or absolute
      inside it) and may have a ``label`` column.
    """
    path = Path(data)
    if path.is_dir():
        return _image_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv_items(path)
    if not path.exists():
        raise InputError(f"{data}: no such file or folder")
    raise InputError(f"{data}: expected an ImageFolder directory or a .csv of paths and labels")


def count_items(data: str | Path) -> int:
    """How many images :func:`iter_dataset` yields (a listing pass; no image is decoded)."""
    return sum(1 for _ in iter_dataset(data))


def _image_folder(root: Path) -> Iterator[Item]:
    def walk(folder: Path, parts: tuple[str, ...]) -> Iterator[Item]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise InputError(f"{folder}: cannot list it ({exc.strerror or exc})") from exc
        stems: dict[str, str] = {}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                yield from walk(Path(entry.path), (*parts, entry.name))
            elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                stem = Path(entry.name).stem
                if stem in stems:
                    raise InputError(
                        f"{folder}: {stems[stem]} and {entry.name} would both be written as {stem}.png; "
                        "rename one of them"
                    )
                stems[stem] = entry.name
                name = "/".join((*parts, entry.name))
                yield Item(str(Path(entry.path).resolve()), name, parts[0] if parts else None)

    if not any(True for _ in _first_image(root)):
        raise InputError(f"{root}: no images in this folder or its class folders")
    return walk(root, ())


def _first_image(root: Path) -> Iterator[Path]:
    for _, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(f)
                return


def _csv_items(path: Path) -> Iterator[Item]:
    root = path.parent.resolve()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "path" not in fields:
            raise InputError(
                f"{path}: expected a header with a 'path' column (and optionally 'label'), got {fields}"
            )
    return _csv_rows(path, root)


def _csv_rows(path: Path, root: Path) -> Iterator[Item]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
        for line, row in enumerate(reader, start=2):
            given = (row.get("path") or "").strip()
            if not given:
                continue
            source = (root / given).resolve()
            try:
                rel = source.relative_to(root)
            except ValueError:
                raise InputError(
                    f"{path}, line {line}: {given} is outside the CSV's folder {root}; "
                    "list paths inside it (outputs keep their relative paths)"
                ) from None
            label = (row.get("label") or "").strip() or None
            yield Item(str(source), rel.as_posix(), label)


def item_hash(seed: int, name: str, *extra: str) -> bytes:
    """The 32 bytes every per-image draw comes from."""
    return hashlib.sha256("\0".join(("uncnn-rt", str(seed), name, *extra)).encode("utf-8")).digest()


def class_lookup(session: AttackSession) -> dict[str, int]:
    """Class names a data set may use for a classifier: its metadata labels, and indices ``0..D-1``."""
    dim = session.info.embedding_dim
    lookup = {str(i): i for i in range(dim)}
    for i, label in enumerate(session.info.labels or ()):
        lookup.setdefault(label, i)
    return lookup


def class_index(label: str, lookup: dict[str, int], session: AttackSession) -> int:
    index = lookup.get(label)
    if index is None:
        has = "its labels or " if session.info.labels else ""
        raise InputError(
            f"class {label!r} is not one of {has}the class indices 0..{session.info.embedding_dim - 1} "
            f"of {session.name}; name class folders (or CSV labels) after the model's classes"
        )
    return index
