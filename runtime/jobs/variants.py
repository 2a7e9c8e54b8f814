"""One adversarial variant of one image: the attack, its per-image plan (drawn from the seed and the
image's name), the model's view of the image, and the row the job's manifest records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.attacks import BIM, FGSM, MIFGSM, PGD, GradientAttack, LinearMap, Resize, Victim
from uncnn_rt.runtime.errors import InputError, ModelError, UncnnError
from uncnn_rt.runtime.imageio import LoadedImage, encode_image, load_image
from uncnn_rt.runtime.jobs.datasets import Item, item_hash
from uncnn_rt.runtime.sessions import AttackSession

ATTACKS: Final = ("fgsm", "bim", "pgd", "mifgsm")
"""The L-inf attacks a job may use (see :mod:`uncnn_rt.runtime.attacks.pgd`)."""


def output_name(name: str) -> str:
    """The output's path relative to ``OUT``: the source's relative path with a ``.png`` suffix."""
    return PurePosixPath(name).with_suffix(".png").as_posix()


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
        if high == 0:  # every variant would be a copy of its image, counted as an attack
            raise InputError("eps must be above 0 (an eps of 0 writes unchanged copies), got 0")
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


@dataclass(frozen=True)
class Task:
    """An image to attack, with its class index resolved by the parent (``None``: unlabelled)."""

    item: Item
    label_index: int | None
    target_index: int | None


@dataclass(frozen=True)
class VariantOutcome:
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


def run_task(
    session: AttackSession, config: AugmentConfig, task: Task, data: bytes | None = None
) -> VariantOutcome:
    """Decode (from ``data`` when given, else the file) and attack one image; input errors become the
    outcome's ``error``, model errors propagate."""
    try:
        loaded = load_image(task.item.source if data is None else data, name=task.item.name)
        png, row = augment_image(session, config, task, loaded)
    except ModelError:
        raise
    except UncnnError as exc:
        return VariantOutcome(task.item.name, error=str(exc))
    return VariantOutcome(task.item.name, row=row, png=png)
