"""The ``uncnn-rt`` Typer application: global options, and one module per command group."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

from uncnn_rt import __version__
from uncnn_rt.cli.options import GlobalOptions

app = typer.Typer(
    name="uncnn-rt",
    help="Cloak face photos against recognizers, and attack or measure any ONNX model, on onnxruntime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"uncnn-rt {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    ctx: typer.Context,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="Execution device: cpu, cuda, auto (CUDA when available, else CPU), or an onnxruntime "
            "execution-provider name.",
            envvar="UNCNN_DEVICE",
        ),
    ] = "auto",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only results and errors: no progress bars.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", help="Show the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    ctx.obj = GlobalOptions(device=device, quiet=quiet)


def _hide_flag_metavars() -> None:
    """Typer's rich help prints a type after every option, ``<bool>`` after flags too (``--json <bool>``),
    which reads as if the flag took a value. A flag takes none: show nothing there, as click does."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_hides_flags", False):
        return  # a Typer without the types column, or already done

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        if self.is_flag and self.metavar is None:
            return None
        return shown(self, ctx)  # type: ignore[no-any-return]

    display_type_rich._hides_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_metavars()


def _add_command_groups() -> None:
    # One module per command group, each with its own Typer app.
    from uncnn_rt.cli import augment_cmd, cloak_cmd, convert_cmd, demo_cmd, eval_cmd, models_cmd, serve_cmd

    app.command("cloak", help=cloak_cmd.CLOAK_HELP)(cloak_cmd.cloak)
    app.command("compare")(cloak_cmd.compare)
    app.command("classify")(cloak_cmd.classify)
    app.command("eval")(eval_cmd.run_eval)
    app.command("demo")(demo_cmd.demo)
    app.command("serve")(serve_cmd.serve)
    app.add_typer(convert_cmd.app, name="convert")
    app.add_typer(models_cmd.app, name="models")
    app.command("augment", help=augment_cmd.AUGMENT_HELP)(augment_cmd.augment)
    app.command("robustness")(augment_cmd.robustness)


_add_command_groups()


def main() -> None:
    """The ``uncnn-rt`` entry point.

    A command that ends while models are still opening in the background (``cloak`` on a photo that
    fails to decode, or stopped by Ctrl-C during the loading) must not go through the interpreter's
    shutdown, which would kill onnxruntime mid-way and abort the process (exit 134) after the right
    error line: its output is flushed and the process ends at once with the command's exit code.
    """
    try:
        app()
    except SystemExit as done:
        from uncnn_rt.cli.cloak_cmd import loading_models

        if not loading_models():
            raise
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, int | None):
            print(done.code, file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
                stream.flush()
        os._exit(code)
