"""Domain errors. Each says what was expected and what was got; the CLI prints them as one line."""

from __future__ import annotations


class UncnnError(Exception):
    """Base class of every error uncnn-rt reports to a user. ``exit_code`` is the CLI's exit status."""

    exit_code: int = 1


class InputError(UncnnError):
    """A user-supplied file or argument is missing, malformed or out of range."""

    exit_code = 2


class ModelError(UncnnError):
    """A model file does not follow the attack-graph contract, or cannot be loaded."""

    exit_code = 3


class DeviceError(InputError):
    """A requested device or execution provider is unknown or not available in this onnxruntime build."""


class ContractError(ModelError):
    """An attack graph's inputs, outputs or metadata differ from the attack-graph contract."""
