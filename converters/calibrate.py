"""Dev-set calibration of face recognizers: rank-1 identification and a cosine match threshold.

Used by the zoo build (figures written into ``models/manifest.json``), by the tests, and by evaluation
tools. Needs only numpy, pillow and onnxruntime.

Protocol, on a folder with one sub-folder of face chips per identity:

* every chip is framed as the canonical crop (the chip scaled to ``S`` x ``S`` RGB 0..255);
* features are L2-normalised and compared by cosine similarity;
* **rank-1**: the share of chips whose nearest *other* chip belongs to the same identity;
* **threshold**: the lowest cosine at which the false-match rate over all impostor pairs is at most
  ``fmr`` (the maximum impostor similarity, nudged up, when ``fmr`` is 0);
* **TMR**: the share of genuine pairs whose similarity reaches that threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from uncnn_rt.runtime.contract import Preprocessing
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.imageio import IMAGE_SUFFIXES
from uncnn_rt.runtime.sessions import run_chunked

GENUINE_QUANTILE = 0.95
"""The quantile of the dev set's same-person similarities the manifest records (``dev.genuine_p95``)."""

EmbedFn = Callable[[NDArray[np.float32]], NDArray[np.float32]]


@dataclass(frozen=True)
class DevFigures:
    """Calibration result; ``to_json`` gives the manifest's ``dev`` object."""

    rank1: float
    tmr: float
    fmr: float
    threshold: float
    target_fmr: float
    n_chips: int
    n_identities: int
    n_genuine_pairs: int
    n_impostor_pairs: int
    genuine_p95: float
    """The 95th percentile of the same-person pairs' similarities: how close a person's other photos come
    to one photo of theirs. The cloak's default aim (:mod:`uncnn_rt.runtime.cloak`) divides the
    threshold by it."""

    def to_json(self) -> dict[str, float | int]:
        out = asdict(self)
        out.pop("threshold")
        out.pop("target_fmr")
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def load_identity_folder(root: Path) -> tuple[list[Path], list[str]]:
    """Image files under ``root/<identity>/``, sorted, with their identity labels."""
    if not root.is_dir():
        raise InputError(f"{root}: expected a folder with one sub-folder per identity")
    paths: list[Path] = []
    labels: list[str] = []
    for person in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(person.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(person.name)
    if len(set(labels)) < 2:
        raise InputError(
            f"{root}: expected at least 2 identity sub-folders with images, found {len(set(labels))}"
        )
    return paths, labels


def canonical_crop(image: Image.Image, size: int) -> NDArray[np.float32]:
    """A face chip as the canonical crop: RGB (grayscale chips repeated), scaled to ``size``, 0..255."""
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float32)


def load_canonical_crops(paths: Sequence[Path], size: int) -> NDArray[np.float32]:
    """``[N, size, size, 3]`` float32 canonical crops of the given chips."""
    crops = []
    for p in paths:
        with Image.open(p) as im:
            crops.append(canonical_crop(im, size))
    return np.stack(crops)


def preprocess(crops: NDArray[np.float32], prep: Preprocessing) -> NDArray[np.float32]:
    """Apply ``prep`` to canonical crops ``[N, S, S, 3]`` in numpy: the model's native input.

    The window may reach outside the crop (e.g. the ArcFace framing needs forehead above it); the
    bilinear matrices clamp at the border, so those rows and columns repeat the crop's edge pixels.
    """
    if crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2]:
        raise InputError(f"expected canonical crops [N, S, S, 3], got shape {crops.shape}")
    from uncnn_rt.converters.attack_graph import crop_resize_matrix  # the matrices the attack graphs use

    size = crops.shape[1]
    top, left, bottom, right = prep.crop
    out_h, out_w = prep.native_size
    r_h = crop_resize_matrix(size, out_h, top * size, bottom * size, prep.resize)
    r_w = crop_resize_matrix(size, out_w, left * size, right * size, prep.resize)
    x = np.einsum("hi,niwc,vw->nhvc", r_h, crops.astype(np.float32), r_w, optimize=True)
    if prep.channel_order == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    if prep.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def l2_normalise(features: NDArray[np.floating]) -> NDArray[np.float32]:
    f = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def rank1(features: NDArray[np.floating], labels: Sequence[str]) -> float:
    """Share of samples whose nearest other sample (cosine) has the same label."""
    f = l2_normalise(features)
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argmax(sims, axis=1)
    lab = np.asarray(labels)
    return float(np.mean(lab[nearest] == lab))


def pair_similarities(
    features: NDArray[np.floating], labels: Sequence[str]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Cosine similarities of all genuine pairs and all impostor pairs (each unordered pair once)."""
    f = l2_normalise(features).astype(np.float64)
    sims = f @ f.T
    lab = np.asarray(labels)
    iu = np.triu_indices(len(lab), k=1)
    same = lab[iu[0]] == lab[iu[1]]
    flat = sims[iu]
    return flat[same], flat[~same]


def threshold_at_fmr(impostor: NDArray[np.float64], fmr: float) -> float:
    """Lowest cosine threshold (a match is ``sim >= threshold``) whose impostor match rate is <= ``fmr``."""
    if not 0.0 <= fmr < 1.0:
        raise ValueError(f"fmr must be in [0, 1), got {fmr}")
    ordered = np.sort(impostor)[::-1]
    allowed = int(np.floor(fmr * len(ordered) + 1e-9))
    # Just above the (allowed+1)-th highest impostor score: at most `allowed` impostors reach it.
    return float(np.nextafter(ordered[allowed], np.inf))


def calibrate(features: NDArray[np.floating], labels: Sequence[str], *, fmr: float) -> DevFigures:
    """Rank-1, the threshold at false-match rate ``fmr``, and the true-match rate there."""
    genuine, impostor = pair_similarities(features, labels)
    thr = threshold_at_fmr(impostor, fmr)
    return DevFigures(
        rank1=rank1(features, labels),
        tmr=float(np.mean(genuine >= thr)),
        fmr=float(np.mean(impostor >= thr)),
        threshold=thr,
        target_fmr=fmr,
        n_chips=len(labels),
        n_identities=len(set(labels)),
        n_genuine_pairs=len(genuine),
        n_impostor_pairs=len(impostor),
        genuine_p95=float(np.quantile(genuine, GENUINE_QUANTILE)),
    )


def onnx_embedder(
    model: str | Path | bytes, prep: Preprocessing | None = None, *, batch: int = 8
) -> EmbedFn:
    """An embedder running an ONNX model on canonical crops.

    With ``prep``, ``model`` is a forward model fed ``preprocess(crops, prep)`` and its first output is
    the feature. Without it, ``model`` is an attack graph: canonical crops go to ``image`` and the
    ``features`` output is read (``reference`` is fed zeros).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    fixed_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None

    def run(crops: NDArray[np.float32]) -> NDArray[np.float32]:
        step = fixed_batch or batch
        outs = []
        for i in range(0, len(crops), step):
            chunk = crops[i : i + step]
            if prep is not None:
                # A model exported with a fixed batch (1, from TFLite) runs in chunks of it, the last
                # padded with copies (sessions.run_chunked, as the runtime runs such graphs).
                feeds = {inputs[0].name: preprocess(chunk, prep)}
                y = run_chunked(lambda f: sess.run(None, f), feeds, fixed_batch)[0]
            else:
                feeds = {"image": chunk.astype(np.float32)}
                dim = sess.get_outputs()[0].shape[-1]
                ref_dim = next(i.shape[-1] for i in inputs if i.name == "reference")
                feeds["reference"] = np.zeros(
                    (len(chunk), ref_dim if isinstance(ref_dim, int) else dim), np.float32
                )
                y = sess.run(["features"], feeds)[0]
            outs.append(np.asarray(y, dtype=np.float32).reshape(len(chunk), -1))
        return np.concatenate(outs)

    return run


def calibrate_folder(
    embed: EmbedFn, root: Path, *, canonical_size: int, fmr: float
) -> tuple[DevFigures, NDArray[np.float32], list[str]]:
    """Embed every chip under ``root`` and calibrate; also returns the features and labels."""
    paths, labels = load_identity_folder(root)
    feats = embed(load_canonical_crops(paths, canonical_size))
    return calibrate(feats, labels, fmr=fmr), feats, labels
