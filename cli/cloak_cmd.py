"""``uncnn-rt cloak``, ``uncnn-rt compare`` and ``uncnn-rt classify``: the privacy commands and their demo.

``cloak`` detects the faces of each photo, perturbs them at the photo's own resolution so that face
recognizers no longer match the person, writes ``name.cloaked.ext`` beside the input (never over it),
then re-opens the written file and verifies the protection per face and per model.
"""

from __future__ import annotations

import glob
import json
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.table import Table

from uncnn_rt.cli.errors import clean_errors
from uncnn_rt.cli.exit_codes import (
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NOT_PROTECTED,
    EXIT_OK,
    worst_exit_code,
)
from uncnn_rt.cli.options import Aim, Cap, Helpers, Models, Scatter, global_options
from uncnn_rt.cli.progress import progress_bar
from uncnn_rt.runtime import catalog
from uncnn_rt.runtime import cloak as cloaking
from uncnn_rt.runtime.cloak.report import (
    CLASSIFIER,
    FileOutcome,
    class_rows,
    cloak_details,
    similarity_row,
    split_models,
    visibility_details,
)
from uncnn_rt.runtime.cloak.verify import (
    SetLinkability,
    VerifyReport,
    classify_image,
    compare_faces,
    same_person,
    set_linkability,
    verify,
)
from uncnn_rt.runtime.errors import InputError, ModelError, OutputPathError, UncnnError
from uncnn_rt.runtime.fileio import check_new_folder, make_folder
from uncnn_rt.runtime.imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    LoadedImage,
    check_output_path,
    default_output_path,
    load_image,
    lossy_round_trip,
    normalise_format,
    output_format,
    path_format,
    probe_image,
    save_image,
)
from uncnn_rt.runtime.sessions import open_session


def _mode_line(name: str, m: cloaking.CloakSettings) -> str:
    rounds = f"{m.refine_rounds} refinement round{'s' if m.refine_rounds != 1 else ''}"
    if m.rescue_rounds:
        rounds += f" (+ {m.rescue_rounds} for a face still short after them)"
    return f"  {m.describe()}; + {rounds} of at most {m.refine_steps} steps (at most {m.most_steps} per face)"


_MODE_LINES = "\n\n".join(_mode_line(name, m) for name, m in cloaking.MODES.items())

CLOAK_HELP = (
    "Cloak the faces in photos so that face recognizers no longer match them.\n\n"
    "Each PATH is an image file, a directory (its images, not recursive) or a quoted glob. The result is "
    "written beside each input as NAME.cloaked.EXT (or under -o), never over the input; then the written "
    "file is re-opened, its faces are found again and every face is checked with every recognizer.\n\n"
    "Modes are protection levels: each face gets the least change that puts every recognizer past its "
    "threshold by the mode's margin, and never more than the ceiling: its region (its box grown by a "
    "quarter of its side) changes at most as much, in FLIP and in CIEDE2000 colour difference, as the "
    "named multiple of the photo's own JPEG re-encode, checked on the saved file (eps: the largest change "
    "of a pixel, in grey levels 0..255). A refinement round re-detects the cloaked faces, as the "
    "verification will, and continues the attack on those that fall short:\n\n"
    f"{_MODE_LINES}\n\n"
    f"Images over {DEFAULT_MAX_PIXELS / 1e6:g} megapixels, as declared in their header, are refused before "
    "any pixel is decoded (decompression bombs).\n\n"
    "Exit codes: 0 every face cloaked and verified PROTECTED by every model; 4 cloaked, but some face is "
    "NOT PROTECTED by some model; 2 an input error (unreadable, corrupt or oversized image, no face "
    "found, bad option, an output that cannot be written); 3 a model is missing or broken; 1 anything "
    "else; 130 stopped by Ctrl-C (a line says what was written, verified or not). With several inputs "
    "the others are still processed and the worst code wins (3, then 2, then 1, then 4)."
)


def _is_cloaked_output(path: Path) -> bool:
    return ".cloaked" in path.suffixes or path.stem.endswith(".cloaked")


def expand_inputs(items: list[str]) -> tuple[list[Path], list[FileOutcome]]:
    """Files from paths, directories (their images) and globs; unmatched items as error outcomes.

    Directories and globs skip earlier outputs (``*.cloaked.*``) and files that do not look like images;
    files named explicitly are always tried.
    """
    files: list[Path] = []
    missing: list[FileOutcome] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _candidate(p))
            if not found:
                missing.append(
                    FileOutcome(item, error=f"{item}: no images in this directory", exit_code=EXIT_INPUT)
                )
            files += found
        elif path.exists():
            files.append(path)
        elif glob.has_magic(item):
            found = sorted(p for p in map(Path, glob.glob(item)) if _candidate(p))
            if not found:
                missing.append(FileOutcome(item, error=f"{item}: no image files match", exit_code=EXIT_INPUT))
            files += found
        else:
            missing.append(FileOutcome(item, error=f"{item}: no such file", exit_code=EXIT_INPUT))
    unique = list(dict.fromkeys(files))
    return unique, missing


def _candidate(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not _is_cloaked_output(path)


def wants_folder(output: str) -> bool:
    """``-o name/`` (or an existing folder) asks for a folder, even for one input."""
    return output.endswith(("/", "\\")) or Path(output).is_dir()


def output_folder(output: str | None, *, many: bool) -> Path | None:
    """The folder ``-o`` names, checked once for the whole run; None when ``-o`` names a file (or is
    absent, the outputs then going beside their inputs).

    A folder is one that exists or any name ending in ``/``; with several inputs ``-o`` must be a
    folder, and a new name is taken as one unless it ends like an image file (``-o one.png``, surely a
    mistake). A new folder is created (with its parents) when the first output is written: nothing is
    created here.
    """
    if output is None:
        return None
    target = Path(output)
    if wants_folder(output):
        if target.exists() and not target.is_dir():
            raise OutputPathError(f"{output}: {target} is a file, not a folder; name another folder")
    elif not many:
        return None
    elif target.exists():
        raise OutputPathError(f"{output}: with several inputs, -o must be a folder, and this is a file")
    elif target.suffix.lower() in IMAGE_SUFFIXES:
        raise OutputPathError(
            f"{output}: with several inputs, -o must be a folder, and this names an image file "
            f"(for a folder of that name, end it with /: -o {output}/)"
        )
    check_new_folder(target)
    return target


def output_path(source: Path, output: str | None, fmt: str | None, *, folder: Path | None) -> Path:
    """Where the cloak of ``source`` goes: beside it, into the ``-o`` folder, or at ``output``.

    The folder of a named output file must exist: a typo in it fails at once instead of writing the
    cloak somewhere unexpected (a name ending in ``/`` asks for a new folder).
    """
    default = default_output_path(source, fmt)
    if folder is not None:
        return folder / default.name
    return default if output is None else Path(output)


def plan_outputs(
    files: list[Path], output: str | None, fmt: str | None, *, many: bool
) -> tuple[dict[Path, Path], list[FileOutcome], list[str], dict[Path, list[str]]]:
    """Each input's output path, checked before any model is loaded or any step taken.

    Returns the plan, the inputs refused (as outcomes: an unreadable or oversized header, an output that
    would be the input or cannot be written), notes to print (a name whose suffix ``--format`` overrides)
    and each input's own notes (an input format that cannot be written, and the one written instead).
    An ``-o`` that cannot be used at all raises :class:`OutputPathError` once, not once per input.
    """
    folder = output_folder(output, many=many)
    planned: dict[Path, Path] = {}
    refused: list[FileOutcome] = []
    notes: list[str] = []
    file_notes: dict[Path, list[str]] = {}
    for source in files:
        try:
            source_format, _ = probe_image(source)
            destination = output_path(source, output, fmt, folder=folder)
            if folder is None or folder.exists():
                written_as = check_output_path(destination, input_path=source, fmt=fmt)
            else:  # a new folder: the input cannot be in it, and it is created at the first write
                written_as = path_format(destination, fmt)
        except ModelError:
            raise
        except UncnnError as exc:
            refused.append(FileOutcome(str(source), error=str(exc), exit_code=exc.exit_code))
            continue
        planned[source] = destination
        chose = fmt is not None or (output is not None and folder is None)  # the user named the format
        if not chose and normalise_source_format(source_format) != written_as:
            file_notes[source] = [
                f"{source_format} cannot be written; the cloak is written as {written_as} "
                f"({destination.name}; --format chooses another)"
            ]
    if output is not None and fmt is not None and folder is None and planned:
        suffix = Path(output).suffix
        if not _suffix_matches(output, fmt):
            why = f"its suffix {suffix!r} names no image format" if suffix else "its name has no suffix"
            notes.append(f"{output}: written as {fmt}, as --format asks ({why})")
    targets = list(planned.values())
    clashes = [p for p in targets if targets.count(p) > 1]
    if clashes:
        raise OutputPathError(f"several inputs would be written to {clashes[0]}; use separate runs")
    return planned, refused, notes, file_notes


def normalise_source_format(name: str) -> str:
    """Pillow's name of an input's format as :func:`output_format` compares it (``MPO`` is JPEG)."""
    try:
        return normalise_format(name)
    except UncnnError:
        return name


def _suffix_matches(path: str, fmt: str) -> bool:
    try:
        return path_format(path) == fmt
    except OutputPathError:
        return False


LOADER_THREAD: Final = "uncnn-rt model loader"
"""The name of the threads that open the models in the background (see :func:`loading_models`)."""


def loading_models() -> bool:
    """Whether a background thread is still opening a model.

    A process must not end through the interpreter's shutdown while one is: onnxruntime, in the middle
    of building a session, is torn down under the thread and aborts the process (SIGABRT, exit 134,
    ``terminate called without an active exception``) after the error line was printed. The entry
    point ends such a process at once instead, with the exit code the command chose
    (:func:`uncnn_rt.cli.app.main`)."""
    return any(t.name == LOADER_THREAD and t.is_alive() for t in threading.enumerate())


@dataclass
class _Models:
    """The recognizers, detector and target of a run.

    :meth:`start` opens them on background threads (the recognizers on one, the detector on another)
    while the first photo is decoded and prepared, so the first attack step comes sooner; :meth:`load`
    waits for them and raises what loading raised. A run whose every input fails to decode never
    waits: the threads are daemons, and an error exits at once.
    """

    names: list[str] | None
    device: str
    need_detector: bool
    target_photo: LoadedImage | None
    helper_names: list[str] | None = None
    recognizers: list[Any] = field(default_factory=list)
    helpers: list[Any] = field(default_factory=list)
    detector: cloaking.Detector | None = None
    target: dict[str, Any] | None = None
    loaded: bool = False
    _threads: list[threading.Thread] = field(default_factory=list)
    _errors: list[BaseException] = field(default_factory=list)

    def start(self) -> None:
        if self._threads or self.loaded:
            return
        jobs = [self._open_recognizers] + ([self._open_detector] if self.need_detector else [])
        self._threads = [
            threading.Thread(target=self._catching(job), name=LOADER_THREAD, daemon=True) for job in jobs
        ]
        for thread in self._threads:
            thread.start()

    def load(self) -> None:
        if self.loaded:
            return
        self.start()
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        if self.target_photo is not None:
            self.target = cloaking.target_embeddings(
                self.target_photo, [*self.recognizers, *self.helpers], self.detector
            )
        self.loaded = True

    def _catching(self, job: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                job()
            except BaseException as exc:  # handed to the main thread by load()
                self._errors.append(exc)

        return run

    def _open_recognizers(self) -> None:
        self.recognizers = cloaking.load_recognizers(self.names, device=self.device)
        if self.helper_names:
            self.helpers = cloaking.load_recognizers(self.helper_names, device=self.device)

    def _open_detector(self) -> None:
        self.detector = cloaking.load_detector(device=self.device)


def cloak(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="Image files, directories or globs.")],
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            metavar="PATH",
            help="Output file, or a folder: one that exists, or any name ending in / (created). With "
            "several inputs it must be a folder.",
        ),
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="Output format: jpg, png, webp, tif or bmp \\[default: the input's, or -o's suffix].",
        ),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="Strength: low, mid or high (see above).")
    ] = cloaking.DEFAULT_MODE,
    eps: Annotated[
        float | None, typer.Option(help="L-inf budget in grey levels (0..255), overriding the mode.")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Attack steps per face in the first pass, overriding the mode (each refinement round "
            "then takes at most as many)."
        ),
    ] = None,
    ssim_min: Annotated[
        float | None,
        typer.Option("--ssim-min", help="SSIM floor per face region, overriding the mode (0: none)."),
    ] = None,
    cap: Cap = None,
    coarse: Annotated[
        float | None,
        typer.Option(
            help="Grid step of the perturbation in canonical-crop pixels (the modes step per photo pixel; "
            "larger: smoother, cheaper in SSIM but more visible per grey level under FLIP)."
        ),
    ] = None,
    scatter: Scatter = None,
    aim: Aim = None,
    face: Annotated[
        int | None, typer.Option(help="Cloak only face N (1 = leftmost, as numbered in the report).")
    ] = None,
    largest: Annotated[bool, typer.Option("--largest", help="Cloak only the largest face.")] = False,
    no_align: Annotated[
        bool,
        typer.Option("--no-align", help="No face detection: treat the image's centred square as the face."),
    ] = False,
    target_identity: Annotated[
        Path | None,
        typer.Option(
            "--target-identity",
            metavar="PHOTO",
            help="Targeted cloak: make the faces match this photo's largest face.",
        ),
    ] = None,
    models: Models = None,
    helpers: Helpers = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report instead of tables.")] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the random draws: equal seeds, equal outputs \\[default: a fresh one per run, "
            "reported as seed in --json, so that a tracker cannot predict the cloak]."
        ),
    ] = None,
    keep_location: Annotated[
        bool, typer.Option("--keep-location", help="Keep GPS/location EXIF (stripped by default).")
    ] = False,
) -> None:
    options = global_options(ctx)
    device, quiet = options.device, options.quiet
    outcomes: list[FileOutcome] = []
    # Everything that can be checked without a model is checked first: options, every input's header,
    # every output path, so a run that can only fail fails at once instead of after the models
    # (seconds) or after a whole cloak (up to a minute). The models then open in the background while
    # the first photo is decoded; a photo that fails to decode does not wait for them.
    with clean_errors():
        if face is not None and face < 1:
            raise InputError(f"--face counts from 1, got {face}")
        settings = cloaking.settings_for(
            mode, eps=eps, steps=steps, ssim_min=ssim_min, coarse=coarse, cap=cap, scatter=scatter, aim=aim
        )
        if seed is not None:
            cloaking.check_seed(seed)
        out_format = None if fmt is None else normalise_format(fmt)
        names = split_models(models)
        helper_names = split_models(helpers, "--helpers")
        files, missing = expand_inputs(paths)
        outcomes += missing
        many = len(files) + len(missing) > 1
        planned, refused, notes, file_notes = plan_outputs(files, output, out_format, many=many)
        outcomes += refused
        target_photo = None if target_identity is None else load_image(target_identity)
    if not quiet and not as_json:
        for note in notes:
            typer.echo(f"note: {note}", err=True)
    if seed is None:
        seed = secrets.randbelow(2**31)
    runs = _Models(names, device, not no_align or target_identity is not None, target_photo, helper_names)
    todo = [f for f in files if f in planned]
    if todo:
        runs.start()
    console = Console(stderr=True)
    state = _RunState()
    try:
        with clean_errors(), progress_bar(console, hidden=quiet or not todo) as progress:
            task = progress.add_task("cloaking", total=len(todo), detail="")
            for source in todo:
                state.start(source, planned[source])
                outcome = _cloak_one(
                    source,
                    planned[source],
                    settings=settings,
                    face=None if face is None else face - 1,
                    largest=largest,
                    no_align=no_align,
                    seed=seed,
                    out_format=out_format,
                    keep_location=keep_location,
                    runs=runs,
                    on_progress=lambda p, name=source.name: progress.update(
                        task, detail=f"{name}: {p.label}, step {p.step}/{p.steps}"
                    ),
                    on_written=state.wrote,
                    notes=file_notes.get(source, []),
                )
                outcomes.append(outcome)
                state.finish()
                progress.advance(task)
    except KeyboardInterrupt:
        interrupted = state.interrupted(todo)
    else:
        interrupted = None
    order = {str(p): i for i, p in enumerate(files)}
    outcomes.sort(key=lambda o: order.get(o.input, -1))
    code = EXIT_INTERRUPTED if interrupted else worst_exit_code(o.exit_code for o in outcomes)
    recognizers = runs.recognizers if runs.loaded else []
    linkability = set_linkability([o.report for o in outcomes if o.report is not None], recognizers)
    if as_json:
        report: dict[str, Any] = {"files": [o.to_dict() for o in outcomes], "exit_code": code}
        if linkability is not None:
            report["set"] = linkability.to_dict()
        if interrupted is not None:
            report["interrupted"] = interrupted.to_dict()
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_outcomes(outcomes, quiet=quiet)
        if linkability is not None and not quiet:
            typer.echo(_set_line(linkability))
    if interrupted is not None:
        typer.echo(f"interrupted: {interrupted.describe()}", err=True)
    raise typer.Exit(code)


@dataclass
class Interrupted:
    """What a run stopped by Ctrl-C leaves: outputs written but never verified, inputs not cloaked."""

    unverified: list[tuple[Path, Path]]
    """(input, output) pairs: the file was written, but the run stopped before re-reading it."""
    not_cloaked: list[Path]

    def to_dict(self) -> dict[str, Any]:
        return {
            "unverified": [{"input": str(i), "output": str(o)} for i, o in self.unverified],
            "not_cloaked": [str(p) for p in self.not_cloaked],
        }

    def describe(self) -> str:
        parts = []
        for source, written in self.unverified:
            parts.append(f"{written} was written but not verified (it may not protect; cloak {source} again)")
        if self.not_cloaked:
            parts.append(f"not cloaked, nothing written: {', '.join(map(str, self.not_cloaked))}")
        done = "" if parts else "every output listed above was written and verified"
        return "; ".join(parts) or done


@dataclass
class _RunState:
    """Where a run is, so that an interruption can say what was written and what was not."""

    done: list[Path] = field(default_factory=list)
    current: Path | None = None
    destination: Path | None = None
    written: Path | None = None

    def start(self, source: Path, destination: Path) -> None:
        self.current, self.destination, self.written = source, destination, None

    def wrote(self, path: Path) -> None:
        self.written = path

    def finish(self) -> None:
        if self.current is not None:
            self.done.append(self.current)
        self.current = self.written = None

    def interrupted(self, todo: list[Path]) -> Interrupted:
        unverified = [] if self.current is None or self.written is None else [(self.current, self.written)]
        left = [p for p in todo if p not in self.done and not (unverified and p == self.current)]
        return Interrupted(unverified, left)


def _set_line(linkability: SetLinkability) -> str:
    """The set report of a run of several photos, taken as one person's (their largest faces)."""
    per = ", ".join(f"{name} {k}" for name, k in linkability.linked_pairs.items())
    return (
        f"set of {linkability.photos} photos (largest face of each, as one person's): "
        f"{linkability.linked_photos} still match another cloaked photo of the set under some model "
        f"(linked pairs of {linkability.pairs}: {per}); a tracker holding only these cloaks could group them"
    )


cloak.__doc__ = CLOAK_HELP


def _cloak_one(
    source: Path,
    destination: Path,
    *,
    settings: cloaking.CloakSettings,
    face: int | None,
    largest: bool,
    no_align: bool,
    seed: int,
    out_format: str | None,
    keep_location: bool,
    runs: _Models,
    on_progress: cloaking.CloakProgressCallback,
    on_written: Callable[[Path], None] = lambda path: None,
    notes: list[str] | None = None,
) -> FileOutcome:
    """Cloak, save and verify one file; an input error becomes the outcome (nothing is written then).

    ``on_written`` is called once the output file is in place, before its verification; ``notes`` are
    the planning's notes about this input, reported with the decoding's."""
    try:
        loaded = load_image(source)
        # The visibility cap holds on the pixels as the output file will store them.
        as_saved = lossy_round_trip(loaded, fmt=output_format(loaded, destination, out_format))
    except UncnnError as exc:
        return FileOutcome(str(source), error=str(exc), exit_code=exc.exit_code)
    runs.load()  # outside the per-file handling: a bad --models or a broken model concerns every input
    try:
        result = cloaking.cloak_image(
            loaded,
            recognizers=runs.recognizers,
            detector=runs.detector,
            mode=settings,
            face=face,
            largest=largest,
            no_align=no_align,
            target=runs.target,
            seed=seed,
            progress=on_progress,
            saved=as_saved,
            helpers=runs.helpers,
        )
        start = time.perf_counter()
        make_folder(destination.parent)  # a new -o folder (name/) is made at its first output
        written = save_image(
            result.image,
            loaded,
            destination,
            format=out_format,
            quality=result.output_quality,
            strip_location=not keep_location,
        )
        saving = time.perf_counter() - start
        on_written(written)
        report = verify(loaded, written, result, recognizers=runs.recognizers, detector=runs.detector)
    except ModelError:
        raise
    except UncnnError as exc:
        return FileOutcome(str(source), error=str(exc), exit_code=exc.exit_code)
    details = cloak_details(result, loaded, extra_seconds=saving)
    details["notes"] = [*(notes or ()), *details.get("notes", ())]
    details["visibility"] = visibility_details(result, loaded, load_image(written).rgb, report)
    code = EXIT_OK if report.protected else EXIT_NOT_PROTECTED
    outcome = FileOutcome(str(source), output=written, exit_code=code, report=report, details=details)
    if not report.protected:
        outcome.hint = not_protected_hint(report, result.settings, result)
    return outcome


BEFORE_AFTER_NOTE = (
    "before / after: each model's cosine similarity to the face's clean embedding{target}, of the original "
    "photo (before) and of the saved cloak (after), both cropped where the detector finds the face in the "
    "saved file. The cloak itself was made on the crop found in the original, so before is below 1 by the "
    "small shift between the two crops alone, and shows how much of the drop that shift explains.{aim}"
)
AIM_NOTE = (
    " aim (--aim others): the similarity after must be below to be PROTECTED, the level below which the "
    "person's other photos stop matching this one (the model's threshold over how close a person's photos "
    "come to one another, estimated on the dev set)."
)


def _print_outcomes(outcomes: list[FileOutcome], *, quiet: bool = False) -> None:
    out = Console()
    explained = False
    aimed = False
    said: set[str] = set()
    for outcome in outcomes:
        if outcome.error is not None:
            if outcome.error not in said:  # inputs refused for one reason (their folder): said once
                typer.echo(f"error: {outcome.error}", err=True)
                said.add(outcome.error)
            continue
        report = outcome.report
        assert report is not None
        if not quiet:
            for note in outcome.details.get("notes", ()):
                typer.echo(f"note: {outcome.input}: {note}", err=True)
        verdict = "PROTECTED" if report.protected else "NOT PROTECTED"
        # The title is printed as plain text rather than as the table's title, which rich would wrap to
        # the table's width, breaking file names in the middle.
        typer.echo(f"{outcome.input} -> {outcome.output}")
        table = Table(
            caption=(
                f"{verdict} · SSIM {report.ssim:.4f} · PSNR {_db(report.psnr)} · "
                f"{outcome.details['cloak_seconds']:.1f} s + verify {report.seconds:.1f} s · "
                f"{outcome.details['mode']}, eps {outcome.details['eps']:g}"
            ),
        )
        # The aim has a column of its own only where it is not the threshold (--aim others).
        aims = any(m.aim != m.threshold for face in report.faces for m in face.models)
        aimed = aimed or aims
        columns = ("face", "model", "before", "after", *(("aim",) if aims else ()), "threshold", "")
        for column in columns:
            table.add_column(column, justify="left" if column in ("face", "model", "") else "right")
        for face in report.faces:
            label = f"{face.number}" + ("" if face.redetected else " (not re-detected)")
            for i, m in enumerate(face.models):
                status = "[green]PROTECTED" if m.protected else "[red]NOT PROTECTED"
                threshold = "-" if m.threshold is None else f"{m.threshold:.3f}"
                aim = "-" if m.aim is None else f"{m.aim:.3f}"
                row = (f"{m.before:.3f}", f"{m.after:.3f}", *((aim,) if aims else ()), threshold, status)
                table.add_row(label if i == 0 else "", m.name, *row)
        out.print(table)
        past = "every aim" if outcome.details.get("aim") == "others" else "every threshold"
        for line in _visibility_lines(outcome.details.get("visibility"), past):
            typer.echo(line)  # not through rich, which would wrap it at the terminal's width
        if outcome.hint is not None:
            out.print(outcome.hint, markup=False, highlight=False)
        if not explained and not quiet:
            target = " (targeted: to the target's embedding)" if report.targeted else ""
            note = BEFORE_AFTER_NOTE.format(target=target, aim=AIM_NOTE if aimed else "")
            out.print(note, style="dim", markup=False, highlight=False)
            explained = True


def _visibility_lines(block: dict[str, Any] | None, past: str = "every threshold") -> list[str]:
    """One line per face: how visible the saved cloak is on the face region, against its cap, and the
    margin reached (``past``: what it is past)."""
    if not block:
        return []
    lines = []
    for name, face in block["faces"].items():
        cap = face.get("cap")
        limit = "" if cap is None else f" of at most {cap['flip']:.4f}"
        limit_de = "" if cap is None else f" of at most {cap['ciede2000_mean']:.2f}"
        what = "" if cap is None else f" (ceiling: {cap['of']})"
        times = face.get("times_reference")
        spent = (
            ""
            if times is None or cap is None
            else f"; {times['flip']:.2f}x the FLIP of the photo's own JPEG q{cap['reference_quality']}"
        )
        margin = face.get("margin")
        if face.get("stopped_by_ceiling"):
            reached = "; the ceiling stopped it short of its margin"
        elif face.get("short_of_margin"):
            reached = "; short of its margin after all its steps, below the ceiling (more --steps may help)"
        elif margin is not None and margin >= 0:
            reached = f"; {margin:.3f} past {past}"
        else:
            reached = ""
        lines.append(
            f"{name} visibility: FLIP {face['flip']:.4f}{limit}, CIEDE2000 mean {face['ciede2000_mean']:.2f}"
            f"{limit_de}{what}{spent}{reached}"
        )
    return lines


def not_protected_hint(
    report: VerifyReport, settings: cloaking.CloakSettings, result: cloaking.CloakResult | None = None
) -> str:
    """What a NOT PROTECTED verdict means and what to try: the faces and models that fell short, and the
    next stronger mode (in :data:`~uncnn_rt.runtime.cloak.MODES` order) with its visibility cap, or from
    the strongest mode a looser cap; with ``result``, what the suggestion costs in visibility on this
    photo (the FLIP it would allow on the faces that fell short, against what was used)."""
    by_models: dict[tuple[str, ...], list[int]] = {}
    for face in report.faces:
        models = tuple(m.name for m in face.models if not m.protected)
        if models:
            by_models.setdefault(models, []).append(face.number)
    faces = "; ".join(
        f"face{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))} ({', '.join(models)})"
        for models, numbers in by_models.items()
    )
    short = {n for numbers in by_models.values() for n in numbers}
    names = list(cloaking.MODES)
    base = settings.mode.split(" ")[0]
    if base in names and names.index(base) + 1 < len(names):
        stronger = cloaking.MODES[names[names.index(base) + 1]]
        advice = f"try --mode {stronger.mode} ({stronger.describe()})"
        cost = _cap_cost(result, short, stronger.cap_jpeg, stronger.cap_scale)
    else:
        scale = 1.5 * settings.cap_scale
        quality = settings.cap_jpeg or 75
        advice = (
            f"{settings.describe()} is the strongest mode; try a looser cap (--cap {scale:g}xjpeg{quality}, "
            f"more visible) with more steps (--steps {max(2 * settings.steps, settings.steps + 20)}), or "
            "cloak only the face that matters (--face N)"
        )
        cost = _cap_cost(result, short, quality, scale)
    return f"NOT PROTECTED: {faces} still matched; {advice}{cost}."


def _cap_cost(result: cloaking.CloakResult | None, faces: set[int], quality: int | None, scale: float) -> str:
    """``", allowing FLIP up to X where this run used Y"`` over ``faces``, when the suggested cap is a
    multiple of the cap this run held (the same JPEG quality); else nothing."""
    if result is None or quality is None:
        return ""
    rows = [
        f for f in result.faces if f.number in faces and f.limits is not None and f.visibility is not None
    ]
    if not rows or result.settings.cap_jpeg != quality:
        return ""
    allowed = max(scale * f.limits.reference.flip for f in rows)
    used = max(f.visibility.flip for f in rows if f.visibility is not None)
    return f", which allows face FLIP up to {allowed:.3f} where this cloak used {used:.3f}"


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f} dB"


def compare(
    ctx: typer.Context,
    first: Annotated[Path, typer.Argument(metavar="A", help="First photo.")],
    second: Annotated[Path, typer.Argument(metavar="B", help="Second photo.")],
    no_align: Annotated[
        bool, typer.Option("--no-align", help="No face detection: compare the images' centred squares.")
    ] = False,
    models: Models = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report instead of a table.")] = False,
) -> None:
    """Same person? Each recognizer's cosine similarity of the largest face in A and in B, against its
    match threshold, and a verdict (the majority of the models). Exit code 0 either way; 2 on an input
    error (e.g. no face found), 3 when a model is missing."""
    device = global_options(ctx).device
    with clean_errors():
        a, b = load_image(first), load_image(second)
        recognizers = cloaking.load_recognizers(split_models(models), device=device)
        detector = None if no_align else cloaking.load_detector(device=device)
        sims = compare_faces(a, b, recognizers=recognizers, detector=detector, no_align=no_align)
    matches = sum(s.match for s in sims)
    same = same_person(sims)
    verdict = f"{'same person' if same else 'different people'} ({matches} of {len(sims)} models match)"
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "a": str(first),
                    "b": str(second),
                    "same_person": same,
                    "models": [similarity_row(s) for s in sims],
                },
                indent=2,
            )
        )
        return
    typer.echo(f"{first} vs {second}")  # plain text: a table title would break file names mid-word
    table = Table(caption=verdict)
    for column in ("model", "similarity", "threshold", ""):
        table.add_column(column, justify="right" if column in ("similarity", "threshold") else "left")
    for s in sims:
        threshold = "-" if s.threshold is None else f"{s.threshold:.3f}"
        table.add_row(
            s.name, f"{s.similarity:.3f}", threshold, "[green]match" if s.match else "[red]no match"
        )
    Console().print(table)


def classify(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(metavar="IMG", help="Photo to classify.")],
    top: Annotated[int, typer.Option(help="How many classes to show.", min=1)] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The top ImageNet classes of IMG with the shipped classifier (EfficientNet-Lite0): the centred square
    of the photo resized to the classifier's input size."""
    device = global_options(ctx).device
    with clean_errors():
        loaded = load_image(image)
        entries = {e.name: e for e in catalog.load_manifest()}
        if CLASSIFIER not in entries:
            raise ModelError(
                f"the ImageNet classifier {CLASSIFIER} is not shipped in this installation "
                "(build the zoo: python -m uncnn_rt.converters.zoo build)"
            )
        session = open_session(entries[CLASSIFIER].path, device=device)
        ranked = classify_image(loaded.rgb, session, top=top)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "image": str(image),
                    "model": CLASSIFIER,
                    "top": class_rows(ranked),
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"{image} ({CLASSIFIER})")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for i, (label, p) in enumerate(ranked, 1):
        table.add_row(str(i), label, f"{100 * p:.1f}%")
    Console().print(table)
