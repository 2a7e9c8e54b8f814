"""Robust accuracy of a classifier: its accuracy on a labelled data set under attack at each eps.

The attacks: FGSM, BIM, PGD and MI-FGSM (:data:`~.variants.ATTACKS`, fixed steps), and AutoAttack
(``autoattack``: Croce & Hein's standard ensemble; ``autoattack-plus``) or any of its attacks by name
(:data:`uncnn_rt.runtime.attacks.autoattack.ATTACKS`). AutoAttack's report says which attack broke each
image; its accuracy is RobustBench's robust accuracy.

For every image and every (attack, eps) the untargeted attack runs against the image's own label,
through the same view of the image as :mod:`.augment` (its centred square, resized exactly to the
model's input) and on 8-bit pixels (``quantize``), stopping as soon as the image is misclassified. An
image counts as robust at eps when it is classified correctly clean *and* after the attack. Eps 0 is
the clean accuracy itself: a zero L-inf budget cannot change a pixel, so no attack runs there.

Per-image random starts come from ``sha256(seed, path, attack, eps)``, so the figures do not depend on
the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks import Misclassified, Victim
from uncnn_rt.runtime.attacks import autoattack as aa
from uncnn_rt.runtime.errors import InputError, ModelError, UncnnError
from uncnn_rt.runtime.imageio import load_image
from uncnn_rt.runtime.jobs.datasets import Item, class_index, class_lookup, item_hash, iter_dataset
from uncnn_rt.runtime.jobs.parallel import WorkerSpec, chunked, ordered_map, worker_session
from uncnn_rt.runtime.jobs.variants import ATTACKS, MODEL_KEY, View, make_attack
from uncnn_rt.runtime.plotting import pyplot, save_png
from uncnn_rt.runtime.sessions import AttackSession, open_session

DEFAULT_EPS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
CHUNK: Final = 4
"""Images per task of the fixed-step attacks (each image is attacked alone)."""
AUTOATTACK_CHUNK: Final = 64
"""Images per task with AutoAttack, which attacks a task's images of one size together."""
ENSEMBLES: Final = {"autoattack": "standard", "autoattack-plus": "plus"}
"""AutoAttack's versions as ``--attacks`` names them."""
ROBUSTNESS_ATTACKS: Final = (*ATTACKS, *ENSEMBLES, *aa.ATTACKS)
"""Every attack ``robustness`` runs: the fixed-step ones, AutoAttack, and each of AutoAttack's alone."""


def is_autoattack(name: str) -> bool:
    """Whether ``name`` runs through :class:`~uncnn_rt.runtime.attacks.autoattack.AutoAttack` (which
    reports the attack that broke each image)."""
    return name in ENSEMBLES or name in aa.ATTACKS


def parse_eps_list(text: str) -> tuple[float, ...]:
    """``"0,1,2,4,8"`` -> ``(0, 1, 2, 4, 8)`` (0..255 units, ascending, no repeats)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"eps must be comma-separated numbers in 0..255, got {text!r}") from None
    if not values or any(not 0 <= v <= 255 for v in values):
        raise InputError(f"eps must be comma-separated numbers in 0..255, got {text!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class RobustnessConfig:
    """What to measure.

    Args:
        attacks: any of :data:`ROBUSTNESS_ATTACKS` (``fgsm`` and ``pgd`` by default).
        eps: the budgets (0..255 units); 0 gives the clean accuracy.
        steps: iterations of the fixed-step attacks (AutoAttack's use the reference's: 100 iterations,
            5000 Square queries).
        step_size: per-step size; ``None``: each attack's default.
        seed: seed of the random starts.
        threads: onnxruntime intra-op threads per worker.
        limit: measure only the first this many images of the data set.
    """

    attacks: tuple[str, ...] = ("fgsm", "pgd")
    eps: tuple[float, ...] = DEFAULT_EPS
    steps: int = 10
    step_size: float | None = None
    seed: int = 0
    threads: int = 1
    limit: int | None = None

    def __post_init__(self) -> None:
        if not self.attacks or any(a not in ROBUSTNESS_ATTACKS for a in self.attacks):
            given = ", ".join(self.attacks) or "none"
            raise InputError(f"attacks must be among {', '.join(ROBUSTNESS_ATTACKS)}, got {given}")
        if not self.eps or any(not 0 <= e <= 255 for e in self.eps):
            raise InputError(f"eps must be values in 0..255, got {list(self.eps)}")
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        if self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class _Result:
    name: str
    clean: bool
    robust: dict[str, list[bool]]
    error: str | None = None
    broken_by: dict[str, list[str | None]] = field(default_factory=dict)
    """Per AutoAttack run and eps, the attack that broke the image (None: robust, or not attacked)."""


@dataclass
class RobustnessReport:
    """Counts per attack and eps; accuracies are shares of the images measured."""

    model: str
    data: str
    config: RobustnessConfig
    images: int = 0
    clean_correct: int = 0
    correct: dict[str, list[int]] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    broken_by: dict[str, list[dict[str, int]]] = field(default_factory=dict)
    """Per AutoAttack run and eps, how many images each of its attacks broke."""
    broken_images: dict[str, dict[str, list[str | None]]] = field(default_factory=dict)
    """Per AutoAttack run, per image broken at some eps, the attack that broke it at each eps."""

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.images if self.images else math.nan

    def accuracy(self, attack: str) -> list[float]:
        return [c / self.images if self.images else math.nan for c in self.correct[attack]]

    def to_dict(self) -> dict[str, Any]:
        config = asdict(self.config)
        return {
            "model": self.model,
            "data": self.data,
            "images": self.images,
            "clean_accuracy": _round(self.clean_accuracy),
            "eps": list(self.config.eps),
            "attacks": {
                attack: {
                    "accuracy": [_round(a) for a in self.accuracy(attack)],
                    "correct": self.correct[attack],
                    "steps": None if is_autoattack(attack) else 1 if attack == "fgsm" else self.config.steps,
                }
                | (
                    {"broken_by": self.broken_by[attack], "broken_images": self.broken_images[attack]}
                    if attack in self.broken_by
                    else {}
                )
                for attack in self.config.attacks
            },
            "config": config | {"attacks": list(self.config.attacks), "eps": list(self.config.eps)},
            "errors": [{"source": name, "error": message} for name, message in self.errors],
        }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


@dataclass(frozen=True)
class _Image:
    """One labelled image, decoded, with its view of the model and its clean verdict."""

    item: Item
    label: int
    x0: Float32Array
    view: View
    grey: bool
    clean: bool


def _load(session: AttackSession, item: Item, label: int) -> _Image:
    loaded = load_image(item.source, name=item.name)
    x0 = loaded.rgb[None].astype(np.float32)
    view = View.of(loaded.height, loaded.width, session.info.canonical_size)
    clean = bool(np.argmax(session.features(view(x0))[0]) == label)
    return _Image(item, label, x0, view, loaded.is_grayscale, clean)


def robust_item(session: AttackSession, config: RobustnessConfig, item: Item, label: int) -> _Result:
    """Whether one image is classified correctly clean and under each attack and eps."""
    return robust_items(session, config, [_load(session, item, label)])[0]


def robust_items(session: AttackSession, config: RobustnessConfig, images: list[_Image]) -> list[_Result]:
    """Whether each image is classified correctly clean and under each attack and eps.

    The fixed-step attacks run image by image. AutoAttack runs once per eps on all the images of one
    size and colour kind that are classified correctly clean (its attacks are batched; each image is
    still attacked against its own label), seeded by the images' names, so the figures depend on the
    chunks the job is cut into (fixed by the data set's order), not on the number of workers.
    """
    robust = [{a: [m.clean] * len(config.eps) for a in config.attacks} for m in images]
    broken_by: list[dict[str, list[str | None]]] = [
        {a: [None] * len(config.eps) for a in config.attacks if is_autoattack(a)} for _ in images
    ]
    for attack_name in config.attacks:
        for e, eps in enumerate(config.eps):
            if eps == 0:  # a budget that changes no pixel: the clean verdict
                continue
            if is_autoattack(attack_name):
                for group in _groups([k for k, m in enumerate(images) if m.clean], images):
                    outcome = _autoattack(session, config, attack_name, eps, [images[k] for k in group])
                    for k, name in zip(group, outcome.broken_by, strict=True):
                        robust[k][attack_name][e] = name is None
                        broken_by[k][attack_name][e] = name
                continue
            for k, m in enumerate(images):
                if m.clean:
                    robust[k][attack_name][e] = _fixed_step(session, config, attack_name, eps, m)
    return [_Result(m.item.name, m.clean, robust[k], broken_by=broken_by[k]) for k, m in enumerate(images)]


def _groups(indices: list[int], images: list[_Image]) -> list[list[int]]:
    """``indices`` grouped by image size and colour kind (what one batched attack call can take)."""
    groups: dict[tuple[tuple[int, ...], bool], list[int]] = {}
    for k in indices:
        groups.setdefault((images[k].x0.shape, images[k].grey), []).append(k)
    return list(groups.values())


def _seed(config: RobustnessConfig, names: list[str], attack: str, eps: float) -> int:
    return int.from_bytes(item_hash(config.seed, "\n".join(names), attack, f"{eps:g}")[:8], "little")


def _fixed_step(
    session: AttackSession, config: RobustnessConfig, attack_name: str, eps: float, m: _Image
) -> bool:
    attack = make_attack(attack_name, eps, config.steps, config.step_size, random_start=False)
    result = attack(
        m.x0,
        [Victim(session, _one_hot(session, [m.label]), name=MODEL_KEY)],
        mask=None if m.view.crop is None else m.view.crop.mask(),
        quantize=True,
        stop_when=Misclassified(MODEL_KEY),
        seed=_seed(config, [m.item.name], attack_name, eps),
        input_map=m.view.crop,
        luminance_only=m.grey,
    )
    return bool(np.argmax(result.features[MODEL_KEY][0]) == m.label)


def _autoattack(
    session: AttackSession, config: RobustnessConfig, attack_name: str, eps: float, group: list[_Image]
) -> aa.AutoAttackResult:
    first = group[0]
    ensemble = aa.AutoAttack(
        eps=eps,
        version=ENSEMBLES.get(attack_name, "standard"),  # type: ignore[arg-type]
        attacks=None if attack_name in ENSEMBLES else (attack_name,),
    )
    return ensemble(
        np.concatenate([m.x0 for m in group]),
        [Victim(session, _one_hot(session, [m.label for m in group]), name=MODEL_KEY)],
        mask=None if first.view.crop is None else first.view.crop.mask(),
        quantize=True,
        seed=_seed(config, [m.item.name for m in group], attack_name, eps),
        input_map=first.view.crop,
        luminance_only=first.grey,
    )


def _one_hot(session: AttackSession, labels: list[int]) -> Float32Array:
    out = np.zeros((len(labels), session.info.embedding_dim), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def _robust_chunk(job: tuple[RobustnessConfig, list[tuple[Item, int]]]) -> list[_Result]:
    config, pairs = job
    session = worker_session()
    images: list[_Image] = []
    failed: dict[int, _Result] = {}
    for k, (item, label) in enumerate(pairs):
        try:
            images.append(_load(session, item, label))
        except ModelError:
            raise
        except UncnnError as exc:
            failed[k] = _Result(item.name, False, {}, error=str(exc))
    measured = iter(robust_items(session, config, images) if images else [])
    return [failed[k] if k in failed else next(measured) for k in range(len(pairs))]


def measure_robustness(
    model: str | Path,
    data: str | Path,
    config: RobustnessConfig | None = None,
    *,
    workers: int = 1,
    device: str = "cpu",
    progress: Any = None,
) -> RobustnessReport:
    """Accuracy of the classifier ``model`` on ``data`` (ImageFolder or CSV with labels) under each
    attack and eps of ``config``. ``progress`` is called with each image's name when it is done."""
    config = config or RobustnessConfig()
    path = catalog.resolve_model(model)
    session = open_session(path, device=device, intra_op_threads=config.threads)
    if session.info.kind != "classifier":
        raise InputError(
            f"robustness measures a classifier's accuracy; {session.name} is a {session.info.kind} model "
            "(uncnn-rt eval measures face models)"
        )
    lookup = class_lookup(session)
    report = RobustnessReport(
        model=path.name,
        data=str(data),
        config=config,
        correct={a: [0] * len(config.eps) for a in config.attacks},
        broken_by={a: [{} for _ in config.eps] for a in config.attacks if is_autoattack(a)},
        broken_images={a: {} for a in config.attacks if is_autoattack(a)},
    )

    def labelled() -> Iterator[tuple[Item, int]]:
        for count, item in enumerate(iter_dataset(data)):
            if config.limit is not None and count >= config.limit:
                return
            if item.label is None:
                raise InputError(
                    f"{item.at()}{item.name}: no label; robustness needs class folders or a CSV label column"
                )
            yield item, class_index(item.label, lookup, session, where=item.at())

    spec = WorkerSpec(str(path), device, config.threads)
    size = AUTOATTACK_CHUNK if any(is_autoattack(a) for a in config.attacks) else CHUNK
    chunks = ((config, chunk) for chunk in chunked(labelled(), size))
    for batch in ordered_map(_robust_chunk, chunks, spec=spec, workers=workers):
        for result in batch:
            if result.error is not None:
                report.errors.append((result.name, result.error))
            else:
                report.images += 1
                report.clean_correct += result.clean
                for attack, flags in result.robust.items():
                    report.correct[attack] = [
                        c + f for c, f in zip(report.correct[attack], flags, strict=True)
                    ]
                for attack, names in result.broken_by.items():
                    if any(names):
                        report.broken_images.setdefault(attack, {})[result.name] = names
                    for counts, name in zip(report.broken_by[attack], names, strict=True):
                        if name is not None:
                            counts[name] = counts.get(name, 0) + 1
            if progress is not None:
                progress(result.name)
    if report.images == 0:
        raise InputError(f"{data}: no image could be measured")
    return report


def plot_robustness(report: RobustnessReport, path: str | Path) -> Path:
    """A PNG of accuracy against eps, one line per attack, the clean accuracy dashed (needs matplotlib)."""
    plt = pyplot()
    eps = list(report.config.eps)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for attack in report.config.attacks:
        steps = "" if attack == "fgsm" or is_autoattack(attack) else f", {report.config.steps} steps"
        ax.plot(eps, [100 * a for a in report.accuracy(attack)], marker="o", label=f"{attack.upper()}{steps}")
    ax.axhline(100 * report.clean_accuracy, color="grey", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("eps (grey levels, 0..255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report.model}: {report.images} images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path, dpi=100)


def accuracy_rows(report: RobustnessReport) -> list[tuple[str, list[float]]]:
    """``(attack, accuracy per eps)`` rows for a table."""
    return [(attack, report.accuracy(attack)) for attack in report.config.attacks]


__all__ = [
    "DEFAULT_EPS",
    "ENSEMBLES",
    "ROBUSTNESS_ATTACKS",
    "RobustnessConfig",
    "RobustnessReport",
    "accuracy_rows",
    "measure_robustness",
    "parse_eps_list",
    "plot_robustness",
    "robust_item",
]
