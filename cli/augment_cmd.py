"""``uncnn-rt augment`` and ``uncnn-rt robustness``: adversarial data for training, and robust accuracy.

Both take an attack graph (or a shipped model's name). A plain ONNX classifier is not converted on the
fly: its preprocessing (mean, std, layout, labels) cannot be guessed safely, so the commands stop with
the exact ``uncnn-rt convert grad`` line to run once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from uncnn_rt.cli.errors import clean_errors
from uncnn_rt.cli.exit_codes import EXIT_INPUT
from uncnn_rt.cli.options import Attack, Engine, global_options
from uncnn_rt.cli.progress import progress_bar
from uncnn_rt.runtime import catalog, contract
from uncnn_rt.runtime.errors import InputError, ModelError
from uncnn_rt.runtime.fileio import atomic_write_bytes, check_new_file, make_folder
from uncnn_rt.runtime.jobs import augment as aug
from uncnn_rt.runtime.jobs import datasets, variants
from uncnn_rt.runtime.jobs import robustness as rob

MODEL_HELP = (
    "Attack graph (.onnx from `uncnn-rt convert grad`) or a shipped model's name, e.g. efficientnet_lite0. "
    "A plain ONNX model is refused with the convert command to run first."
)
DATA_HELP = (
    "ImageFolder directory (DATA/<class>/<image>; the class is a label of the model or a class index) "
    "or a CSV with a header 'path,label' (paths relative to the CSV's folder)."
)


def attack_graph(model: str) -> Path:
    """The attack graph MODEL names, or a :class:`ModelError` that says how to make one from plain ONNX."""
    path = catalog.resolve_model(model)
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise their own errors for a file that is not ONNX
        raise ModelError(f"{model}: not a readable ONNX model ({exc})") from exc
    keys = {p.key for p in proto.metadata_props}
    if contract.META_KIND not in keys:
        stem = path.name.rsplit(".", 1)[0]
        raise ModelError(
            f"{model} is a plain ONNX model, not an attack graph; convert it once, stating its "
            f"preprocessing, then pass the result: uncnn-rt convert grad {model} --kind classifier "
            f"--mean M --std S [--labels labels.txt] -o {stem}.attack.onnx"
        )
    return path


def _print_errors(errors: list[tuple[str, str]]) -> None:
    """One ``error:`` line per image that could not be processed (the message names the image)."""
    for name, message in errors:
        typer.echo(f"error: {message}" if message.startswith(name) else f"error: {name}: {message}", err=True)


def _workers(value: int | None) -> int:
    return value if value is not None else max(1, os.cpu_count() or 1)


AUGMENT_HELP = (
    "Write adversarial variants of a data set for robust training, with a manifest.\n\n"
    "For each image of DATA (drawn with probability --ratio) an untargeted or targeted L-inf attack "
    "against MODEL is written as OUT/<same relative path>.png (lossless, so the saved pixels are the "
    "attacked ones), and a row is appended to OUT/manifest.jsonl: path, source, label, attack, eps, "
    "success, confidence_before/after (probability of the true class; for face models the cosine to the "
    "clean embedding), predicted_before/after, linf. Mix them into training by reading the manifest, "
    "e.g. pandas.read_json('OUT/manifest.jsonl', lines=True); OUT is itself an ImageFolder.\n\n"
    "Images keep their size: the perturbation is computed at native resolution while the model sees "
    "the centred square resized exactly to its input (the view of `uncnn-rt classify`); pixels outside "
    "that square are left unchanged.\n\n"
    "Deterministic: every per-image draw (ratio, eps within a range, target class, random start) comes "
    "from the seed and the image's relative path, so --workers and --engine do not change a byte of "
    "the output. Resumable: rerunning the same command skips finished images; other settings into the "
    "same OUT are refused. Streaming: the data set is listed folder by folder.\n\n"
    "--engine ray runs the same job as a Ray Data pipeline (an actor pool of onnxruntime sessions); "
    "see --ray-address for a real cluster (DATA and OUT must then be on a filesystem every node mounts "
    "at the same path).\n\n"
    "Exit codes: 0 done; 2 bad input, or some images could not be read (listed, not in the manifest; "
    "a rerun retries them); 3 a model that is missing, plain ONNX or breaks the contract."
)


def augment(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    data: Annotated[Path, typer.Argument(metavar="DATA", help=DATA_HELP)],
    output: Annotated[
        Path, typer.Option("-o", "--output", metavar="OUT", help="Output folder (created; resumable).")
    ],
    attack: Annotated[
        Attack, typer.Option(help="fgsm, bim (I-FGSM), pgd (random start) or mifgsm (momentum).")
    ] = Attack("pgd"),
    eps: Annotated[
        str,
        typer.Option(help="L-inf budget in grey levels (0..255): a value, or LOW:HIGH drawn per image."),
    ] = "8",
    steps: Annotated[int, typer.Option(min=1, help="Iterations (fgsm: 1).")] = 10,
    step_size: Annotated[
        float | None, typer.Option(help="Step size in grey levels \\[default: the attack's].")
    ] = None,
    targeted: Annotated[
        bool,
        typer.Option("--targeted", help="Move each image towards a target class (classifiers only)."),
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(help="Target class (label or index) \\[default: a random other class per image]."),
    ] = None,
    ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of the images that get a variant.")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of every per-image draw.")] = 0,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Worker processes or Ray actors, one session each \\[default: CPU cores]."),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads per worker.")] = 1,
    engine: Annotated[Engine, typer.Option(help="local (process pool) or ray (Ray Data pipeline).")] = Engine(
        "local"
    ),
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join: auto, or ray://HEAD:10001 \\[default: RAY_ADDRESS, else a new "
            "local Ray]."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON.")] = False,
) -> None:
    options = global_options(ctx)
    device, quiet = options.device, options.quiet
    console = Console(stderr=True)
    with clean_errors():
        if not data.exists():
            raise InputError(f"{data}: no such file or folder")
        config = variants.AugmentConfig(
            attack=attack.value,
            eps=variants.parse_eps(eps),
            steps=steps,
            step_size=step_size,
            targeted=targeted,
            target=target,
            ratio=ratio,
            seed=seed,
            threads=threads,
        )
        path = attack_graph(model)
        total = datasets.count_items(data)
        with progress_bar(console, hidden=quiet) as progress:
            task = progress.add_task("augmenting", total=total, detail="")

            def tick(name: str, status: str) -> None:
                progress.update(task, advance=1, detail=f"{status}: {name}")

            summary = aug.augment(
                path,
                data,
                output,
                config,
                workers=_workers(workers),
                engine="ray" if engine.value == "ray" else "local",
                device=device,
                ray_address=ray_address,
                progress=tick,
            )
    _print_errors(summary.errors)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        rate = summary.success_rate
        typer.echo(
            f"wrote {summary.written} of {summary.total} images to {summary.out} "
            f"({summary.already_done} already done, {summary.not_selected} not drawn by --ratio, "
            f"{len(summary.errors)} unreadable); attack success "
            f"{'-' if rate is None else f'{100 * rate:.1f}%'}; manifest {summary.out / aug.MANIFEST}"
        )
    if summary.errors:
        raise typer.Exit(EXIT_INPUT)


augment.__doc__ = AUGMENT_HELP


def robustness(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(metavar="MODEL", help=MODEL_HELP + " Classifiers only.")],
    data: Annotated[Path, typer.Argument(metavar="DATA", help=DATA_HELP + " Labels are required.")],
    attacks: Annotated[
        str,
        typer.Option(
            help="Comma-separated attacks: fgsm, bim, pgd, mifgsm (fixed steps); autoattack (Croce & Hein's "
            "standard ensemble: apgd-ce, apgd-t, fab-t, square; the report says which broke each image), "
            "autoattack-plus; or one of apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square alone."
        ),
    ] = "fgsm,pgd",
    eps: Annotated[
        str, typer.Option(help="Comma-separated budgets in grey levels (0..255); 0 is the clean accuracy.")
    ] = "0,1,2,4,8",
    steps: Annotated[int, typer.Option(min=1, help="Iterations of the iterative attacks.")] = 10,
    step_size: Annotated[
        float | None, typer.Option(help="Step size in grey levels \\[default: each attack's].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random starts.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Measure only the first N images.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes, one session each \\[default: CPU cores].")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads per worker.")] = 1,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", metavar="OUT", help="Write the JSON report to OUT ('-': print it, no table)."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            metavar="PNG", help="Write the accuracy-vs-eps curve to PNG (needs the \\[plot] extra)."
        ),
    ] = None,
) -> None:
    """Accuracy of a classifier under attack over a range of eps: a table, JSON and a PNG curve.

    Each labelled image of DATA is attacked (untargeted, against its own label, on 8-bit pixels, through
    the same view of the image as `augment`) at each eps, and counts as correct when the model still
    predicts its label; an image misclassified clean counts as wrong at every eps, and eps 0 is the
    clean accuracy. --attacks autoattack reports RobustBench-style robust accuracy (Croce & Hein's
    ensemble, each attack on the images the ones before it left robust) and which attack broke how
    many images at each eps. Exit codes: 0 measured; 2 bad input (unlabelled or unreadable images are listed);
    3 a model that is missing, plain ONNX, not a classifier's or breaks the contract.
    """
    options = global_options(ctx)
    device, quiet = options.device, options.quiet
    console = Console(stderr=True)
    with clean_errors():
        if not data.exists():
            raise InputError(f"{data}: no such file or folder")
        config = rob.RobustnessConfig(
            attacks=tuple(a.strip() for a in attacks.split(",") if a.strip()),
            eps=rob.parse_eps_list(eps),
            steps=steps,
            step_size=step_size,
            seed=seed,
            threads=threads,
            limit=limit,
        )
        if plot is not None:
            from uncnn_rt.runtime.plotting import require_matplotlib

            require_matplotlib()  # fail before the attacks, not after them
        for written in (None if json_out is None or str(json_out) == "-" else json_out, plot):
            if written is not None:
                check_new_file(written)  # an unwritable report fails now, not after all the measuring
        path = attack_graph(model)
        total = datasets.count_items(data)
        total = total if limit is None else min(total, limit)
        with progress_bar(console, hidden=quiet) as progress:
            task = progress.add_task("attacking", total=total, detail="")
            report = rob.measure_robustness(
                path,
                data,
                config,
                workers=_workers(workers),
                device=device,
                progress=lambda name: progress.update(task, advance=1, detail=name),
            )
        payload = report.to_dict()
        if json_out is not None and str(json_out) != "-":
            make_folder(json_out.parent)
            atomic_write_bytes(json_out, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
        if plot is not None:
            make_folder(plot.parent)
            rob.plot_robustness(report, plot)
    _print_errors(report.errors)
    if json_out is not None and str(json_out) == "-":
        typer.echo(json.dumps(payload, indent=2))
    else:
        _print_table(report)
        for written in (json_out, plot):
            if written is not None:
                typer.echo(f"wrote {written}")
    if report.errors:
        raise typer.Exit(EXIT_INPUT)


def _print_table(report: rob.RobustnessReport) -> None:
    table = Table(
        title=f"{report.model} on {report.data}: accuracy (%) under attack, {report.images} images",
        caption=f"clean accuracy {_pct(report.clean_accuracy)}; eps in grey levels (0..255)",
    )
    table.add_column("attack")
    for e in report.config.eps:
        table.add_column(f"eps {e:g}", justify="right")
    for attack, accuracy in rob.accuracy_rows(report):
        steps = "" if attack == "fgsm" or rob.is_autoattack(attack) else f" ({report.config.steps} steps)"
        table.add_row(attack + steps, *(_pct(a) for a in accuracy))
    Console().print(table)
    for attack, per_eps in report.broken_by.items():
        for eps, counts in zip(report.config.eps, per_eps, strict=True):
            if counts:
                broke = ", ".join(f"{name} {count}" for name, count in counts.items())
                typer.echo(f"{attack} at eps {eps:g}: images broken by {broke}")


def _pct(value: Any) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"
