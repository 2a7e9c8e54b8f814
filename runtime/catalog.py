"""The shipped model zoo: ``models/manifest.json`` and the ONNX files beside it.

Each manifest entry records provenance (source package and exact version, upstream project, license),
the sha256 of the shipped file, the model's kind and preprocessing, and its dev-set figures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uncnn_rt.runtime.errors import InputError, ModelError

if TYPE_CHECKING:
    from uncnn_rt.runtime.sessions import AttackSession

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ModelEntry:
    """One shipped model, as the manifest describes it."""

    name: str
    file: str
    sha256: str
    kind: str
    role: str
    license: str
    source: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def path(self) -> Path:
        return models_dir() / self.file

    @property
    def threshold(self) -> float | None:
        value = self.raw.get("threshold")
        return None if value is None else float(value)

    @property
    def in_default_ensemble(self) -> bool:
        return bool(self.raw.get("default_ensemble", False))

    @property
    def genuine_p95(self) -> float | None:
        """The dev set's 95th percentile of same-person similarities (``dev.genuine_p95``), or None."""
        value = self.raw.get("dev", {}).get("genuine_p95")
        return None if value is None else float(value)


def models_dir() -> Path:
    """The folder of the installed ``uncnn_rt.models`` package."""
    return Path(str(resources.files("uncnn_rt.models")))


def load_manifest(path: Path | None = None) -> list[ModelEntry]:
    """Parse the manifest; a missing or malformed manifest is a :class:`ModelError`."""
    manifest = path or models_dir() / MANIFEST_NAME
    if not manifest.is_file():
        return []
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return [
            ModelEntry(
                name=e["name"],
                file=e["file"],
                sha256=e["sha256"],
                kind=e["kind"],
                role=e.get("role", e["kind"]),
                license=e["source"]["license"],
                source=e["source"],
                raw=e,
            )
            for e in data["models"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{manifest}: malformed manifest ({exc!r})") from exc


def get_model(name: str) -> ModelEntry:
    entries = {e.name: e for e in load_manifest()}
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise ModelError(f"no shipped model named {name!r} (shipped: {known})")
    return entries[name]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(entry: ModelEntry) -> str | None:
    """Return ``None`` when the shipped file matches its manifest hash, else a one-line reason."""
    if not entry.path.is_file():
        return f"{entry.file}: missing"
    actual = sha256_file(entry.path)
    if actual != entry.sha256:
        return f"{entry.file}: sha256 {actual[:12]}... does not match the manifest's {entry.sha256[:12]}..."
    return None


# ---------------------------------------------------------------------------------------------------
# resolving a model: the one way every command turns a name or a path into a model


def resolve_model(model: str | Path) -> Path:
    """The file of ``model``: a path to an ONNX file (an attack graph made by ``uncnn-rt convert
    grad``, or a shipped one), or the name of a shipped model.

    Raises:
        ModelError: neither a file nor a shipped model's name.
    """
    path = Path(model)
    if path.is_file():
        return path.resolve()
    if path.suffix == "" and "/" not in str(model):
        return get_model(str(model)).path
    raise ModelError(f"{model}: no such model file (or shipped model name)")


def genuine_similarity(session: AttackSession) -> float | None:
    """How close a person's other photos come to one photo of theirs on ``session``'s recognizer: the
    manifest's ``dev.genuine_p95`` of the shipped model whose file ``session`` runs, or None (a user's
    own attack graph; a manifest from before the figure)."""
    try:
        path = session.path.resolve()
    except OSError:
        return None
    for entry in load_manifest():
        if entry.kind == "face" and entry.path.resolve() == path:
            return entry.genuine_p95
    return None


def default_recognizer_names() -> list[str]:
    """The shipped face recognizers flagged for the default ensemble."""
    return [e.name for e in load_manifest() if e.kind == "face" and e.in_default_ensemble]


def load_recognizers(names: Sequence[str] | None = None, *, device: str = "auto") -> list[AttackSession]:
    """Open face recognizers: shipped names, or paths to face attack graphs (``uncnn-rt convert grad``),
    in the order given; default: the shipped default ensemble. ``cloak``, ``compare``, ``eval`` and
    ``serve`` all open their white-box models here.

    Raises:
        InputError: a name is neither a shipped face recognizer nor a file, or a file is not a face
            model's attack graph.
        ModelError: no recognizer is shipped, or a file is missing or broken.
    """
    from uncnn_rt.runtime.sessions import open_session

    entries = {e.name: e for e in load_manifest() if e.kind == "face"}
    if names is None:
        chosen = [e.path for e in entries.values() if e.in_default_ensemble]
        if not chosen:
            raise ModelError(
                "no face recognizers are shipped in this installation (build the zoo: "
                "python -m uncnn_rt.converters.zoo build)"
            )
        return [open_session(path, device=device) for path in chosen]
    if not names:
        raise InputError("give at least one recognizer name")
    unknown = [n for n in names if n not in entries and not Path(n).is_file()]
    if unknown:
        raise InputError(
            f"unknown recognizer(s) {', '.join(unknown)}; shipped: {', '.join(sorted(entries)) or 'none'} "
            "(or give the path of a face model's attack graph, made by uncnn-rt convert grad)"
        )
    sessions = []
    for name in dict.fromkeys(names):
        session = open_session(entries[name].path if name in entries else Path(name), device=device)
        if session.info.kind != "face":
            raise InputError(f"{name}: a {session.info.kind} model, not a face recognizer")
        sessions.append(session)
    return sessions
