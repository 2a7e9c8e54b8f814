"""Adversarial augmentation of an image data set against any attack-graph model, resumable and parallel.

For every image of a data set (an ImageFolder tree or a CSV of paths and labels) the job writes an
adversarial variant as a PNG under ``OUT`` (same relative path, ``.png`` suffix) and appends one row to
``OUT/manifest.jsonl``: source, label, attack, eps, success, and the model's confidence before and after.
Training code mixes the variants in by reading the manifest (``pandas.read_json(path, lines=True)``).

**The model's view.** The perturbation lives in the image's own pixel grid, at its native size, so the
written variant has the input's size. The model sees the image's centred square resized to its
canonical ``S x S`` through exact linear maps (a crop and :class:`~.attacks.linear.Resize`, whose adjoints
carry the gradient back), the view ``uncnn-rt classify`` takes; outside that square the image is left
unchanged (the budget is masked to 0 there). Cost grows with the pixel count.

**Determinism.** Every per-image decision (whether ``ratio`` draws it, its eps within a range, its target
class, the attack's random start) comes from ``sha256(seed, relative path)``, and every image is attacked
alone, so the outputs do not depend on the number of workers, their order or the engine (local processes
or Ray). onnxruntime's float reductions may change with its thread count, hence ``threads`` is part of
the job's settings.

**Resume.** ``OUT/augment.json`` records the job's settings and the model's sha256. A rerun with the same
settings skips every image whose manifest row and output file both exist; other settings are refused.
Rows are appended one line per image and flushed, so a killed job loses at most the torn last line,
which the next run drops (and redoes that image).

**Streaming.** The data set is read as a stream (per folder, sorted), and at most ``2 * workers`` chunks
are in flight, so memory stays flat on large folders apart from the set of finished names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.errors import InputError, OutputPathError
from uncnn_rt.runtime.fileio import atomic_write_bytes, check_new_folder, make_folder
from uncnn_rt.runtime.jobs.datasets import class_index, class_lookup, data_root, iter_dataset
from uncnn_rt.runtime.jobs.parallel import WorkerSpec, chunked, ordered_map, worker_session
from uncnn_rt.runtime.jobs.variants import (
    AugmentConfig,
    Task,
    VariantOutcome,
    output_name,
    plan_item,
    run_task,
)
from uncnn_rt.runtime.sessions import AttackSession, open_session

ENGINES: Final = ("local", "ray")
MANIFEST: Final = "manifest.jsonl"


SETTINGS: Final = "augment.json"


CHUNK: Final = 4
"""Images per task sent to a worker: enough to amortise the hand-over, few enough to balance the load."""


def _augment_chunk(job: tuple[AugmentConfig, str, list[Task]]) -> list[VariantOutcome]:
    config, out, tasks = job
    session = worker_session()
    outcomes = []
    for task in tasks:
        outcome = run_task(session, config, task)
        if outcome.png is not None and outcome.row is not None:
            write_output(Path(out), outcome.row["path"], outcome.png)
            outcome = replace(outcome, png=None)
        outcomes.append(outcome)
    return outcomes


def write_output(out: Path, name: str, png: bytes) -> None:
    target = out / name
    make_folder(target.parent)
    atomic_write_bytes(target, png)


class Manifest:
    """``OUT/manifest.jsonl``: one JSON row per written image, appended and flushed as each finishes."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / MANIFEST

    def create(self) -> None:
        """Make the (empty) manifest of a new job, so that the path a run reports always exists."""
        if not self.path.is_file():
            atomic_write_bytes(self.path, b"")

    def finished(self) -> set[str]:
        """Output names with a complete row and an existing file. A torn last line (a killed run) and
        rows whose file is gone are dropped from the journal, so those images are done again."""
        if not self.path.is_file():
            return set()
        raw = self.path.read_bytes()
        kept: list[bytes] = []
        done: set[str] = set()
        dropped = False
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["path"]
            except (ValueError, KeyError, TypeError):
                dropped = True
                continue
            if not isinstance(name, str) or name in done or not (self.out / name).is_file():
                dropped = True
                continue
            done.add(name)
            kept.append(line)
        if dropped or (raw and not raw.endswith(b"\n")):
            atomic_write_bytes(self.path, b"".join(line + b"\n" for line in kept))
        return done

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, sort_keys=False, separators=(",", ":")) + "\n"
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
        except OSError as exc:
            raise OutputPathError(f"{self.path}: cannot write ({exc.strerror or exc})") from exc


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``OUT/manifest.jsonl``."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


@dataclass
class AugmentSummary:
    """Counts of one run (a resumed run counts only what it did itself), and the input errors."""

    out: Path
    total: int = 0
    written: int = 0
    already_done: int = 0
    not_selected: int = 0
    succeeded: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def success_rate(self) -> float | None:
        return None if self.written == 0 else self.succeeded / self.written

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "manifest": str(self.out / MANIFEST),
            "images": self.total,
            "written": self.written,
            "already_done": self.already_done,
            "not_selected": self.not_selected,
            "succeeded": self.succeeded,
            "success_rate": None if self.success_rate is None else round(self.success_rate, 6),
            "errors": [{"source": name, "error": message} for name, message in self.errors],
        }


AugmentProgressCallback = Callable[[str, str], None]
"""Called once per image with its name and what happened: written, done, skipped or error."""


def _settings(model: Path, data: str | Path, config: AugmentConfig) -> dict[str, Any]:
    return {
        "model": model.name,
        "model_sha256": catalog.sha256_file(model),
        "data": str(Path(data).resolve()),
        "config": config.to_dict(),
    }


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(
                f"{path}: unreadable job settings ({exc}); choose another output folder"
            ) from exc
        if previous != settings:
            old, new = _flatten(previous), _flatten(settings)
            changed = [
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(old | new)
                if old.get(k) != new.get(k)
            ]
            raise InputError(
                f"{out} holds an augmentation with other settings ({'; '.join(changed)}); "
                "rerun with the same settings to resume, or choose another output folder"
            )
    else:
        atomic_write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode("utf-8"))


def _flatten(settings: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in settings.items() if k != "config"}
    flat |= {f"config.{k}": v for k, v in dict(settings.get("config") or {}).items()}
    return flat


def _check_paths(data: str | Path, out: Path) -> None:
    root = data_root(data).resolve()
    target = out.resolve()
    if Path(data).is_dir() and (target == root or root in target.parents):
        raise OutputPathError(f"{out}: the output folder must not be the data set's folder or inside it")
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{out}: exists and is not a folder")
    check_new_folder(out)  # a read-only place, a path under a file: refused before any work


def check_dataset(session: AttackSession, data: str | Path, out: Path, config: AugmentConfig) -> int:
    """Read the whole listing of ``data`` once, before anything is written, and raise the first error a
    job would meet on the way (an unknown class, with its CSV line or class folder; a malformed row; two
    images with one output name; an output over its input). Returns the number of images.

    A job that stopped on such an error half-way used to leave ``OUT/augment.json`` behind, and the
    corrected rerun was then refused as "other settings"."""
    lookup = class_lookup(session) if session.info.kind == "classifier" else {}
    seen: dict[str, str] = {}
    count = 0
    for item in iter_dataset(data):
        count += 1
        name = output_name(item.name)
        if name in seen:
            raise InputError(
                f"{item.at()}{item.name}: {seen[name]} is also written as {name}; list each image once"
            )
        seen[name] = item.name
        if (out / name).resolve() == Path(item.source):
            raise OutputPathError(f"{out / name}: refusing to overwrite the input {item.name}")
        if item.label is not None and session.info.kind == "classifier":
            class_index(item.label, lookup, session, where=item.at())
    return count


def plan_tasks(
    session: AttackSession,
    data: str | Path,
    out: Path,
    config: AugmentConfig,
    done: set[str],
    summary: AugmentSummary,
    progress: AugmentProgressCallback | None,
) -> Iterator[Task]:
    """The images still to do, with their classes resolved; counts the others in ``summary``."""
    info = session.info
    lookup = class_lookup(session) if info.kind == "classifier" else {}
    fixed_target = target_class(session, config)
    seen: set[str] = set()
    for item in iter_dataset(data):
        summary.total += 1
        name = output_name(item.name)
        if name in seen:
            raise InputError(f"{item.name}: a second image would be written as {name}; list each image once")
        seen.add(name)
        if (out / name).resolve() == Path(item.source):
            raise OutputPathError(f"{out / name}: refusing to overwrite the input {item.name}")
        if name in done:
            summary.already_done += 1
            if progress:
                progress(item.name, "done")
            continue
        if not plan_item(config, item.name).selected:
            summary.not_selected += 1
            if progress:
                progress(item.name, "skipped")
            continue
        label_index = None
        if item.label is not None and info.kind == "classifier":
            label_index = class_index(item.label, lookup, session, where=item.at())
        yield Task(item, label_index, fixed_target)


def target_class(session: AttackSession, config: AugmentConfig) -> int | None:
    """The fixed target class of a targeted job (``None``: drawn per image), checked against the model."""
    if not config.targeted:
        return None
    if session.info.kind != "classifier":
        raise InputError(
            f"targeted augmentation needs a classifier; {session.name} is a {session.info.kind} model"
        )
    return None if config.target is None else class_index(config.target, class_lookup(session), session)


def augment(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    config: AugmentConfig | None = None,
    *,
    workers: int = 1,
    engine: Literal["local", "ray"] = "local",
    device: str = "cpu",
    ray_address: str | None = None,
    progress: AugmentProgressCallback | None = None,
) -> AugmentSummary:
    """Write adversarial variants of the images of ``data`` under ``out``, with ``out/manifest.jsonl``.

    Args:
        model: an attack graph (see :mod:`.contract`) or the name of a shipped model.
        data: an ImageFolder directory or a CSV of ``path,label`` (see :func:`iter_dataset`).
        out: the output folder (created; not inside an ImageFolder ``data``). Rerunning with the same
            settings resumes; other settings are refused.
        config: the attack and the per-image draws (:class:`AugmentConfig`).
        workers: processes (``local``) or Ray actors (``ray``), each with its own onnxruntime session.
        engine: ``local`` (a process pool on this machine) or ``ray`` (a Ray Data pipeline, see
            :mod:`.ray_engine`); both write the same bytes for the same settings.
        device: onnxruntime device of every session (``cpu``, ``cuda``, ``auto``, ...).
        ray_address: the Ray cluster to join (``auto``, ``ray://head:10001``); ``None``: the running one,
            ``RAY_ADDRESS``, or a new local one.
        progress: called per image (see :data:`AugmentProgressCallback`).

    Returns:
        The counts of this run and the images that could not be read (they are not in the manifest).
    """
    config = config or AugmentConfig()
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    target = Path(out)
    path = catalog.resolve_model(model)
    session = open_session(path, device=device, intra_op_threads=config.threads)
    _check_paths(data, target)
    target_class(session, config)
    check_dataset(session, data, target, config)  # every error a listing can show, before writing
    make_folder(target)
    _check_settings(target, _settings(path, data, config))
    manifest = Manifest(target)
    manifest.create()
    summary = AugmentSummary(target)
    tasks = plan_tasks(session, data, target, config, manifest.finished(), summary, progress)
    spec = WorkerSpec(str(path), device, config.threads)
    outcomes: Iterable[VariantOutcome]
    if engine == "ray":
        from uncnn_rt.runtime.jobs.ray_engine import run_on_ray

        outcomes = run_on_ray(spec, config, tasks, target, workers=workers, address=ray_address)
    else:
        chunks = ((config, str(target), chunk) for chunk in chunked(tasks, CHUNK))
        outcomes = (
            o for batch in ordered_map(_augment_chunk, chunks, spec=spec, workers=workers) for o in batch
        )
    for outcome in outcomes:
        if outcome.row is not None:
            manifest.append(outcome.row)
            summary.written += 1
            summary.succeeded += bool(outcome.row["success"])
            status = "written"
        else:
            summary.errors.append((outcome.name, outcome.error or "failed"))
            status = "error"
        if progress:
            progress(outcome.name, status)
    return summary


__all__ = [
    "ENGINES",
    "MANIFEST",
    "AugmentProgressCallback",
    "AugmentSummary",
    "augment",
    "read_manifest",
]
