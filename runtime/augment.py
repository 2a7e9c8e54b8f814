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

import csv
import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import zoo
from uncnn_rt.runtime.attacks import BIM, FGSM, MIFGSM, PGD, GradientAttack, LinearMap, Resize, Victim
from uncnn_rt.runtime.errors import InputError, ModelError, OutputPathError, UncnnError
from uncnn_rt.runtime.fileio import atomic_write_bytes
from uncnn_rt.runtime.imageio import LoadedImage, encode_image, load_image
from uncnn_rt.runtime.sessions import AttackSession, open_session

Float32Array = NDArray[np.float32]
T = TypeVar("T")
R = TypeVar("R")

ATTACKS: Final = ("fgsm", "bim", "pgd", "mifgsm")
"""The L-inf attacks a job may use (see :mod:`.attacks.pgd`)."""
ENGINES: Final = ("local", "ray")
IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST: Final = "manifest.jsonl"
SETTINGS: Final = "augment.json"
CHUNK: Final = 4
"""Images per task sent to a worker: enough to amortise the hand-over, few enough to balance the load."""


# ---------------------------------------------------------------------------------------------------
# data sets


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


def output_name(name: str) -> str:
    """The output's path relative to ``OUT``: the source's relative path with a ``.png`` suffix."""
    return PurePosixPath(name).with_suffix(".png").as_posix()


# ---------------------------------------------------------------------------------------------------
# settings and per-image plan


def parse_eps(text: str) -> tuple[float, float]:
    """``"8"`` -> ``(8, 8)``; ``"2:16"`` -> ``(2, 16)``, a range each image draws its eps from (0..255)."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"eps must be a number or a range LOW:HIGH (0..255 units), got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise InputError(f"eps must be a number or a range LOW:HIGH (0..255 units), got {text!r}")
    low, high = values
    if not (0 <= low <= high <= 255):
        raise InputError(f"eps range must satisfy 0 <= LOW <= HIGH <= 255, got {text!r}")
    return low, high


@dataclass(frozen=True)
class AugmentConfig:
    """What an augmentation job does to each image.

    Args:
        attack: one of :data:`ATTACKS`: ``fgsm`` (one step of eps), ``bim`` (I-FGSM), ``pgd`` (L-inf PGD
            from a random start), ``mifgsm`` (momentum).
        eps: the L-inf budget in grey levels (0..255): ``(low, high)``, each image drawing its own eps
            uniformly from the range (``low == high``: a fixed eps). The saved 8-bit image changes by at
            most ``floor(eps)`` per pixel.
        steps: iterations (ignored by ``fgsm``).
        step_size: per-step size in grey levels; ``None``: the attack's default.
        targeted: move each image towards a target class instead of away from its own (classifiers).
        target: the target class (a label of the model or an index); ``None``: a random class other
            than the image's own, drawn per image.
        ratio: the share of images that get a variant, drawn per image (deterministically).
        seed: the seed of every per-image draw.
        threads: onnxruntime intra-op threads per worker.
    """

    attack: str = "pgd"
    eps: tuple[float, float] = (8.0, 8.0)
    steps: int = 10
    step_size: float | None = None
    targeted: bool = False
    target: str | None = None
    ratio: float = 1.0
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise InputError(f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        low, high = self.eps
        if not (0 <= low <= high <= 255):
            raise InputError(f"eps range must satisfy 0 <= low <= high <= 255, got {self.eps}")
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not self.step_size >= 0:
            raise InputError(f"step_size must be >= 0, got {self.step_size}")
        if not 0.0 <= self.ratio <= 1.0:
            raise InputError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.target is not None and not self.targeted:
            raise InputError("a target class needs targeted=True (--targeted)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eps"] = list(self.eps)
        return data


@dataclass(frozen=True)
class Plan:
    """The per-image draws, all from ``sha256(seed, name)``."""

    selected: bool
    eps: float
    target_draw: float
    seed: int


def item_hash(seed: int, name: str, *extra: str) -> bytes:
    """The 32 bytes every per-image draw comes from."""
    return hashlib.sha256("\0".join(("uncnn-rt", str(seed), name, *extra)).encode("utf-8")).digest()


def _uniform(digest: bytes, word: int) -> float:
    return int.from_bytes(digest[8 * word : 8 * word + 8], "little") / 2.0**64


def plan_item(config: AugmentConfig, name: str) -> Plan:
    """Whether ``ratio`` draws the image, its eps (rounded to 1/1000 grey level), target draw and seed."""
    digest = item_hash(config.seed, name)
    low, high = config.eps
    eps = round(low + _uniform(digest, 1) * (high - low), 3)
    return Plan(
        selected=_uniform(digest, 0) < config.ratio,
        eps=min(max(eps, low), high),
        target_draw=_uniform(digest, 2),
        seed=int.from_bytes(digest[24:32], "little"),
    )


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


# ---------------------------------------------------------------------------------------------------
# the model's view of an image


class CenterSquare(LinearMap):
    """The centred ``side x side`` square of ``[N, H, W, C]`` images; its adjoint pads with zeros."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.side = min(height, width)
        self.top, self.left = (height - self.side) // 2, (width - self.side) // 2

    def forward(self, images: Float32Array) -> Float32Array:
        window = images[:, self.top : self.top + self.side, self.left : self.left + self.side]
        return np.ascontiguousarray(window, dtype=np.float32)

    def adjoint(self, grad: Float32Array) -> Float32Array:
        out = np.zeros((grad.shape[0], self.height, self.width, grad.shape[3]), np.float32)
        out[:, self.top : self.top + self.side, self.left : self.left + self.side] = grad
        return out

    def mask(self) -> Float32Array:
        """``[H, W]``: 1 on the square, 0 elsewhere."""
        m = np.zeros((self.height, self.width), np.float32)
        m[self.top : self.top + self.side, self.left : self.left + self.side] = 1.0
        return m


@dataclass(frozen=True)
class View:
    """How the model sees an ``H x W`` image: ``crop`` (None when square), then a resize to ``S x S``."""

    crop: CenterSquare | None
    resize: Resize | None

    @classmethod
    def of(cls, height: int, width: int, size: int) -> View:
        crop = None if height == width else CenterSquare(height, width)
        side = min(height, width)
        return cls(crop, None if side == size else Resize((side, side), (size, size)))

    def __call__(self, images: Float32Array) -> Float32Array:
        x = images if self.crop is None else self.crop.forward(images)
        return x if self.resize is None else self.resize.forward(x)


def make_attack(
    name: str, eps: float, steps: int, step_size: float | None, *, random_start: bool
) -> GradientAttack:
    """One of :data:`ATTACKS` at ``eps``; ``random_start`` forces a random start (face models need it)."""
    extra: dict[str, Any] = {"random_start": True} if random_start else {}
    if name == "fgsm":
        return FGSM(eps=eps, **extra)
    kinds: dict[str, type[GradientAttack]] = {"bim": BIM, "pgd": PGD, "mifgsm": MIFGSM}
    if name not in kinds:
        raise InputError(f"attack must be one of {', '.join(ATTACKS)}, got {name!r}")
    return kinds[name](eps=eps, steps=steps, step_size=step_size, **extra)


def probabilities(log_probs: Float32Array) -> NDArray[np.float64]:
    """Softmax of log-probabilities (renormalised against float rounding)."""
    z = np.asarray(log_probs, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(p / p.sum(axis=-1, keepdims=True), np.float64)


# ---------------------------------------------------------------------------------------------------
# one image


@dataclass(frozen=True)
class Task:
    """An image to attack, with its class index resolved by the parent (``None``: unlabelled)."""

    item: Item
    label_index: int | None
    target_index: int | None


@dataclass(frozen=True)
class Outcome:
    """What became of one image: its manifest row and encoded PNG, or an input error."""

    name: str
    row: dict[str, Any] | None = None
    png: bytes | None = field(default=None, repr=False)
    error: str | None = None


MODEL_KEY: Final = "model"


def augment_image(
    session: AttackSession, config: AugmentConfig, task: Task, loaded: LoadedImage
) -> tuple[bytes, dict[str, Any]]:
    """Attack one decoded image; return the PNG bytes to write and its manifest row."""
    info = session.info
    plan = plan_item(config, task.item.name)
    x0 = loaded.rgb[None].astype(np.float32)
    view = View.of(loaded.height, loaded.width, info.canonical_size)
    clean = session.features(view(x0))
    labels = info.labels
    label_index, target_index = task.label_index, task.target_index
    if info.kind == "classifier":
        if label_index is None:  # unlabelled: attack the model's own prediction
            label_index = int(np.argmax(clean[0]))
        goal = target_index if config.targeted else label_index
        if goal is None:
            goal = _draw_target(plan.target_draw, label_index, info.embedding_dim)
            target_index = goal
        reference = np.zeros((1, info.embedding_dim), np.float32)
        reference[0, goal] = 1.0
    else:
        reference = clean
    attack = make_attack(
        config.attack, plan.eps, config.steps, config.step_size, random_start=info.kind == "face"
    )
    result = attack(
        x0,
        [Victim(session, reference, name=MODEL_KEY)],
        targeted=config.targeted,
        mask=None if view.crop is None else view.crop.mask(),
        quantize=True,
        seed=plan.seed,
        input_map=view.crop,
        luminance_only=loaded.is_grayscale,
    )
    pixels = result.to_uint8()[0]
    png = encode_image(pixels, loaded, fmt="PNG")
    success = result.success.get(MODEL_KEY)
    row: dict[str, Any] = {
        "path": output_name(task.item.name),
        "source": task.item.name,
        "label": task.item.label,
        "label_index": label_index,
        "attack": config.attack,
        "eps": plan.eps,
        "steps": 1 if config.attack == "fgsm" else config.steps,
        "targeted": config.targeted,
        "target": None,
        "target_index": target_index if config.targeted else None,
        "success": None if success is None else bool(success[0]),
        "confidence_before": None,
        "confidence_after": None,
        "predicted_before": None,
        "predicted_after": None,
        "target_confidence_before": None,
        "target_confidence_after": None,
        "linf": int(np.abs(pixels.astype(np.int16) - loaded.rgb.astype(np.int16)).max()),
        "width": loaded.width,
        "height": loaded.height,
    }
    after = result.features[MODEL_KEY]
    if info.kind == "classifier":
        assert label_index is not None
        p_before, p_after = probabilities(clean[0]), probabilities(after[0])
        top_before, top_after = int(np.argmax(p_before)), int(np.argmax(p_after))
        row |= {
            "confidence_before": round(float(p_before[label_index]), 6),
            "confidence_after": round(float(p_after[label_index]), 6),
            "predicted_before": labels[top_before] if labels else top_before,
            "predicted_after": labels[top_after] if labels else top_after,
        }
        if config.targeted and target_index is not None:
            row |= {
                "target": labels[target_index] if labels else str(target_index),
                "target_confidence_before": round(float(p_before[target_index]), 6),
                "target_confidence_after": round(float(p_after[target_index]), 6),
            }
    else:  # face: cosine similarity to the clean embedding (1 before)
        row |= {
            "confidence_before": round(float(np.dot(clean[0], reference[0])), 6),
            "confidence_after": round(float(result.objective[MODEL_KEY][0]), 6),
        }
    return png, row


def _draw_target(draw: float, label: int, classes: int) -> int:
    """A class other than ``label``, uniformly from ``draw`` in [0, 1)."""
    index = min(int(draw * (classes - 1)), classes - 2)
    return index + 1 if index >= label else index


def run_task(session: AttackSession, config: AugmentConfig, task: Task, data: bytes | None = None) -> Outcome:
    """Decode (from ``data`` when given, else the file) and attack one image; input errors become the
    outcome's ``error``, model errors propagate."""
    try:
        loaded = load_image(task.item.source if data is None else data, name=task.item.name)
        png, row = augment_image(session, config, task, loaded)
    except ModelError:
        raise
    except UncnnError as exc:
        return Outcome(task.item.name, error=str(exc))
    return Outcome(task.item.name, row=row, png=png)


# ---------------------------------------------------------------------------------------------------
# workers: one session per process


@dataclass(frozen=True)
class WorkerSpec:
    """How each worker opens its session."""

    model: str
    device: str
    threads: int


_SESSION: list[AttackSession] = []


def init_worker(spec: WorkerSpec) -> None:
    """Open this process's session (once per worker)."""
    _SESSION[:] = [open_session(spec.model, device=spec.device, intra_op_threads=spec.threads)]


def worker_session() -> AttackSession:
    if not _SESSION:
        raise RuntimeError("init_worker was not called in this process")
    return _SESSION[0]


def ordered_map(
    work: Callable[[T], R],
    chunks: Iterable[T],
    *,
    spec: WorkerSpec,
    workers: int,
) -> Iterator[R]:
    """``work`` over ``chunks`` in ``workers`` processes (each with its own session), results in input
    order, with at most ``2 * workers`` chunks in flight. ``workers == 1`` runs in this process."""
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        init_worker(spec)
        for chunk in chunks:
            yield work(chunk)
        return
    # spawn: a fork would copy onnxruntime's thread pools and the parent's session mid-flight.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(spec,)) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(work, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _augment_chunk(job: tuple[AugmentConfig, str, list[Task]]) -> list[Outcome]:
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
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_bytes(target, png)
    except OSError as exc:
        raise OutputPathError(f"{target}: cannot write ({exc.strerror or exc})") from exc


# ---------------------------------------------------------------------------------------------------
# the manifest journal


class Manifest:
    """``OUT/manifest.jsonl``: one JSON row per written image, appended and flushed as each finishes."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / MANIFEST

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
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


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


# ---------------------------------------------------------------------------------------------------
# the job


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


ProgressCallback = Callable[[str, str], None]
"""Called once per image with its name and what happened: written, done, skipped or error."""


def resolve_model(model: str | Path) -> Path:
    """A path to an attack graph, or the name of a shipped model."""
    path = Path(model)
    if path.is_file():
        return path.resolve()
    if path.suffix == "" and "/" not in str(model):
        return zoo.get_model(str(model)).path
    raise ModelError(f"{model}: no such model file (or shipped model name)")


def _settings(model: Path, data: str | Path, config: AugmentConfig) -> dict[str, Any]:
    return {
        "model": model.name,
        "model_sha256": zoo.sha256_file(model),
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


def plan_tasks(
    session: AttackSession,
    data: str | Path,
    out: Path,
    config: AugmentConfig,
    done: set[str],
    summary: AugmentSummary,
    progress: ProgressCallback | None,
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
            label_index = class_index(item.label, lookup, session)
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
    progress: ProgressCallback | None = None,
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
        progress: called per image (see :data:`ProgressCallback`).

    Returns:
        The counts of this run and the images that could not be read (they are not in the manifest).
    """
    config = config or AugmentConfig()
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    target = Path(out)
    path = resolve_model(model)
    session = open_session(path, device=device, intra_op_threads=config.threads)
    _check_paths(data, target)
    target_class(session, config)
    iter_dataset(data)  # fail on bad settings or a bad data set before creating anything
    target.mkdir(parents=True, exist_ok=True)
    _check_settings(target, _settings(path, data, config))
    manifest = Manifest(target)
    summary = AugmentSummary(target)
    tasks = plan_tasks(session, data, target, config, manifest.finished(), summary, progress)
    spec = WorkerSpec(str(path), device, config.threads)
    outcomes: Iterable[Outcome]
    if engine == "ray":
        from uncnn_rt.runtime.ray_engine import run_on_ray

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
    "ATTACKS",
    "ENGINES",
    "MANIFEST",
    "AugmentConfig",
    "AugmentSummary",
    "CenterSquare",
    "Item",
    "Outcome",
    "Plan",
    "Task",
    "View",
    "augment",
    "count_items",
    "iter_dataset",
    "make_attack",
    "output_name",
    "parse_eps",
    "plan_item",
    "read_manifest",
]
