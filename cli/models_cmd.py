"""``uncnn-rt models``: list and verify the shipped model zoo."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from uncnn_rt.cli.errors import clean_errors
from uncnn_rt.runtime import zoo

app = typer.Typer(
    help="List and verify the shipped models (provenance, license, dev-set figures).", no_args_is_help=True
)


def _dev_summary(entry: zoo.ModelEntry) -> str:
    dev = entry.raw.get("dev") or {}
    parts = []
    if "rank1" in dev:
        parts.append(f"rank-1 {100 * float(dev['rank1']):.1f}%")
    if entry.threshold is not None:
        parts.append(f"thr {entry.threshold:.3f}")
    if "top1" in dev:
        parts.append(f"top-1 {100 * float(dev['top1']):.1f}%")
    return ", ".join(parts) or "-"


@app.command("list")
def list_models() -> None:
    """Show every shipped model with its kind, size, license and dev-set figures."""
    with clean_errors():
        entries = zoo.load_manifest()
    if not entries:
        typer.echo(
            "no models are shipped in this installation (build them: python -m uncnn_rt.converters.zoo build)"
        )
        return
    table = Table(title="uncnn-rt models")
    table.add_column("name", no_wrap=True)
    for col in ("kind", "MB", "license"):
        table.add_column(col)
    table.add_column("source", overflow="fold")
    table.add_column("default")
    table.add_column("dev set")
    for e in entries:
        size = e.path.stat().st_size / 1e6 if e.path.is_file() else float("nan")
        source = f"{e.source.get('package', '?')}@{e.source.get('version', '?')}"
        table.add_row(
            e.name,
            e.kind,
            f"{size:.1f}",
            e.license,
            source,
            "yes" if e.in_default_ensemble else "",
            _dev_summary(e),
        )
    Console().print(table)


@app.command("verify")
def verify_models() -> None:
    """Re-hash every shipped file against the manifest; exit 1 when any differs or is missing."""
    with clean_errors():
        entries = zoo.load_manifest()
    bad = 0
    for e in entries:
        reason = zoo.verify(e)
        if reason is None:
            typer.echo(f"ok   {e.file}")
        else:
            bad += 1
            typer.echo(f"FAIL {reason}", err=True)
    if bad:
        raise typer.Exit(1)
    typer.echo(f"{len(entries)} model file(s) verified")
