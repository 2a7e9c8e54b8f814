"""The labelled data sets of ``uncnn-rt eval``: one folder per identity, and unlabelled group photos.

A data set folder holds one sub-folder per identity with at least 2 photos (directly, or under
``identities/``), and optionally ``photos/``: group photos without identity labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.imageio import IMAGE_SUFFIXES, LoadedImage, load_image


@dataclass(frozen=True)
class Photo:
    """One labelled photo of a dataset."""

    identity: str
    image: LoadedImage = field(repr=False)

    @property
    def name(self) -> str:
        return self.image.name


@dataclass(frozen=True)
class Dataset:
    """Labelled photos, grouped by identity (sorted by identity, then file name)."""

    root: Path
    photos: tuple[Photo, ...]
    warnings: tuple[str, ...] = ()

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.identity for p in self.photos))

    @property
    def labels(self) -> NDArray[np.intp]:
        index = {name: i for i, name in enumerate(self.identities)}
        return np.array([index[p.identity] for p in self.photos], dtype=np.intp)


def identities_folder(root: Path) -> Path:
    """The folder holding the identity folders: ``root/identities`` when present, else ``root``."""
    nested = root / "identities"
    return nested if nested.is_dir() else root


def group_photos_folder(root: Path) -> Path | None:
    """``root/photos`` (group photos without identity labels) when present."""
    folder = root / "photos"
    return folder if folder.is_dir() else None


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_dataset(root: str | Path) -> Dataset:
    """Read ``root`` (or ``root/identities``): one sub-folder per identity with at least 2 photos.

    Folders with fewer photos and unreadable images are skipped with a warning.

    Raises:
        InputError: not a folder, or fewer than 2 usable identities.
    """
    base = Path(root)
    if not base.is_dir():
        raise InputError(f"{base}: expected a folder with one sub-folder per identity")
    folder = identities_folder(base)
    photos: list[Photo] = []
    warnings: list[str] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        loaded: list[Photo] = []
        for path in image_files(sub):
            try:
                loaded.append(Photo(sub.name, load_image(path)))
            except InputError as exc:
                warnings.append(f"skipped {path}: {exc}")
        if len(loaded) < 2:
            warnings.append(f"skipped identity {sub.name!r}: {len(loaded)} usable photo(s), 2 needed")
            continue
        photos += loaded
    found = len({p.identity for p in photos})
    if found < 2:
        raise InputError(
            f"{folder}: {found} identity folder(s) with at least 2 photos; the protocol needs at least 2 "
            "identities (one sub-folder per person)"
        )
    return Dataset(base, tuple(photos), tuple(warnings))


def load_group_photos(folder: str | Path, *, limit: int | None = None) -> tuple[list[LoadedImage], list[str]]:
    """The images of ``folder`` (not recursive), at most ``limit``; unreadable ones as warnings."""
    photos: list[LoadedImage] = []
    warnings: list[str] = []
    for path in image_files(Path(folder)):
        if limit is not None and len(photos) >= limit:
            break
        try:
            photos.append(load_image(path))
        except InputError as exc:
            warnings.append(f"skipped {path}: {exc}")
    return photos, warnings


def probe_indices(dataset: Dataset, limit: int | None) -> list[int]:
    """The photos to cloak: all, or whole identities (in order) up to ``limit`` photos, at least one."""
    if limit is None:
        return list(range(len(dataset.photos)))
    if limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    chosen: list[int] = []
    for identity in dataset.identities:
        members = [i for i, p in enumerate(dataset.photos) if p.identity == identity]
        if chosen and len(chosen) + len(members) > limit:
            break
        chosen += members
    return chosen
