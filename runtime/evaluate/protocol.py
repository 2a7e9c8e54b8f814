"""The protocol on embeddings (who is still recognized: P1, P2, P3) and the conditions it runs under.

The protocol itself is defined in the package docstring (:mod:`uncnn_rt.runtime.evaluate`);
:data:`PROTOCOL_TEXT` is its short form, as the JSON report carries it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from uncnn_rt.runtime import image_ops
from uncnn_rt.runtime.arrays import Float32Array, Float64Array, Uint8Array
from uncnn_rt.runtime.imageio import LoadedImage, encode_image, load_image, output_format

AS_SAVED: Final = "as_saved"
PROTOCOLS: Final = ("p1", "p2", "p3")
Kind = Literal["white-box", "leave-one-out", "external"]
SCORE_KINDS: Final[tuple[Kind, ...]] = ("white-box", "leave-one-out", "external")
WHITE_BOX_LABEL: Final = "white-box"


PROTOCOL_TEXT: Final = {
    "recognized": "the nearest other gallery photo (cosine) is the same identity and its similarity is at "
    "least the evaluator's threshold; protection counts only probes recognized when clean",
    "p1": "probe cloaked: the cloaked photo vs every clean photo except its own clean original",
    "p2": "gallery cloaked: the clean photo vs a gallery where the other photos of its identity are "
    "their cloaked versions and everyone else's are clean",
    "p3": "linkability: the cloaked photo vs everyone else's cloaked photos (a tracker that collects only "
    "cloaked photos); a probe counts as unlinked when its nearest cloaked photo is not the same identity "
    "at the threshold; under a condition both sides are transformed",
    "conditions": "the cloaked photo as saved (input's format), then JPEG of the saved pixels, then a "
    "downscale of the saved pixels and back to full size (bilinear); each re-embedded through the same "
    "face pipeline; only cloaked photos are transformed",
    "control": "the same transforms applied to uncloaked photos: protection the transform alone causes",
    "white-box": "cloaked with the whole ensemble, scored on each member",
    "leave-one-out": "cloaked with the ensemble minus one member, scored on that member",
    "external": "scored on the white-box cloaks; not in the ensemble (duplicate_of: same network as a "
    "member, not an independent check)",
    "quality": "SSIM and PSNR of the whole saved photo against the original; L-inf of the cloak's pixels "
    "(before encoding: the budget used)",
    "visibility": "FLIP (67 pixels per degree), CIEDE2000 mean and 95th percentile, SSIM and PSNR of each "
    "face region (the face box grown by a quarter of its side on each side; the whole image for aligned "
    "chips) of the saved photo against the original: median and worst over the photos; photo_visibility: "
    "the same of the whole photo; jpeg_ladder: the same figures of the clean photos' own JPEG q95/q85/q75 "
    "re-encodes, on the face regions",
}


# ---------------------------------------------------------------------------------------------------
# conditions


PhotoTransform = Callable[[Uint8Array], Uint8Array]


@dataclass(frozen=True)
class Condition:
    """A re-encoding of the saved cloaked photo (``as_saved`` is the saved photo itself)."""

    name: str
    description: str
    apply: PhotoTransform = field(repr=False, compare=False)


def jpeg_condition(quality: int) -> Condition:
    def apply(rgb: Uint8Array) -> Uint8Array:
        return image_ops.to_uint8(image_ops.jpeg(rgb[None], quality)[0])

    return Condition(f"jpeg{quality}", f"JPEG quality {quality}", apply)


def downscale_condition(factor: float) -> Condition:
    def apply(rgb: Uint8Array) -> Uint8Array:
        return image_ops.to_uint8(image_ops.downscale(rgb[None], factor)[0])

    return Condition(f"downscale{round(factor * 100)}", f"downscale to {factor:g}x and back", apply)


def as_saved_condition() -> Condition:
    return Condition(AS_SAVED, "as saved", lambda rgb: rgb)


def default_conditions(jpeg_quality: int = 75, downscale: float = 0.5) -> tuple[Condition, ...]:
    return as_saved_condition(), jpeg_condition(jpeg_quality), downscale_condition(downscale)


def saved_pixels(pixels: Uint8Array, like: LoadedImage, quality: int | None = None) -> Uint8Array:
    """``pixels`` encoded as ``uncnn-rt cloak`` saves them for ``like`` (its format, at ``quality`` when
    the cloak chose one), and decoded."""
    data = encode_image(pixels, like, fmt=output_format(like), quality=quality)
    return load_image(data, name=like.name).rgb


# ---------------------------------------------------------------------------------------------------
# the protocol, on embeddings


def rounded(value: float | None, digits: int = 6) -> float | None:
    """``value`` rounded for the JSON report; None for None, NaN and infinities."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


@dataclass(frozen=True)
class Rate:
    """``hits`` of ``total``; ``rate`` None when there is nothing to count."""

    hits: int
    total: int

    @property
    def rate(self) -> float | None:
        return None if self.total == 0 else self.hits / self.total

    def __add__(self, other: Rate) -> Rate:
        return Rate(self.hits + other.hits, self.total + other.total)

    def to_dict(self, word: str = "protected") -> dict[str, Any]:
        return {word: self.hits, "of": self.total, "rate": rounded(self.rate)}


def recognized(
    similarities: Float64Array,
    probe_labels: NDArray[np.intp],
    gallery_labels: NDArray[np.intp],
    threshold: float,
) -> NDArray[np.bool_]:
    """Per probe row: the best gallery column is the same identity and reaches ``threshold``.

    Excluded pairs (the probe itself, missing faces) carry ``-inf`` or NaN and never match.
    """
    sims = np.where(np.isnan(similarities), -np.inf, similarities)
    if sims.shape[1] == 0:
        return np.zeros(sims.shape[0], np.bool_)
    best = np.argmax(sims, axis=1)
    top = sims[np.arange(sims.shape[0]), best]
    return np.asarray((gallery_labels[best] == probe_labels) & (top >= threshold), np.bool_)


@dataclass(frozen=True)
class ProtocolOutcome:
    """Per probe (the ``probes`` given), which passed each test."""

    probes: tuple[int, ...]
    eligible: NDArray[np.bool_]
    """Recognized when clean (and a face was found in the clean photo)."""
    p1_recognized: NDArray[np.bool_]
    p2_recognized: NDArray[np.bool_]
    p3_recognized: NDArray[np.bool_]
    """The cloaked probe matched the same identity among the other cloaked photos (linked)."""
    lost: NDArray[np.bool_]
    """No face found in the cloaked photo."""
    self_similarity: Float64Array
    """Cosine of the cloaked probe to its own clean embedding (NaN when lost)."""

    def protection(self, protocol: str) -> Rate:
        still = {"p1": self.p1_recognized, "p2": self.p2_recognized, "p3": self.p3_recognized}[protocol]
        return Rate(int(np.sum(self.eligible & ~still)), int(np.sum(self.eligible)))


def run_protocols(
    clean: Float32Array,
    cloaked: Float32Array,
    labels: NDArray[np.intp],
    threshold: float,
    probes: Sequence[int],
) -> ProtocolOutcome:
    """P1, P2 and P3 for ``probes`` (indices into the dataset).

    Args:
        clean: ``[N, D]`` unit embeddings of the clean photos (NaN rows: no face found).
        cloaked: ``[N, D]`` of the cloaked photos; needed for every photo of every probe's identity
            (NaN rows: no face found in the cloaked photo).
        labels: ``[N]`` identity index per photo.
        threshold: the evaluator's match threshold (a similarity at or above it matches).
    """
    index = np.asarray(probes, dtype=np.intp)
    c = np.asarray(clean, np.float64)
    x = np.asarray(cloaked, np.float64)
    rows = np.arange(index.size)
    own = labels[index]
    same = own[:, None] == labels[None, :]

    def excluding_self(sims: Float64Array) -> Float64Array:
        sims = sims.copy()
        sims[rows, index] = -np.inf
        return sims

    clean_sims = excluding_self(c[index] @ c.T)
    baseline = recognized(clean_sims, own, labels, threshold)
    eligible = baseline & np.isfinite(c[index]).all(axis=1)
    p1 = recognized(excluding_self(x[index] @ c.T), own, labels, threshold)
    p2 = recognized(excluding_self(np.where(same, c[index] @ x.T, clean_sims)), own, labels, threshold)
    # Photos never cloaked (NaN rows, e.g. identities left out by a limit) are not in P3's gallery.
    p3 = recognized(excluding_self(x[index] @ x.T), own, labels, threshold)
    lost = np.asarray(~np.isfinite(x[index]).all(axis=1), np.bool_)
    self_similarity = np.einsum("nd,nd->n", x[index], c[index])
    return ProtocolOutcome(tuple(int(i) for i in index), eligible, p1, p2, p3, lost, self_similarity)
