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


class UnreadableFileError(InputError):
    """An input path does not exist, is not a regular file, or cannot be read."""


class EmptyFileError(InputError):
    """An input file has no bytes at all."""


class NotAnImageError(InputError):
    """An input file is not in any image format that Pillow recognises."""


class DecodeError(InputError):
    """An image file is truncated or its pixel data is corrupt."""


class ImageTooLargeError(InputError):
    """An image file is over the byte limit, or its header declares more pixels than allowed."""


class UnsupportedImageError(InputError):
    """An image is valid but of a kind the cloak cannot handle (animated, floating-point samples, ...)."""


class OutputPathError(InputError):
    """An output path would overwrite the input, or cannot be written."""


class AlignmentError(InputError):
    """Landmarks or boxes from which no similarity transform can be estimated (coincident, non-finite)."""


class MissingExtraError(InputError):
    """An optional dependency of the feature asked for is not installed; the message names the extra
    (``pip install 'uncnn-rt[plot]'``)."""
