"""What one server process does and accepts (:class:`ServeConfig`), and the sessions it shares between
its requests (:class:`Models`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.cloak.report import CLASSIFIER
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession, open_session
from uncnn_rt.serve.errors import ApiError

CONFIG_ENV: Final = "UNCNN_SERVE_CONFIG"
"""Environment variable through which ``serve --workers N`` hands its settings to each worker process."""


@dataclass(frozen=True)
class ServeConfig:
    """What one server process does and how much it accepts.

    Attributes:
        device: execution device of the models (``cpu``, ``cuda``, ``auto`` or a provider name).
        models: recognizers a cloak uses by default (None: the shipped default ensemble).
        max_concurrency: requests computed at once (threads).
        queue: requests admitted to wait for a thread; None: 4 x ``max_concurrency``.
        max_upload_mb: largest image file accepted, in MB (10^6 bytes).
        max_megapixels: largest image accepted, read from its header before any pixel is decoded.
        timeout: seconds a request may take from admission to answer, waiting included.
        read_timeout: seconds an upload may send nothing before it is answered 408 (a stalled body).
        uploads: request bodies read at once, apart from the computing and queue slots; None: twice
            ``max_concurrency + queue``. Each holds at most one request's upload limit in memory.
        max_faces: most faces one cloak attacks (more: 422, unless ``face`` or ``largest`` picks one);
            the memory of a cloak grows with its faces.
        faces_per_batch: faces attacked together in one batched call; 1 keeps a cloak's peak memory
            near a one-face cloak's whatever the photo holds (8, the CLI's default, took a 14-face
            photo from 270 MB to 1.5 GB).
    """

    device: str = "auto"
    models: tuple[str, ...] | None = None
    max_concurrency: int = 1
    queue: int | None = None
    max_upload_mb: float = 20.0
    max_megapixels: float = 24.0
    timeout: float = 120.0
    read_timeout: float = 10.0
    uploads: int | None = None
    max_faces: int = 20
    faces_per_batch: int = 1

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_faces", "faces_per_batch"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queue is not None and self.queue < 0:
            raise InputError(f"queue must be >= 0, got {self.queue}")
        if self.uploads is not None and self.uploads < 1:
            raise InputError(f"uploads must be >= 1, got {self.uploads}")
        for name in ("max_upload_mb", "max_megapixels", "timeout", "read_timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise InputError(f"{name} must be a positive number, got {value}")

    @property
    def queue_size(self) -> int:
        return 4 * self.max_concurrency if self.queue is None else self.queue

    @property
    def upload_slots(self) -> int:
        return 2 * (self.max_concurrency + self.queue_size) if self.uploads is None else self.uploads

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        data = json.loads(text)
        if data.get("models") is not None:
            data["models"] = tuple(data["models"])
        return cls(**data)


@dataclass(frozen=True)
class Models:
    """The sessions a server process shares between its requests (onnxruntime sessions are thread-safe).

    ``allowed`` maps each recognizer name a client may send in ``models`` to its file, fixed at start-up:
    the shipped face recognizers, and the attack graphs the operator gave (``serve --models``), by their
    name and by the text the operator gave. A client's text is only ever looked up in it: never taken
    for a path, so no client can make the server open, probe or keep loaded a file of its choosing.
    """

    recognizers: list[AttackSession]
    detector: cloaking.Detector
    classifier: AttackSession | None
    device: str
    allowed: dict[str, Path] = field(default_factory=dict)

    @property
    def offered(self) -> list[str]:
        """The names a client may send in ``models`` (paths the operator typed are accepted, not listed)."""
        return sorted({name for name in self.allowed if not _looks_like_path(name)})

    def check_names(self, names: list[str] | None) -> list[str] | None:
        """``names`` when each is one this server offers; else :class:`ApiError` 422 naming the allowed
        values (never the rejected text: it may be a path)."""
        if names is None:
            return None
        rejected = sum(name not in self.allowed for name in names)
        if rejected:
            raise ApiError(
                422,
                f"field 'models': {rejected} of the {len(names)} name(s) given is not a recognizer "
                f"this server offers; allowed: {', '.join(self.offered) or 'none'}",
            )
        return names

    def recognizers_for(self, names: list[str] | None) -> list[AttackSession]:
        """The default recognizers, or the named allowed ones (opened once, then cached by the runtime)."""
        if names is None:
            return self.recognizers
        self.check_names(names)
        files = dict.fromkeys(self.allowed[name] for name in names)
        return [open_session(path, device=self.device) for path in files]


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.endswith(".onnx")


def load_models(config: ServeConfig) -> Models:
    """Open the recognizers, the detector and the classifier once, before the first request.

    Raises:
        ModelError: a model is missing or broken. InputError: an unknown model name or device.
    """
    names = None if config.models is None else list(config.models)
    recognizers = cloaking.load_recognizers(names, device=config.device)
    detector = cloaking.load_detector(device=config.device)
    entries = {e.name: e for e in catalog.load_manifest()}
    classifier = (
        open_session(entries[CLASSIFIER].path, device=config.device) if CLASSIFIER in entries else None
    )
    allowed = {e.name: e.path for e in entries.values() if e.kind == "face" and e.path.is_file()}
    # The operator's choice: each recognizer it loaded, by its name (which may replace a shipped one
    # of the same name) and by the text given to --models.
    if names is not None:
        for given, session in zip(dict.fromkeys(names), recognizers, strict=True):
            allowed[session.name] = session.path
            allowed[given] = session.path
    return Models(recognizers, detector, classifier, config.device, allowed)
