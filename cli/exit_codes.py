"""The exit codes of ``uncnn-rt``, and which one a run of several inputs ends with.

The domain errors carry theirs (:attr:`~uncnn_rt.runtime.errors.UncnnError.exit_code`), so the codes of
errors are taken from the error classes rather than spelled again:

- 0 ``EXIT_OK``: done (for ``cloak``: every face PROTECTED by every model);
- 1 ``EXIT_FAILED``: anything else went wrong (``models verify``: a file differs from the manifest);
- 2 ``EXIT_INPUT``: bad input (an unreadable, corrupt or oversized file, no face found, a bad option, a
  missing file or extra);
- 3 ``EXIT_MODEL``: a model is missing or broken;
- 4 ``EXIT_NOT_PROTECTED``: ``cloak`` wrote its outputs but some face is NOT PROTECTED by some model;
- 130 ``EXIT_INTERRUPTED``: stopped by Ctrl-C (128 + SIGINT, as shells report it); ``cloak`` says what it
  wrote and verified, what it wrote without verifying, and what it did not write.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from uncnn_rt.runtime.errors import InputError, ModelError, UncnnError

EXIT_OK: Final = 0
EXIT_FAILED: Final = UncnnError.exit_code
EXIT_INPUT: Final = InputError.exit_code
EXIT_MODEL: Final = ModelError.exit_code
EXIT_NOT_PROTECTED: Final = 4
EXIT_INTERRUPTED: Final = 130

SEVERITY: Final = (EXIT_MODEL, EXIT_INPUT, EXIT_FAILED, EXIT_NOT_PROTECTED)
"""With several inputs the worst code wins, in this order: a broken model concerns every input, a bad
input is the user's to fix, and NOT PROTECTED is a result rather than a failure."""


def worst_exit_code(codes: Iterable[int | None]) -> int:
    """The exit code of a run whose inputs ended with ``codes`` (None: no code of its own)."""
    found = set(codes)
    return next((code for code in SEVERITY if code in found), EXIT_OK)
