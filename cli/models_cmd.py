"""``uncnn-rt models``: list and verify the shipped model zoo."""

from __future__ import annotations

import io

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from uncnn_rt.cli.errors import clean_errors
from uncnn_rt.cli.exit_codes import EXIT_FAILED
from uncnn_rt.runtime import catalog

app = typer.Typer(
    help="List and verify the shipped models (provenance, license, dev-set figures).", no_args_is_help=True
)


def _dev_summary(entry: catalog.ModelEntry) -> str:
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
    """Show every shipped model with its kind, size, license, dev-set figures and source package."""
    with clean_errors():
        entries = catalog.load_manifest()
    if not entries:
        typer.echo(
            "no models are shipped in this installation (build them: python -m uncnn_rt.converters.zoo build)"
        )
        return
    console = Console()
    table = _models_table(entries, with_source=True)
    if _natural_width(table) <= console.width:
        console.print(table)
        return
    # Too narrow for the source column, whose package names hold no space to wrap at (80 columns folded
    # them over 5 lines): the sources follow the table, one line per package, whole.
    console.print(_models_table(entries, with_source=False))
    by_source: dict[str, list[str]] = {}
    for e in entries:
        by_source.setdefault(_source(e), []).append(e.name)
    console.print("sources:", style="bold")
    for source, names in by_source.items():
        console.print(f"  {source}: {', '.join(names)}", markup=False, highlight=False)


def _natural_width(table: Table) -> int:
    """The width ``table`` takes when nothing is wrapped (rich's own measure is capped at the console's)."""
    wide = Console(width=10_000, file=io.StringIO())
    with wide.capture() as captured:
        wide.print(table)
    return max((len(line.rstrip()) for line in captured.get().splitlines()), default=0)


def _source(entry: catalog.ModelEntry) -> str:
    return f"{entry.source.get('package', '?')}@{entry.source.get('version', '?')}"


def _models_table(entries: list[catalog.ModelEntry], *, with_source: bool) -> Table:
    table = Table(title="uncnn-rt models", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("name", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("MB", justify="right", no_wrap=True)
    table.add_column("license", no_wrap=True)
    table.add_column("default", no_wrap=True)
    table.add_column("dev set", no_wrap=with_source)
    if with_source:
        table.add_column("source", no_wrap=True)
    for e in entries:
        size = e.path.stat().st_size / 1e6 if e.path.is_file() else float("nan")
        default = "yes" if e.in_default_ensemble else ""
        row = [e.name, e.kind, f"{size:.1f}", e.license, default, _dev_summary(e)]
        table.add_row(*row, *([_source(e)] if with_source else []))
    return table


@app.command("verify")
def verify_models() -> None:
    """Re-hash every shipped file against the manifest; exit 1 when any differs or is missing."""
    with clean_errors():
        entries = catalog.load_manifest()
    bad = 0
    for e in entries:
        reason = catalog.verify(e)
        if reason is None:
            typer.echo(f"ok   {e.file}")
        else:
            bad += 1
            typer.echo(f"FAIL {reason}", err=True)
    if bad:
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"{len(entries)} model file(s) verified")
