"""The progress bar every long-running command shows (hidden with --quiet)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bar(console: Console, *, hidden: bool) -> Progress:
    """A transient bar with a count, elapsed time and a free-text ``detail`` field per task."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        disable=hidden,
        transient=True,
    )
