"""onnxruntime sessions over attack graphs: device choice, contract checks, IO binding and a shared cache.

An :class:`AttackSession` wraps one attack-graph ONNX file (see :mod:`uncnn_rt.runtime.contract`).
It is safe to share between threads: onnxruntime allows concurrent ``run`` calls on one session,
and the session holds no mutable state after construction. :func:`open_session` hands out one
session per (file, device, settings) so that a server reuses loaded models across requests.

Per-attack device buffers live in a :class:`Stepper`, which one attack owns for its whole loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

import numpy as np
import onnxruntime as ort
from numpy.typing import ArrayLike

from uncnn_rt.runtime.arrays import Float32Array
from uncnn_rt.runtime.contract import (
    CONTRACT_VERSION,
    INPUT_IMAGE,
    INPUT_REFERENCE,
    KINDS,
    META_CANONICAL_SIZE,
    META_CONTRACT_VERSION,
    META_EMBEDDING_DIM,
    META_KIND,
    META_LABELS,
    META_NAME,
    META_NATIVE_SIZE,
    META_PREPROCESSING,
    META_THRESHOLD,
    OUTPUT_FEATURES,
    OUTPUT_GRAD,
    OUTPUT_OBJECTIVE,
    ModelKind,
    Preprocessing,
)
from uncnn_rt.runtime.errors import ContractError, DeviceError, InputError, ModelError
from uncnn_rt.runtime.lowering import lower_for_cpu

if TYPE_CHECKING:
    import onnx

Optimization = Literal["disable", "basic", "extended", "all"]

CPU_PROVIDER: Final = "CPUExecutionProvider"
CUDA_PROVIDER: Final = "CUDAExecutionProvider"
_OPTIMIZATION_LEVELS: Final = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Execution providers whose tensors onnxruntime's Python API can allocate on the device (OrtValue "cuda").
_CUDA_MEMORY_PROVIDERS: Final = frozenset({CUDA_PROVIDER, "TensorrtExecutionProvider"})
_OUTPUTS: Final = (OUTPUT_FEATURES, OUTPUT_OBJECTIVE, OUTPUT_GRAD)


class Evaluation(NamedTuple):
    """One forward + gradient pass for a batch of ``N`` images of a model with embedding size ``D``."""

    features: Float32Array  # [N, D]
    objective: Float32Array  # [N]
    grad: Float32Array  # [N, S, S, 3], d objective / d image


@dataclass(frozen=True)
class Placement:
    """Where a session runs: onnxruntime's provider list and the memory its IO binding uses."""

    providers: tuple[str, ...]
    memory: Literal["cpu", "cuda"]
    device_id: int

    @property
    def primary(self) -> str:
        return self.providers[0]

    def provider_options(self) -> list[dict[str, str]]:
        return [{"device_id": str(self.device_id)} if p == CUDA_PROVIDER else {} for p in self.providers]


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_device(device: str) -> Placement:
    """Map ``cpu``, ``cuda``, ``cuda:K``, ``auto`` or an execution-provider name to a :class:`Placement`.

    ``auto`` picks CUDA when this onnxruntime build offers it, else the CPU. Any other provider runs
    with the CPU provider behind it for the ops it lacks.
    """
    available = available_providers()
    spec = device.strip()
    lowered = spec.lower()
    if lowered == "auto":
        lowered = "cuda" if CUDA_PROVIDER in available else "cpu"
    if lowered == "cpu":
        return Placement((CPU_PROVIDER,), "cpu", 0)
    if lowered == "cuda" or lowered.startswith("cuda:"):
        device_id = _device_index(spec, lowered)
        _require_provider(CUDA_PROVIDER, spec, available)
        return Placement((CUDA_PROVIDER, CPU_PROVIDER), "cuda", device_id)
    by_name = {name.lower(): name for name in available}
    provider = by_name.get(lowered) or by_name.get(lowered + "executionprovider")
    if provider is None:
        raise DeviceError(
            f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N', 'auto' or an execution provider "
            f"of this onnxruntime build ({', '.join(available)})"
        )
    if provider == CPU_PROVIDER:
        return Placement((CPU_PROVIDER,), "cpu", 0)
    memory: Literal["cpu", "cuda"] = "cuda" if provider in _CUDA_MEMORY_PROVIDERS else "cpu"
    return Placement((provider, CPU_PROVIDER), memory, 0)


def _device_index(spec: str, lowered: str) -> int:
    if lowered == "cuda":
        return 0
    index = lowered.partition(":")[2]
    if not index.isdigit():
        raise DeviceError(f"device {spec!r}: expected 'cuda:N' with a device number N, got {index!r}")
    return int(index)


def _require_provider(provider: str, spec: str, available: Sequence[str]) -> None:
    if provider not in available:
        raise DeviceError(
            f"device {spec!r} needs {provider}, which this onnxruntime build lacks "
            f"(available: {', '.join(available)}); install onnxruntime-gpu for CUDA"
        )


@dataclass(frozen=True)
class ModelInfo:
    """The contract metadata of one attack graph (``metadata_props``, keys in :mod:`contract`)."""

    name: str
    kind: ModelKind
    canonical_size: int
    embedding_dim: int
    threshold: float | None
    labels: tuple[str, ...] | None
    native_size: tuple[int, int] | None
    preprocessing: Preprocessing | None
    # A graph exported with a fixed batch dimension runs in chunks of this many images.
    batch_size: int | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.canonical_size, self.canonical_size, 3)


def read_info(path: Path, metadata: dict[str, str], batch_size: int | None) -> ModelInfo:
    """Parse and check the contract metadata of the attack graph at ``path``."""

    def required(key: str) -> str:
        if key not in metadata:
            raise ContractError(f"{path}: metadata_props lacks {key!r} (has: {', '.join(sorted(metadata))})")
        return metadata[key]

    def integer(key: str) -> int:
        text = required(key)
        try:
            value = int(text)
        except ValueError as exc:
            raise ContractError(f"{path}: metadata {key!r} must be a positive integer, got {text!r}") from exc
        if value <= 0:
            raise ContractError(f"{path}: metadata {key!r} must be a positive integer, got {value}")
        return value

    version = metadata.get(META_CONTRACT_VERSION, CONTRACT_VERSION)
    if version != CONTRACT_VERSION:
        raise ContractError(f"{path}: contract version {version!r}, this runtime reads {CONTRACT_VERSION!r}")
    kind = required(META_KIND)
    if kind not in KINDS:
        raise ContractError(f"{path}: metadata {META_KIND!r} must be one of {KINDS}, got {kind!r}")
    try:
        threshold = float(metadata[META_THRESHOLD]) if META_THRESHOLD in metadata else None
        labels = _labels(metadata[META_LABELS]) if META_LABELS in metadata else None
        native = _native_size(metadata[META_NATIVE_SIZE]) if META_NATIVE_SIZE in metadata else None
        preprocessing = (
            Preprocessing.from_json(metadata[META_PREPROCESSING]) if META_PREPROCESSING in metadata else None
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"{path}: malformed contract metadata ({exc!r})") from exc
    info = ModelInfo(
        name=metadata.get(META_NAME, path.stem),
        kind="face" if kind == "face" else "classifier",
        canonical_size=integer(META_CANONICAL_SIZE),
        embedding_dim=integer(META_EMBEDDING_DIM),
        threshold=threshold,
        labels=labels,
        native_size=native,
        preprocessing=preprocessing,
        batch_size=batch_size,
    )
    if labels is not None and len(labels) != info.embedding_dim:
        raise ContractError(
            f"{path}: {len(labels)} class labels for embedding dim {info.embedding_dim} (one per class)"
        )
    return info


def _labels(text: str) -> tuple[str, ...]:
    raw = json.loads(text)
    if not isinstance(raw, list):
        raise ValueError(f"labels must be a JSON list, got {type(raw).__name__}")
    return tuple(str(label) for label in raw)


def _native_size(text: str) -> tuple[int, int]:
    raw = json.loads(text)
    if isinstance(raw, int):
        return raw, raw
    if isinstance(raw, list) and len(raw) == 2:
        return int(raw[0]), int(raw[1])
    raise ValueError(f"native size must be an integer or [height, width], got {text!r}")


def _check_io(path: Path, session: ort.InferenceSession, size: int, dim: int) -> int | None:
    """Check names, element types and shapes against the contract; return a fixed batch size if any."""
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = {arg.name: arg for arg in session.get_outputs()}
    expected_inputs = {INPUT_IMAGE, INPUT_REFERENCE}
    if set(inputs) != expected_inputs:
        raise ContractError(f"{path}: inputs must be {sorted(expected_inputs)}, got {sorted(inputs)}")
    missing = [name for name in _OUTPUTS if name not in outputs]
    if missing:
        raise ContractError(
            f"{path}: outputs lack {missing} (expected {list(_OUTPUTS)}, got {sorted(outputs)})"
        )
    expected: dict[str, tuple[int | None, ...]] = {
        INPUT_IMAGE: (None, size, size, 3),
        INPUT_REFERENCE: (None, dim),
        OUTPUT_FEATURES: (None, dim),
        OUTPUT_OBJECTIVE: (None,),
        OUTPUT_GRAD: (None, size, size, 3),
    }
    batch: set[int] = set()
    for name, want in expected.items():
        arg = inputs.get(name) or outputs[name]
        if arg.type != "tensor(float)":
            raise ContractError(f"{path}: {name!r} must be tensor(float), got {arg.type}")
        got = tuple(d if isinstance(d, int) else None for d in arg.shape)
        shown_want = ["N", *want[1:]]
        if len(got) != len(want) or any(
            g is not None and w is not None and g != w for g, w in zip(got, want, strict=True)
        ):
            raise ContractError(f"{path}: {name!r} must have shape {shown_want}, got {list(arg.shape)}")
        if got[0] is not None:
            batch.add(got[0])
    if len(batch) > 1:
        raise ContractError(f"{path}: inputs and outputs disagree on a fixed batch size: {sorted(batch)}")
    return batch.pop() if batch else None


class AttackSession:
    """One attack graph loaded in onnxruntime.

    Args:
        path: the attack-graph ``.onnx`` file.
        device: ``cpu``, ``cuda``, ``cuda:K``, ``auto`` (CUDA when available, else CPU) or the name of an
            execution provider of this onnxruntime build, e.g. ``CUDAExecutionProvider``.
        intra_op_threads: threads inside one op (``None``: onnxruntime's default, all cores).
        inter_op_threads: threads across independent ops (``None``: onnxruntime's default).
        optimization: graph optimisation level.
        io_binding: run steps through :meth:`onnxruntime.InferenceSession.io_binding` with device-resident
            buffers; ``None`` turns it on for device providers and off for the CPU, where a plain ``run``
            copies nothing it does not have to.
        spin: let onnxruntime's idle threads spin-wait for work. Off by default: an attack runs numpy
            (update, projection, SSIM floor, warps) between short runs, and spinning threads take the
            cores from it. On the 2-core CPU this project is measured on, a 1080p cloak went from 3.96 s
            to 3.00 s with spinning off (``bench/cloak_latency.py``). Turn it on for back-to-back runs.

    On the CPU (unless ``optimization="disable"``) the graph's PRelus are first rewritten into ops that
    onnxruntime keeps in its blocked layout and its subnormal weights set to zero (:mod:`.lowering`;
    the file's results to float32 rounding); ``lowered`` counts the rewrites.

    Raises:
        DeviceError: the device is unknown or its provider is missing.
        ModelError: the file cannot be loaded; :class:`ContractError` when it breaks the contract.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        optimization: Optimization = "all",
        io_binding: bool | None = None,
        spin: bool = False,
    ) -> None:
        self.path = Path(path)
        self.device = device
        self.placement = resolve_device(device)
        options = ort.SessionOptions()
        # onnxruntime's memory patterns pre-plan one block per input shape for all of a run's
        # intermediates and keep each; an attack runs several shapes (batch sizes, grids). Off, a
        # 1080p cloak peaked at 465 MB instead of 560 MB and a 12 MP one at 933 MB instead of 1027-1047,
        # in the same time (bench/cloak_latency.py, interleaved runs).
        options.enable_mem_pattern = False
        # Nor does the CPU arena pay here: it keeps each session's largest run's blocks for good, across
        # a gradient and a forward session per model. Off, with the same cloaks, a 1080p default cloak
        # peaked at 329-332 MB instead of 411-413 in the same time, and a six-model 12 MP one at 852 MB
        # instead of 1085 (bench/RESULTS.md, run 22).
        options.enable_cpu_mem_arena = False
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization]
        if not spin:
            stop_spinning(options)
        if intra_op_threads is not None:
            options.intra_op_num_threads = _thread_count("intra_op_threads", intra_op_threads)
        if inter_op_threads is not None:
            options.inter_op_num_threads = _thread_count("inter_op_threads", inter_op_threads)
        self._options = options
        if not self.path.is_file():
            raise ModelError(f"{self.path}: attack graph not found")
        self.lowered = 0
        self._lower = self.placement.primary == CPU_PROVIDER and optimization != "disable"
        source: Path | onnx.ModelProto = self.path
        if self._lower:
            source, self.lowered = derived_graph(self.path, "cpu", lambda: lower_for_cpu(self._load()))
        try:
            self._session = self._open(source)
        except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses for any load failure
            raise ModelError(f"{self.path}: onnxruntime cannot load it ({exc})") from exc
        granted = self._session.get_providers()
        if device.strip().lower() != "auto" and self.placement.primary not in granted:
            raise DeviceError(
                f"{self.path}: asked for {self.placement.primary} on device {device!r}, onnxruntime "
                f"granted only {granted} (is the driver or runtime library missing?)"
            )
        if self.placement.primary not in granted:  # "auto" fell back to the CPU at load time
            self.placement = resolve_device("cpu")
        metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        size = _metadata_int(self.path, metadata, META_CANONICAL_SIZE)
        dim = _metadata_int(self.path, metadata, META_EMBEDDING_DIM)
        batch = _check_io(self.path, self._session, size, dim)
        self.info = read_info(self.path, metadata, batch)
        self.io_binding = self.placement.memory != "cpu" if io_binding is None else io_binding
        self._forward_session: ort.InferenceSession | None = None
        self._forward_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AttackSession({self.info.name!r}, {self.path}, providers={self.providers})"

    def _load(self) -> onnx.ModelProto:
        import onnx  # a core dependency: protobuf surgery only, no framework

        try:
            return onnx.load(str(self.path))
        except Exception as exc:  # protobuf's DecodeError, or a missing external-data file
            raise ModelError(f"{self.path}: cannot load it as ONNX ({exc})") from exc

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def check_batch(self, images: ArrayLike, references: ArrayLike) -> tuple[Float32Array, Float32Array]:
        """``images`` ``[N, S, S, 3]`` and ``references`` ``[N, D]`` as contiguous float32, or raise."""
        size, dim = self.info.canonical_size, self.info.embedding_dim
        x = np.ascontiguousarray(images, dtype=np.float32)
        r = np.ascontiguousarray(references, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.info.image_shape:
            raise InputError(
                f"{self.name}: images must have shape [N, {size}, {size}, 3], got {list(x.shape)}"
            )
        if r.shape != (x.shape[0], dim):
            raise InputError(
                f"{self.name}: references must have shape [{x.shape[0]}, {dim}] for {x.shape[0]} images, "
                f"got {list(r.shape)}"
            )
        return x, r

    def run(self, images: ArrayLike, references: ArrayLike) -> Evaluation:
        """Forward and gradient: ``images`` ``[N, S, S, 3]`` (0..255), ``references`` ``[N, D]``."""
        return self.stepper(references, batch=np.shape(images)[0])(images)

    def features(self, images: ArrayLike) -> Float32Array:
        """Forward only: the ``[N, D]`` features (embeddings, or log-probabilities) of ``images``."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        n = x.shape[0] if x.ndim == 4 else 0
        x, r = self.check_batch(x, np.zeros((n, self.info.embedding_dim), np.float32))
        return self._run_chunked(x, r, (OUTPUT_FEATURES,), forward_only=True)[0]

    def stepper(self, references: ArrayLike, *, batch: int | None = None) -> Stepper:
        """A forward + gradient callable for repeated steps on one batch with fixed ``references``."""
        r = np.ascontiguousarray(references, dtype=np.float32)
        n = r.shape[0] if batch is None else batch
        zeros = np.zeros((n, *self.info.image_shape), np.float32)
        _, r = self.check_batch(zeros, r)
        if self.io_binding and self.info.batch_size in (None, n):
            return BoundStepper(self, r)
        return Stepper(self, r)

    def _forward(self) -> ort.InferenceSession:
        """A second session over the forward part only (features, objective), built on first use.

        onnxruntime executes every node of a graph whatever outputs are requested, so a forward pass
        through the attack graph would pay for the gradient too (about 3x the cost).
        """
        with self._forward_lock:
            if self._forward_session is None:

                def build() -> tuple[onnx.ModelProto, int]:
                    model = prune_to_outputs(self._load(), (OUTPUT_FEATURES, OUTPUT_OBJECTIVE))
                    return lower_for_cpu(model)[0] if self._lower else model, 1

                kind = "forward-cpu" if self._lower else "forward"
                source, _ = derived_graph(self.path, kind, build)
                self._forward_session = self._open(source)
            return self._forward_session

    def _open(self, model: Path | onnx.ModelProto) -> ort.InferenceSession:
        """An onnxruntime session over a file, or over a rewritten graph written to a temporary file:
        onnxruntime's Python session keeps a graph given as bytes alive as long as itself (a second
        copy of every weight, 5-13 MB per shipped model), and one read from a file it does not."""
        if isinstance(model, Path):
            return ort.InferenceSession(
                str(model),
                sess_options=self._options,
                providers=list(self.placement.providers),
                provider_options=self.placement.provider_options(),
            )
        import onnx

        with tempfile.TemporaryDirectory(prefix="uncnn-rt-") as tmp:
            path = Path(tmp) / self.path.name
            onnx.save(model, str(path))
            return self._open(path)

    def _run_chunked(
        self,
        images: Float32Array,
        references: Float32Array,
        names: Sequence[str],
        *,
        forward_only: bool = False,
    ) -> list[Float32Array]:
        session = self._forward() if forward_only else self._session
        return run_chunked(
            lambda feeds: session.run(list(names), feeds),
            self._feeds(images, references),
            self.info.batch_size,
        )

    @staticmethod
    def _feeds(images: Float32Array, references: Float32Array) -> dict[str, Float32Array]:
        return {INPUT_IMAGE: images, INPUT_REFERENCE: references}


class Stepper:
    """Forward + gradient on one batch whose references stay fixed across an attack (plain ``run``)."""

    def __init__(self, session: AttackSession, references: Float32Array) -> None:
        self.session = session
        self.references = references

    def __call__(self, images: ArrayLike) -> Evaluation:
        x, r = self.session.check_batch(images, self.references)
        features, objective, grad = self.session._run_chunked(x, r, _OUTPUTS)
        return Evaluation(features, objective, grad)

    def forward(self, images: ArrayLike) -> tuple[Float32Array, Float32Array]:
        """Forward only: ``features`` ``[N, D]`` and ``objective`` ``[N]`` (no gradient is fetched)."""
        x, r = self.session.check_batch(images, self.references)
        features, objective = self.session._run_chunked(
            x, r, (OUTPUT_FEATURES, OUTPUT_OBJECTIVE), forward_only=True
        )
        return features, objective


class BoundStepper(Stepper):
    """A :class:`Stepper` over IO binding: every buffer is allocated once on the session's device.

    The references are uploaded once; each step copies the image into the same device buffer and the
    outputs are written into preallocated device buffers, so a CUDA step costs one host-to-device copy of
    the image and one device-to-host copy of features, objective and gradient, and no allocation. (The
    update rule runs in numpy on the host, so the gradient has to come back each step.)
    """

    def __init__(self, session: AttackSession, references: Float32Array) -> None:
        super().__init__(session, references)
        memory, device_id = session.placement.memory, session.placement.device_id
        n, (size, dim) = references.shape[0], (session.info.canonical_size, session.info.embedding_dim)
        self._binding = session._session.io_binding()
        self._image = ort.OrtValue.ortvalue_from_shape_and_type(
            [n, size, size, 3], np.float32, memory, device_id
        )
        # Created from an owned copy: on the CPU an OrtValue made from numpy aliases the array's memory.
        self._reference_host = references.copy()
        self._reference = ort.OrtValue.ortvalue_from_numpy(self._reference_host, memory, device_id)
        self._binding.bind_ortvalue_input(INPUT_IMAGE, self._image)
        self._binding.bind_ortvalue_input(INPUT_REFERENCE, self._reference)
        shapes = {OUTPUT_FEATURES: [n, dim], OUTPUT_OBJECTIVE: [n], OUTPUT_GRAD: [n, size, size, 3]}
        self._outputs = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, memory, device_id)
            for name, shape in shapes.items()
        }
        for name in _OUTPUTS:
            self._binding.bind_ortvalue_output(name, self._outputs[name])
        self._lock = threading.Lock()  # one binding: steps on the same stepper must not interleave

    def __call__(self, images: ArrayLike) -> Evaluation:
        x, _ = self.session.check_batch(images, self.references)
        with self._lock:
            self._image.update_inplace(x)
            self._binding.synchronize_inputs()
            self.session._session.run_with_iobinding(self._binding)
            self._binding.synchronize_outputs()
            features, objective, grad = (
                np.asarray(o, np.float32) for o in self._binding.copy_outputs_to_cpu()
            )
        return Evaluation(features, objective, grad)


def stop_spinning(options: ort.SessionOptions) -> ort.SessionOptions:
    """Turn off onnxruntime's spin-waiting of idle threads in ``options`` (and return them).

    Every session of this package runs short graphs between numpy work (attack updates, SSIM, warps,
    detection's decoding); threads that spin between runs take the cores from that work.
    """
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def plain_session(
    path: str | Path, *, device: str = "auto", intra_op_threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session over any ONNX file (no contract, no rewrites) on ``device``, its idle
    threads not spinning (:func:`stop_spinning`), with ``intra_op_threads`` threads per run (None:
    onnxruntime's default, one per core).

    Raises:
        DeviceError: the device is unknown or its provider is missing.
        ModelError: onnxruntime cannot load the file.
    """
    placement = resolve_device(device)
    options = stop_spinning(ort.SessionOptions())
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=list(placement.providers),
            provider_options=placement.provider_options(),
        )
    except Exception as exc:  # onnxruntime raises bare RuntimeError subclasses for any load failure
        raise ModelError(f"{path}: onnxruntime cannot load it ({exc})") from exc


def run_chunked(
    run: Callable[[dict[str, Float32Array]], Sequence[ArrayLike]],
    feeds: Mapping[str, Float32Array],
    batch: int | None,
) -> list[Float32Array]:
    """``run(feeds)`` for a graph whose batch dimension is fixed at ``batch`` (None: any size).

    The feeds, all ``N`` rows, go in chunks of ``batch`` rows; the last chunk is padded with copies of
    its first row, and each output (as float32) is trimmed back to the rows fed, then joined.
    """
    n = next(iter(feeds.values())).shape[0]
    if batch is None or batch == n:
        return [np.asarray(o, np.float32) for o in run(dict(feeds))]
    pieces: list[list[Float32Array]] = []
    for start in range(0, n, batch):
        chunk = {name: x[start : start + batch] for name, x in feeds.items()}
        pad = batch - min(batch, n - start)
        if pad:
            chunk = {name: np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) for name, x in chunk.items()}
        pieces.append([np.asarray(o, np.float32)[: batch - pad] for o in run(chunk)])
    return [np.concatenate(outputs) for outputs in zip(*pieces, strict=True)]


def _thread_count(name: str, value: int) -> int:
    if value < 0:
        raise InputError(f"{name} must be >= 0 (0: onnxruntime's default), got {value}")
    return value


def _metadata_int(path: Path, metadata: dict[str, str], key: str) -> int:
    text = metadata.get(key)
    if text is None:
        raise ContractError(
            f"{path}: metadata_props lacks {key!r} (has: {', '.join(sorted(metadata)) or 'none'})"
        )
    try:
        return int(text)
    except ValueError as exc:
        raise ContractError(f"{path}: metadata {key!r} must be an integer, got {text!r}") from exc


_CACHE: dict[tuple[object, ...], AttackSession] = {}
_CACHE_LOCK = threading.Lock()


def prune_to_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """Keep only the nodes, initializers and outputs that ``outputs`` depend on."""
    graph = model.graph
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    wanted_outputs = [o for o in graph.output if o.name in outputs]
    initializers = [i for i in graph.initializer if i.name in needed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.output[:]
    graph.output.extend(wanted_outputs)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return model


CACHE_ENV: Final = "UNCNN_RT_CACHE"
"""Folder of the derived-graph cache (:func:`derived_graph`); ``off`` turns it off. Default:
``$XDG_CACHE_HOME/uncnn-rt/graphs``, else ``~/.cache/uncnn-rt/graphs``."""
_DERIVED_VERSION: Final = 2
"""Part of every cache key: raise it when :func:`lower_for_cpu` or :func:`prune_to_outputs` change what
they make of a graph, so that no older rewrite is used."""


def graph_cache_dir() -> Path | None:
    """Where :func:`derived_graph` keeps its files, or None when :data:`CACHE_ENV` turns it off."""
    text = os.environ.get(CACHE_ENV)
    if text is not None:
        return None if text.strip().lower() in ("", "off", "0", "none") else Path(text)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "uncnn-rt" / "graphs"


def derived_graph(
    source: Path, kind: str, build: Callable[[], tuple[onnx.ModelProto, int]]
) -> tuple[Path | onnx.ModelProto, int]:
    """A rewrite of the graph at ``source`` (``kind`` names it: ``cpu``, ``forward``...), from the cache
    when it holds one for this file, else ``build()``'s, written to the cache for the next process.

    ``build`` returns the rewritten graph and how many rewrites it made (0: the file itself serves, and
    is returned as its own path). Rewriting means loading the graph with the ``onnx`` package, whose
    import alone costs about half a second (``ml_dtypes``), before protobuf surgery on megabytes of
    weights; a cached rewrite is one file for onnxruntime to open. Entries are keyed by the source's
    resolved path, size and modification time and :data:`_DERIVED_VERSION`; each is written to a
    temporary name and renamed, so concurrent processes never read half a file. A cache that cannot be
    written is skipped, and the rewrite is handed back as a graph.
    """
    folder = graph_cache_dir()
    entry = None
    if folder is not None:
        stat = source.stat()
        key = f"{_DERIVED_VERSION}|{kind}|{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        entry = folder / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.{kind}"
        try:
            note = json.loads(entry.with_suffix(entry.suffix + ".json").read_text())
            count = int(note["rewrites"])
            graph = entry.with_suffix(entry.suffix + ".onnx")
            if count == 0:
                return source, 0
            if graph.is_file():
                return graph, count
        except (OSError, ValueError, KeyError, TypeError):
            pass
    model, count = build()
    if entry is None:
        return (model if count else source), count
    try:
        import onnx

        folder.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        graph = entry.with_suffix(entry.suffix + ".onnx")
        if count:
            _atomic(graph, lambda tmp: onnx.save(model, str(tmp)))
        note_path = entry.with_suffix(entry.suffix + ".json")
        _atomic(note_path, lambda tmp: tmp.write_text(json.dumps({"source": str(source), "rewrites": count})))
        _forget_older(folder, source, kind, keep=note_path)  # type: ignore[arg-type]
    except OSError:
        return (model if count else source), count
    return (graph if count else source), count


def _forget_older(folder: Path, source: Path, kind: str, keep: Path) -> None:
    """Remove the cache entries of earlier versions of ``source`` (a replaced or edited file)."""
    for note in folder.glob(f"{source.stem}-*.{kind}.json"):
        if note == keep:
            continue
        try:
            if json.loads(note.read_text()).get("source") == str(source):
                note.with_suffix(".onnx").unlink(missing_ok=True)
                note.unlink(missing_ok=True)
        except (OSError, ValueError, AttributeError):
            continue


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_session(
    path: str | Path,
    *,
    device: str = "auto",
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    optimization: Optimization = "all",
    io_binding: bool | None = None,
    spin: bool = False,
) -> AttackSession:
    """The shared :class:`AttackSession` for ``path`` on ``device`` with these settings, loaded once.

    The cache key includes the file's size and modification time, so a replaced file is loaded afresh.
    """
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise ModelError(f"{path}: attack graph not found")
    stat = resolved.stat()
    placement = resolve_device(device)
    key = (
        str(resolved), stat.st_mtime_ns, stat.st_size, placement, intra_op_threads, inter_op_threads,
        optimization, io_binding, spin,
    )  # fmt: skip
    with _CACHE_LOCK:
        session = _CACHE.get(key)
        if session is None:
            session = AttackSession(
                resolved,
                device=device,
                intra_op_threads=intra_op_threads,
                inter_op_threads=inter_op_threads,
                optimization=optimization,
                io_binding=io_binding,
                spin=spin,
            )
            _CACHE[key] = session
        return session


def clear_session_cache() -> None:
    """Drop every cached session (their memory is freed once no caller holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
