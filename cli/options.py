"""What several commands share: the global options they read from ``ctx.obj``, the ``Annotated`` options
declared alike in more than one command, and the fixed choices Typer validates (as ``Enum``\\ s, so that
``--help`` lists them and a wrong value is refused before anything runs).

``--mode`` stays a string: its values come with their descriptions in the commands' help, and a wrong one
gets the runtime's message (``unknown mode 'x'; expected one of low, mid, high``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated

import typer

from uncnn_rt.runtime import contract
from uncnn_rt.runtime.jobs import augment, variants


@dataclass
class GlobalOptions:
    """Options given before the command, shared by every command through ``ctx.obj``."""

    device: str = "auto"
    quiet: bool = False


def global_options(ctx: typer.Context) -> GlobalOptions:
    """The options given before the command; the defaults when a command is invoked on its own."""
    options = ctx.obj
    return GlobalOptions(
        device=getattr(options, "device", "auto"), quiet=bool(getattr(options, "quiet", False))
    )


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A ``str`` Enum whose members are ``values``, so that the runtime's tuple of names stays their one
    home."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


Kind = choices("Kind", contract.KINDS)
Layout = choices("Layout", ("NCHW", "NHWC"))
ChannelOrder = choices("ChannelOrder", ("RGB", "BGR"))
Resize = choices("Resize", ("bilinear", "area"))
Attack = choices("Attack", variants.ATTACKS)
Engine = choices("Engine", augment.ENGINES)

CAP_HELP = (
    "Visibility ceiling per face region, overriding the mode's: jpegQ (at most the photo's own JPEG "
    "re-encode at quality Q, in FLIP and CIEDE2000), KxjpegQ (K times its figures) or none. Each face "
    "still spends only what it needs to get past the mode's margin."
)
SCATTER_HELP = (
    "Weight of each face's own random direction in every recognizer's space (0, the default: off). The "
    "cloaks of one person's photos then scatter instead of still matching one another (P3 of eval); "
    "under the cap it costs some P1 (bench/RESULTS.md)."
)

Models = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated recognizers: shipped names, or paths of face attack graphs (uncnn-rt convert "
        "grad) \\[default: the shipped default ensemble]."
    ),
]
"""``--models`` of ``cloak`` and ``compare``."""
HELPERS_HELP = (
    "Comma-separated recognizers that steer every face's change but gate nothing: no face spends more to "
    "get past them and the verdict is --models' alone, e.g. sface,openface. Off by default: they lifted "
    "leave-one-out transfer at some more visibility (bench/RESULTS.md, runs 29-30)."
)
AIM_HELP = (
    "What a face must get past, on each recognizer: 'self' (every mode's) its threshold, so that even the "
    "photo the cloak was made from no longer matches; 'others' the similarity below which the person's "
    "other photos stop matching (the threshold over how close a person's photos come to one another on "
    "the dev set): less visible and weaker, as photos of one person can be closer than that "
    "(bench/RESULTS.md, run 31)."
)
Aim = Annotated[str | None, typer.Option(help=AIM_HELP)]
"""``--aim`` of ``cloak``."""
Helpers = Annotated[str | None, typer.Option(help=HELPERS_HELP)]
"""``--helpers`` of ``cloak``."""
Cap = Annotated[str | None, typer.Option(help=CAP_HELP)]
"""``--cap`` of ``cloak`` and ``eval``."""
Scatter = Annotated[float | None, typer.Option(help=SCATTER_HELP)]
"""``--scatter`` of ``cloak`` and ``eval``."""
