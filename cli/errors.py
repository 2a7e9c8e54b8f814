"""Turning domain errors into one clean line on stderr and a non-zero exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from uncnn_rt.cli.exit_codes import EXIT_INPUT
from uncnn_rt.runtime.errors import UncnnError


@contextmanager
def clean_errors() -> Iterator[None]:
    """Report :class:`UncnnError` and missing files as ``error: ...`` and an exit code, never a traceback."""
    try:
        yield
    except UncnnError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except FileNotFoundError as exc:
        typer.echo(f"error: file not found: {exc.filename or exc}", err=True)
        raise typer.Exit(EXIT_INPUT) from None
