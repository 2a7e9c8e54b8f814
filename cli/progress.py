"""The progress every long-running command shows (hidden with --quiet).

On a terminal it is a transient rich bar. Elsewhere (a log file, a pipe, CI) a bar cannot redraw, and
rich's transient display would leave only an empty line behind, so progress is written as plain lines
on stderr instead: one every :data:`LINE_INTERVAL` seconds at most, and none at all for a job that
finishes sooner (short runs stay silent, long ones show that they are alive).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

LINE_INTERVAL = 10.0
"""Seconds between two progress lines when stderr is not a terminal."""


@dataclass
class _LineTask:
    description: str
    total: float | None
    completed: float = 0.0
    detail: str = ""


class LineProgress:
    """The part of :class:`rich.progress.Progress` the commands use, printed as throttled lines."""

    def __init__(self, console: Console, *, interval: float | None = None) -> None:
        self.console = console
        self.interval = LINE_INTERVAL if interval is None else interval
        self._tasks: list[_LineTask] = []
        self._start = time.monotonic()
        self._last = self._start
        self._printed = False

    def __enter__(self) -> LineProgress:
        self._start = self._last = time.monotonic()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # A run that printed progress says it finished; one that printed nothing stays silent.
        if self._printed and kind is None:
            self._print(final=True)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> TaskID:
        self._tasks.append(_LineTask(description, total, detail=str(fields.get("detail", ""))))
        return TaskID(len(self._tasks) - 1)

    def update(self, task_id: TaskID, *, advance: float | None = None, **fields: Any) -> None:
        task = self._tasks[task_id]
        if advance:
            task.completed += advance
        if "detail" in fields:
            task.detail = str(fields["detail"])
        if "completed" in fields:
            task.completed = float(fields["completed"])
        self._maybe_print()

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(final=False)

    def _print(self, *, final: bool) -> None:
        elapsed = time.monotonic() - self._start
        for task in self._tasks:
            count = f"{task.completed:g}" + ("" if task.total is None else f"/{task.total:g}")
            detail = "done" if final else task.detail
            line = f"{task.description} {count} [{_clock(elapsed)}]" + (f" {detail}" if detail else "")
            # Plain text: file names may hold brackets that rich would read as markup.
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._printed = True


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_bar(console: Console, *, hidden: bool) -> Progress | LineProgress:
    """A transient bar (count, elapsed time, a free-text ``detail`` field per task) on a terminal; plain
    progress lines on stderr otherwise (:class:`LineProgress`); nothing when ``hidden``."""
    if not hidden and not console.is_terminal:
        return LineProgress(console)
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
