"""``uncnn-rt eval``: measure how well cloaks protect, white-box and in transfer, after re-encoding.

The protocol is :mod:`uncnn_rt.runtime.evaluate`'s; this module reads options, builds the cloak
functions and evaluators, and prints tables, JSON and plots.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from uncnn_rt.cli.errors import clean_errors
from uncnn_rt.cli.options import Aim, Cap, Scatter, global_options
from uncnn_rt.cli.progress import progress_bar
from uncnn_rt.runtime import catalog, visibility
from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime import evaluate as ev
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.fileio import atomic_write_bytes, check_new_file, check_new_folder, make_folder

_EVAL_TEXT = """Measure how well cloaks protect, by the protocol below.

DATASET holds one sub-folder per identity (at least 2 photos each; others are skipped with a warning),
or an identities/ folder and, optionally, a photos/ folder of unlabelled group photos.

Every clean photo is embedded by every evaluator. A photo is recognized when its nearest other
gallery photo is the same identity with a similarity at or above the model's threshold; protection
counts only photos recognized when clean.

P1 (probe cloaked): the cloaked photo searched against everyone's clean photos.

P2 (gallery cloaked): the clean photo searched against a gallery in which the other photos of its
identity are cloaked and everyone else's are clean.

P3 (linkability): the cloaked photo searched against everyone's other cloaked photos, as a tracker
that collects only cloaked photos would; a photo is unlinked when it no longer finds its identity.

All three are measured on the cloaked file as saved, after JPEG re-encoding (--jpeg) and after a downscale
and back up (--downscale), each re-embedded through the same face pipeline. White-box: cloaked with
the ensemble, scored on each member. Leave-one-out transfer: cloaked without member m, scored on m.
External: other shipped recognizers and --evaluator, scored on the white-box cloaks (a duplicate of
an ensemble member is flagged: not independent).

--evaluator takes an attack graph (uncnn-rt convert grad; threshold from its metadata unless given)
or a plain ONNX face model, which needs --threshold and is fed the --evaluator-window crop resized
to its input size (or --evaluator-size), as (pixel - mean) / std, in RGB (or --evaluator-bgr).

Cost: one cloak per photo for the white-box run, plus one per photo and ensemble member for
leave-one-out (--no-transfer skips them). --limit N cloaks whole identities up to N photos.

Exit codes: 0 done; 2 input error; 3 model missing or broken.
"""
# One line per paragraph, so that the help reflows to the terminal's width.
EVAL_HELP = "\n\n".join(" ".join(p.split()) for p in _EVAL_TEXT.split("\n\n"))

DEFAULT_MODES_HELP = "; ".join(s.describe() for s in cloaking.MODES.values())


def _split(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"{option} needs comma-separated names, got {text!r}")
    return items


def _triple(text: str, option: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise InputError(f"{option} takes one number or three (r,g,b), got {text!r}") from exc
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise InputError(f"{option} takes one number or three (r,g,b), got {text!r}")
    return values[0], values[1], values[2]


def _window(text: str) -> str | tuple[float, float, float, float]:
    if text in ev.WINDOWS:
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not (values[2] > values[0] and values[3] > values[1]):
        raise InputError(
            f"--evaluator-window is arcface, full or top,left,bottom,right fractions of the canonical "
            f"crop (bottom > top, right > left), got {text!r}"
        )
    return values[0], values[1], values[2], values[3]


def run_eval(
    ctx: typer.Context,
    dataset: Annotated[
        Path,
        typer.Argument(
            exists=True,
            file_okay=False,
            dir_okay=True,
            metavar="DATASET",
            help="Folder of identity folders (see above).",
        ),
    ],
    mode: Annotated[str, typer.Option(help=f"Cloak mode: {DEFAULT_MODES_HELP}.")] = cloaking.DEFAULT_MODE,
    modes: Annotated[
        str | None, typer.Option(help="Several modes, comma-separated (e.g. low,mid,high); overrides --mode.")
    ] = None,
    eps: Annotated[float | None, typer.Option(help="L-inf budget (0..255), overriding every mode's.")] = None,
    steps: Annotated[int | None, typer.Option(help="Most attack steps, overriding every mode's.")] = None,
    ssim_min: Annotated[
        float | None, typer.Option("--ssim-min", help="SSIM floor, overriding every mode's (0: none).")
    ] = None,
    cap: Cap = None,
    coarse: Annotated[
        float | None,
        typer.Option(help="Perturbation grid step in crop pixels, overriding every mode's (1: per pixel)."),
    ] = None,
    scatter: Scatter = None,
    aim: Aim = None,
    models: Annotated[
        str | None,
        typer.Option(
            help="The ensemble, comma-separated: shipped recognizers, or paths of face attack graphs "
            "(uncnn-rt convert grad) \\[default: the default ensemble]."
        ),
    ] = None,
    evaluator: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="An extra evaluator: your ONNX face model."),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="The --evaluator's match threshold (cosine similarity).")
    ] = None,
    evaluator_window: Annotated[
        str,
        typer.Option(
            "--evaluator-window",
            help="Plain --evaluator: its input framing: arcface (5-point ArcFace 112 framing), full (the "
            "canonical crop) or top,left,bottom,right fractions of the canonical crop.",
        ),
    ] = "arcface",
    evaluator_size: Annotated[
        int | None,
        typer.Option("--evaluator-size", help="Plain --evaluator: input side \\[default: the model's]."),
    ] = None,
    evaluator_mean: Annotated[
        str, typer.Option("--evaluator-mean", help="Plain --evaluator: mean (0..255), one value or r,g,b.")
    ] = "127.5",
    evaluator_std: Annotated[
        str,
        typer.Option("--evaluator-std", help="Plain --evaluator: std (0..255 units), one value or r,g,b."),
    ] = "127.5",
    evaluator_bgr: Annotated[
        bool, typer.Option("--evaluator-bgr", help="Plain --evaluator: feed BGR instead of RGB.")
    ] = False,
    aligned: Annotated[
        bool,
        typer.Option(
            "--aligned/--detect",
            help="--aligned: the photos are aligned face chips (the whole image is the face, as cloak "
            "--no-align); --detect: find and align the largest face of each photo.",
        ),
    ] = False,
    jpeg: Annotated[int, typer.Option(min=1, max=95, help="JPEG quality of the re-encoding test.")] = 75,
    downscale: Annotated[
        float, typer.Option(min=0.05, max=1.0, help="Scale of the downscale test (down, then back up).")
    ] = 0.5,
    no_transfer: Annotated[
        bool, typer.Option("--no-transfer", help="Skip the leave-one-out cloaks (white-box only).")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Cloak at most N photos (whole identities; every photo stays in the gallery) and at most "
            "N group photos.",
        ),
    ] = None,
    photos: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Folder of unlabelled group photos for the self-protection report \\[default: "
            "DATASET/photos when present].",
        ),
    ] = None,
    no_photos: Annotated[bool, typer.Option("--no-photos", help="Skip the group photos.")] = False,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json", metavar="OUT", help="Write the JSON report to OUT ('-': print it, no tables)."
        ),
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(metavar="DIR", help="Write PNG plots into DIR (needs the \\[plot] extra).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the cloaks' random draws.")] = 0,
) -> None:
    options = global_options(ctx)
    device, quiet = options.device, options.quiet
    console = Console(stderr=True)
    with clean_errors():
        if threshold is not None and evaluator is None:
            raise InputError("--threshold is the threshold of --evaluator; give --evaluator too")
        mode_names = _split(modes, "--modes") if modes is not None else [mode]
        settings = {
            name: cloaking.settings_for(
                name,
                eps=eps,
                steps=steps,
                ssim_min=ssim_min,
                coarse=coarse,
                cap=cap,
                scatter=scatter,
                aim=aim,
            )
            for name in mode_names
        }
        cloaking.check_seed(seed)
        if plots is not None:
            from uncnn_rt.runtime import plotting

            plotting.require_matplotlib()  # fail before the cloaking, not after it
            check_new_folder(plots)
        if json_out is not None and str(json_out) != "-":
            check_new_file(json_out)  # an unwritable report fails now, not after the whole evaluation
        data = ev.load_dataset(dataset)
        group_folder = None if no_photos else (photos or ev.group_photos_folder(dataset))
        group, group_warnings = (
            ([], []) if group_folder is None else ev.load_group_photos(group_folder, limit=limit)
        )

        ensemble_names = (
            _split(models, "--models") if models is not None else cloaking.default_recognizer_names()
        )
        shipped = [e.name for e in catalog.load_manifest() if e.kind == "face" and e.threshold is not None]
        requested = list(dict.fromkeys(ensemble_names + shipped))
        sessions = cloaking.load_recognizers(requested, device=device)
        by_name = {s.name: s for s in sessions}
        if len(by_name) < len(sessions):
            raise InputError(f"--models names two recognizers alike: {', '.join(s.name for s in sessions)}")
        # A --models entry may be the path of an attack graph: from here on it goes by its model's name.
        named = dict(zip(requested, (s.name for s in sessions), strict=True))
        ensemble_names = [named[n] for n in dict.fromkeys(ensemble_names)]
        embedders = ev.shipped_embedders(sessions)
        if evaluator is not None:
            preprocessing = ev.OnnxPreprocessing(
                window=_window(evaluator_window),
                size=evaluator_size,
                mean=_triple(evaluator_mean, "--evaluator-mean"),
                std=_triple(evaluator_std, "--evaluator-std"),
                channel_order="BGR" if evaluator_bgr else "RGB",
            )
            extra = ev.open_evaluator(
                evaluator, threshold=threshold, preprocessing=preprocessing, device=device
            )
            if extra.name in by_name:
                raise InputError(f"--evaluator {evaluator} is named {extra.name!r}, like a shipped model")
            embedders.append(extra)
        detector = cloaking.load_detector(device=device) if (not aligned or group) else None
        finder = ev.whole_image_faces if detector is None or aligned else ev.detected_faces(detector)
        conditions = ev.default_conditions(jpeg, downscale)
        transfer = not no_transfer
        cloaks = {
            name: ev.cloak_function(
                by_name, s, detector=detector, no_align=aligned, largest=not aligned, seed=seed
            )
            for name, s in settings.items()
        }
        attacks = ev.plan_attacks(ensemble_names, [e.name for e in embedders], transfer=transfer)
        total = len(mode_names) * len(attacks) * (len(ev.probe_indices(data, limit)) + len(group))

        with progress_bar(console, hidden=quiet) as progress:
            task = progress.add_task("cloaking", total=total, detail="")

            def tick(what: str) -> None:
                progress.update(task, advance=1, detail=what)

            report = ev.evaluate(
                data,
                cloaks=cloaks,
                embedders=embedders,
                ensemble=ensemble_names,
                transfer=transfer,
                finder=finder,
                aligned=aligned,
                conditions=conditions,
                limit=limit,
                settings={name: _settings_dict(s) for name, s in settings.items()},
                progress=tick,
            )
            if group:
                assert detector is not None
                reports = []
                for mode_report in report.modes:
                    group_cloak = ev.cloak_function(
                        by_name, settings[mode_report.mode], detector=detector, seed=seed
                    )
                    outcome = ev.evaluate_group_photos(
                        group,
                        cloak=group_cloak,
                        embedders=embedders,
                        ensemble=ensemble_names,
                        finder=ev.detected_faces(detector),
                        transfer=transfer,
                        conditions=conditions,
                        progress=lambda what, m=mode_report.mode: tick(f"{m}, {what}"),
                    )
                    reports.append(replace(mode_report, group=outcome))
                report = replace(report, modes=tuple(reports))
        report = replace(report, warnings=report.warnings + tuple(group_warnings))
    written = []
    if plots is not None:
        from uncnn_rt.runtime.evaluate.plots import write_plots

        with clean_errors():
            written = write_plots(report, plots)
    payload = report.to_dict()
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(payload, indent=2))
        return
    print_report(report)
    for path in written:
        typer.echo(f"plot: {path}")
    if json_out is not None:
        with clean_errors():
            make_folder(json_out.parent)
            atomic_write_bytes(json_out, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
        typer.echo(f"json: {json_out}")


run_eval.__doc__ = EVAL_HELP


def _settings_dict(s: cloaking.CloakSettings) -> dict[str, Any]:
    """Every field of the recipe, so that a report says exactly what was run."""
    fields: dict[str, Any] = json.loads(json.dumps(asdict(s)))
    return {"description": s.describe(), **fields}


# ---------------------------------------------------------------------------------------------------
# tables


def _pct(rate: ev.Rate) -> str:
    value = rate.rate
    return "-" if value is None else f"{100 * value:.1f}%"


_KIND_SHORT: dict[str, str] = {
    "white-box": "white-box",
    "leave-one-out": "leave-one-out",
    "external": "external",
}


def print_report(report: ev.EvalReport, console: Console | None = None) -> None:
    """The report as rich tables: evaluators, then per mode quality, protection and group photos."""
    out = console or Console(width=None if sys.stdout.isatty() else 160)
    names = report.condition_names
    described = {c.name: c.description for c in report.conditions}
    out.print(
        f"[bold]{report.dataset}[/]: {report.identities} identities, {report.photos} photos, "
        f"{report.probes} cloaked per attack; ensemble {', '.join(report.ensemble)}; "
        f"{'aligned chips' if report.aligned else 'faces detected and aligned'}"
    )
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/] {warning}")

    table = Table(title="Evaluators on the clean photos", title_justify="left")
    _name_column(table, "evaluator", [e.name for e in report.evaluators])
    for column in ("role", "threshold", "recognized clean"):
        table.add_column(column, justify="left" if column == "role" else "right")
    for c in names[1:]:
        table.add_column(f"control P1/P2/P3\n{_short(c, described)}", justify="right")
    for e in report.evaluators:
        role = "ensemble" if e.in_ensemble else "external"
        if e.duplicate_of:
            role += f", = {e.duplicate_of} (not independent)"
        cells = [" / ".join(_pct(rate) for rate in e.controls[c]) for c in names[1:]]
        table.add_row(
            e.name,
            role,
            f"{e.threshold:.3f}",
            f"{e.baseline.hits}/{e.baseline.total}",
            *cells,
        )
    out.print(table)
    out.print(
        "[dim]control: the transform alone applied to uncloaked photos (protection a cloak gets for free); "
        + "; ".join(f"{_short(c, described)}: {described[c]}" for c in names)
        + "[/]"
    )
    for mode in report.modes:
        _print_mode(out, report, mode, names, described)


def _print_mode(
    out: Console, report: ev.EvalReport, mode: ev.ModeReport, names: list[str], described: dict[str, str]
) -> None:
    out.rule(f"mode {_mode_title(mode.mode, str(mode.settings.get('description', '')))}")
    out.print(_quality_table("Cloak cost and image quality (saved photo vs original)", mode.quality))
    out.print(
        _visibility_table(
            "Visibility on the face regions, next to the same photos' JPEG re-encodes",
            report.jpeg_ladder,
            mode.quality,
        )
    )

    table = Table(
        title="Protection: share of photos recognized when clean that no longer are (P3: unlinked)",
        title_justify="left",
    )
    _name_column(table, "evaluator", [_evaluator_label(s) for s in mode.scores])
    for column in ("kind", "cloaked with", "eligible"):
        table.add_column(column, justify="right" if column == "eligible" else "left")
    for protocol in ev.PROTOCOLS:
        for c in names:
            table.add_column(f"{protocol.upper()}\n{_short(c, described)}", justify="right")
    table.add_column("self-sim\nsaved", justify="right")
    for kind in ev.SCORE_KINDS:
        scores = mode.of_kind(kind)
        for s in scores:
            label = s.evaluator + (f" (= {s.duplicate_of})" if s.duplicate_of else "")
            attack = "ensemble" if s.attack == ev.WHITE_BOX_LABEL else s.attack
            cells = [_pct(s.conditions[c].rate(p)) for p in ev.PROTOCOLS for c in names]
            sim = s.conditions[names[0]].self_similarity
            table.add_row(
                label,
                _KIND_SHORT[kind],
                attack,
                str(s.eligible),
                *cells,
                "-" if sim is None else f"{sim:.3f}",
            )
        counted = mode.of_kind(kind, independent_only=kind == "external")
        if len(counted) > 1:
            cells = [_pct(ev.pooled(counted, c, p)) for p in ev.PROTOCOLS for c in names]
            eligible = sum(s.eligible for s in counted)
            what = "independent, pooled" if kind == "external" else "pooled"
            table.add_row(
                f"[bold]{kind} ({what})",
                "",
                "",
                str(eligible),
                *[f"[bold]{c}" for c in cells],
                "",
                end_section=True,
            )
        elif scores:
            table.add_section()
    unseen = mode.unseen()
    if len(unseen) > 1 and len(unseen) != len(mode.of_kind("leave-one-out")):
        cells = [_pct(ev.pooled(unseen, c, p)) for p in ev.PROTOCOLS for c in names]
        table.add_row(
            "[bold]never seen by its cloak (pooled)",
            "",
            "",
            str(sum(s.eligible for s in unseen)),
            *[f"[bold]{c}" for c in cells],
            "",
        )
    out.print(table)
    duplicates = [s for s in mode.scores if s.duplicate_of]
    for s in duplicates:
        out.print(
            f"[dim]{s.evaluator} is the same network as {s.duplicate_of}, an ensemble member: its "
            "figures are white-box in disguise, not an independent check.[/]"
        )
    if mode.group is not None:
        _print_group(out, mode.group, names, described)


def _mode_title(mode: str, description: str) -> str:
    """``mid: eps 16, ...``: the description already starts with the mode's name, so it is not repeated."""
    if not description:
        return mode
    return description if description.startswith(f"{mode}:") else f"{mode}: {description}"


def _name_column(table: Table, header: str, names: Sequence[str]) -> None:
    """A column of model names, never cut: two models that share a prefix must stay apart."""
    table.add_column(header, no_wrap=True, min_width=max([len(header), *map(len, names)]))


def _evaluator_label(score: ev.Score | ev.GroupScore) -> str:
    return score.evaluator + (f" (= {score.duplicate_of})" if score.duplicate_of else "")


def _counted(rate: ev.Rate) -> str:
    return f"{_pct(rate)} ({rate.hits}/{rate.total})"


def _short(condition: str, described: dict[str, str]) -> str:
    return "saved" if condition == ev.AS_SAVED else condition


def _quality_table(title: str, rows: Sequence[ev.AttackQuality]) -> Table:
    """One row per attack: photos, SSIM, PSNR, L-inf, seconds per photo and steps."""
    table = Table(title=title, title_justify="left")
    for column in ("attack", "photos", "SSIM mean", "SSIM min", "PSNR", "L-inf max", "s/photo", "steps"):
        table.add_column(column, justify="left" if column == "attack" else "right")
    for q in rows:
        table.add_row(*_quality_row(q))
    return table


def _quality_row(q: ev.AttackQuality) -> list[str]:
    return [
        q.attack,
        str(q.photos),
        f"{q.ssim_mean:.4f}",
        f"{q.ssim_min:.4f}",
        "inf" if math.isinf(q.psnr_mean) else f"{q.psnr_mean:.1f} dB",
        str(q.linf_max),
        f"{q.seconds_per_photo:.2f}",
        "-" if q.steps_mean is None else f"{q.steps_mean:.1f}",
    ]


def _visibility_table(
    title: str, ladder: dict[int, tuple[visibility.Visibility, ...]], rows: Sequence[ev.AttackQuality]
) -> Table:
    """Median (and worst) face FLIP, CIEDE2000, share of pixels over twice their JND, SSIM and PSNR: first
    each JPEG re-encode of the clean photos, then each attack's saved cloaks, with the highest JPEG
    quality whose medians they stay within."""
    table = Table(title=title, title_justify="left")
    for column in (
        "image",
        "faces",
        "FLIP median (worst)",
        "CIEDE2000 mean (worst)",
        "CIEDE2000 p95",
        "over 2 JND",
        "SSIM",
        "PSNR",
        "JPEG equiv.",
    ):
        table.add_column(column, justify="left" if column == "image" else "right")
    medians: dict[int, tuple[float, float]] = {}
    for q, faces in ladder.items():
        if faces:
            medians[q] = (
                float(np.median([f.flip for f in faces])),
                float(np.median([f.ciede2000_mean for f in faces])),
            )
            table.add_row(*_visibility_row(f"JPEG q{q} re-encode", faces, None))
    for q in rows:
        if q.faces:
            table.add_row(*_visibility_row(q.attack, q.faces, medians), end_section=q is rows[0])
    return table


def _percent(share: float) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.1f}%"


def _visibility_row(
    label: str, faces: Sequence[visibility.Visibility], ladder: dict[int, tuple[float, float]] | None
) -> list[str]:
    flips, des = [f.flip for f in faces], [f.ciede2000_mean for f in faces]
    flip, de = float(np.median(flips)), float(np.median(des))
    psnr = [f.psnr for f in faces if math.isfinite(f.psnr)]
    equivalent = "-"
    if ladder is not None:
        within = [q for q, (lf, ld) in ladder.items() if flip <= lf and de <= ld]
        # The finest re-encode the cloak is no more visible than (q85 beats q75).
        equivalent = f"q{max(within)}" if within else f"> q{min(ladder)}"
    return [
        label,
        str(len(faces)),
        f"{flip:.4f} ({max(flips):.4f})",
        f"{de:.2f} ({max(des):.2f})",
        f"{float(np.median([f.ciede2000_p95 for f in faces])):.2f}",
        _percent(float(np.median([f.over_jnd for f in faces]))),
        f"{float(np.median([f.ssim for f in faces])):.4f}",
        f"{float(np.median(psnr)):.1f} dB" if psnr else "inf",
        equivalent,
    ]


def _print_group(out: Console, group: ev.GroupReport, names: list[str], described: dict[str, str]) -> None:
    for warning in group.warnings:
        out.print(f"[yellow]warning:[/] {warning}")
    title = f"Group photos: {group.photos} photos, {group.faces} faces; cost and quality"
    out.print(_quality_table(title, group.quality))
    out.print(_visibility_table("Group photos: visibility per face region", group.jpeg_ladder, group.quality))
    table = Table(
        title="Group photos, self-protection: faces whose cloaked embedding falls below the threshold "
        "against their own clean embedding",
        title_justify="left",
    )
    _name_column(table, "evaluator", [_evaluator_label(s) for s in group.scores])
    for column in ("kind", "cloaked with"):
        table.add_column(column)
    for c in names:
        table.add_column(f"protected\n{_short(c, described)}", justify="right")
    table.add_column("mean sim\nsaved", justify="right")
    table.add_column("not re-\ndetected", justify="right")
    for s in group.scores:
        first = s.conditions[names[0]]
        table.add_row(
            s.evaluator + (f" (= {s.duplicate_of})" if s.duplicate_of else ""),
            s.kind,
            "ensemble" if s.attack == ev.WHITE_BOX_LABEL else s.attack,
            *[_counted(s.conditions[c].protected) for c in names],
            "-" if first.mean_similarity is None else f"{first.mean_similarity:.3f}",
            str(first.not_redetected),
        )
    out.print(table)
