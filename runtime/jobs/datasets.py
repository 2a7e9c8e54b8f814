"""Image data sets as the batch jobs read them: an ImageFolder tree or a CSV of ``path,label`` rows,
streamed as :class:`Item` s, and the per-item hash every deterministic draw comes from.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    where: str = ""
    """Where the data set lists it, for errors: ``list.csv, line 7``, or the class folder."""

    def at(self) -> str:
        """``where: `` for an error message about this item (nothing when unknown)."""
        return f"{self.where}: " if self.where else ""


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
                label = parts[0] if parts else None
                where = "" if label is None else f"{root / label}{os.sep}"
                yield Item(str(Path(entry.path).resolve()), name, label, where)

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
    """The rows of a CSV data set, checked up to its first row here (header, encoding, at least one
    image), the rest as they stream."""
    rows = _csv_rows(path, path.parent.resolve())
    try:
        first = next(rows)
    except StopIteration:
        raise InputError(f"{path}: lists no images (a header and no rows)") from None
    return itertools.chain((first,), rows)


def _csv_rows(path: Path, root: Path) -> Iterator[Item]:
    with _open_csv(path) as fh:
        reader = csv.DictReader(_text_lines(fh, path))
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            raise InputError(f"{path}, line 1: not a readable CSV header ({exc})") from None
        fields = [f.strip() for f in header or []]
        if "path" not in fields:
            raise InputError(
                f"{path}: expected a header with a 'path' column (and optionally 'label'), got {fields}"
            )
        reader.fieldnames = fields
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(f"{path}, line {reader.line_num}: not a readable CSV row ({exc})") from None
            where = f"{path}, line {reader.line_num}"
            if None in row or None in row.values():
                got = len(fields) + len(row.get(None) or ()) - sum(v is None for v in row.values())
                raise InputError(
                    f"{where}: {got} field{'s' if got != 1 else ''} where the header has {len(fields)} "
                    f"({', '.join(fields)})"
                )
            given = (row.get("path") or "").strip()
            if not given:
                raise InputError(f"{where}: no path (every row names an image)")
            source = (root / given).resolve()
            try:
                rel = source.relative_to(root)
            except ValueError:
                raise InputError(
                    f"{where}: {given} is outside the CSV's folder {root}; "
                    "list paths inside it (outputs keep their relative paths)"
                ) from None
            label = (row.get("label") or "").strip() or None
            yield Item(str(source), rel.as_posix(), label, where)


def _open_csv(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


def _text_lines(fh: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines as UTF-8 text (a byte-order mark dropped), decoded one at a time so that a
    byte that is not UTF-8 is reported on its own line rather than as a traceback."""
    for number, raw in enumerate(fh, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{path}, line {number}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                "a data set CSV is a UTF-8 text file of path,label rows"
            ) from None


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


def class_index(label: str, lookup: dict[str, int], session: AttackSession, *, where: str = "") -> int:
    """The class index of ``label`` (a label of the model or an index); ``where`` (``list.csv, line 7:``)
    starts the error of an unknown one."""
    index = lookup.get(label)
    if index is None:
        has = "its labels or " if session.info.labels else ""
        last = session.info.embedding_dim - 1
        raise InputError(
            f"{where}class {label!r} is not one of {has}the class indices 0..{last} "
            f"of {session.name}; name class folders (or CSV labels) after the model's classes"
        )
    return index
