"""What one server process does and accepts (:class:`ServeConfig`), and the sessions it shares between
its requests (:class:`Models`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Final

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.cloak.report import CLASSIFIER
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.sessions import AttackSession, open_session

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
    """

    device: str = "auto"
    models: tuple[str, ...] | None = None
    max_concurrency: int = 1
    queue: int | None = None
    max_upload_mb: float = 20.0
    max_megapixels: float = 24.0
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise InputError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.queue is not None and self.queue < 0:
            raise InputError(f"queue must be >= 0, got {self.queue}")
        for name in ("max_upload_mb", "max_megapixels", "timeout"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise InputError(f"{name} must be a positive number, got {value}")

    @property
    def queue_size(self) -> int:
        return 4 * self.max_concurrency if self.queue is None else self.queue

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
    """The sessions a server process shares between its requests (onnxruntime sessions are thread-safe)."""

    recognizers: list[AttackSession]
    detector: cloaking.Detector
    classifier: AttackSession | None
    device: str

    def recognizers_for(self, names: list[str] | None) -> list[AttackSession]:
        """The default recognizers, or the named shipped ones (opened once, then cached by the runtime)."""
        if names is None:
            return self.recognizers
        return cloaking.load_recognizers(names, device=self.device)


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
    return Models(recognizers, detector, classifier, config.device)
