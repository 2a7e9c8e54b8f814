"""matplotlib for the runtime's figures, imported only when a figure is drawn.

matplotlib is an optional extra (``pip install 'uncnn-rt[plot]'``), so the runtime imports without it;
a command that will draw asks :func:`require_matplotlib` first, to fail before its work, not after.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from uncnn_rt.runtime.errors import MissingExtraError
from uncnn_rt.runtime.fileio import atomic_write_bytes, make_folder


def require_matplotlib() -> None:
    """Raise :class:`MissingExtraError` now when matplotlib is missing."""
    pyplot()


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError(
            "plots need matplotlib, which the [plot] extra installs: pip install 'uncnn-rt[plot]'"
        ) from exc
    return plt


def save_png(fig: Any, path: str | Path, *, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created, atomically) and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    target = Path(path)
    make_folder(target.parent)
    atomic_write_bytes(target, buffer.getvalue())
    return target
