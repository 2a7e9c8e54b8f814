"""``uncnn-rt convert``: turn a model into an attack graph (preprocessing, head, gradient; standard ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uncnn_rt.cli.errors import clean_errors
from uncnn_rt.cli.options import ChannelOrder, Kind, Layout, Resize
from uncnn_rt.converters.load import SOURCE_FORMATS, load_source
from uncnn_rt.runtime import contract as C
from uncnn_rt.runtime.errors import InputError, OutputPathError
from uncnn_rt.runtime.fileio import atomic_write_bytes, check_writable_folder

app = typer.Typer(
    help="Convert models into attack graphs that onnxruntime can differentiate.", no_args_is_help=True
)


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise InputError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise InputError(f"size must look like 112 or 112x96, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise InputError(f"size must be positive, got {text!r}")
    return h, w


def _infer_layout(model: object, input_name: str | None) -> tuple[str, tuple[int, int]]:
    """Guess layout and native size from a 4-D image input: a dimension of 3 marks the channels."""
    import onnx

    assert isinstance(model, onnx.ModelProto)
    inits = {i.name for i in model.graph.initializer}
    inputs = [
        i for i in model.graph.input if i.name not in inits and (input_name is None or i.name == input_name)
    ]
    if len(inputs) != 1:
        raise InputError(f"cannot tell the image input among {[i.name for i in inputs]}; pass --input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[1] == 3 and dims[2] and dims[3]:
        return "NCHW", (int(dims[2]), int(dims[3]))
    if len(dims) == 4 and dims[3] == 3 and dims[1] and dims[2]:
        return "NHWC", (int(dims[1]), int(dims[2]))
    raise InputError(f"input {inputs[0].name!r} has shape {dims}; pass --layout and --native-size")


def quiet_frameworks(verbose: bool) -> None:
    """Keep onnxruntime's, TensorFlow's and tf2onnx's own log lines (coloured, multi-line, often about
    conditions that are handled) off the terminal unless asked: the command says what matters itself."""
    import logging
    import os

    import onnxruntime as ort

    ort.set_default_logger_severity(2 if verbose else 4)  # 2: warnings and errors; 4: fatal only
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tf2onnx", "tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def _output_path(model_path: Path, output: Path | None) -> Path:
    """Where the attack graph goes (``MODEL.attack.onnx`` by default), refused before any work when it
    is the input, a folder, or in a folder that is missing or cannot be written."""
    stem = model_path.name if model_path.is_dir() else model_path.name.rsplit(".", 1)[0]
    out = output or model_path.with_name(stem + ".attack.onnx")
    if out.resolve() == model_path.resolve():
        raise InputError(f"refusing to overwrite the input {model_path}; choose another --output")
    if out.is_dir():
        raise OutputPathError(f"{out}: is a directory, expected the attack graph's file path")
    check_writable_folder(out.parent)
    return out


@app.command("grad")
def grad(
    model_path: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL",
            exists=True,
            readable=True,
            help=f"Source model (image in, embedding or logits out): {SOURCE_FORMATS}.",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o", "--output", help="Where to write the attack graph \\[default: MODEL.attack.onnx]."
        ),
    ] = None,
    kind: Annotated[
        Kind, typer.Option(help="face (L2-normalised embedding) or classifier (log-softmax).")
    ] = Kind("face"),
    name: Annotated[
        str | None, typer.Option(help="Model name stored in the metadata \\[default: file stem].")
    ] = None,
    canonical_size: Annotated[
        int | None, typer.Option(help="Side S of the image input \\[default: native height].")
    ] = None,
    native_size: Annotated[
        str | None, typer.Option(help="Model input size, HxW \\[default: from the model].")
    ] = None,
    layout: Annotated[Layout | None, typer.Option(help="NCHW or NHWC \\[default: from the model].")] = None,
    channel_order: Annotated[
        ChannelOrder, typer.Option(help="RGB or BGR, as the model expects.")
    ] = ChannelOrder("RGB"),
    mean: Annotated[str, typer.Option(help="Per-channel mean in 0..255 units, one value or three.")] = "0",
    std: Annotated[str, typer.Option(help="Per-channel std in 0..255 units, one value or three.")] = "1",
    crop: Annotated[
        str,
        typer.Option(
            help="Window of the canonical crop fed to the model: top,left,bottom,right as fractions."
        ),
    ] = "0,0,1,1",
    resize: Annotated[
        Resize, typer.Option(help="bilinear or area (box filter, for large downscales).")
    ] = Resize("bilinear"),
    threshold: Annotated[float | None, typer.Option(help="Cosine match threshold (face models).")] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Text file with one class label per line (classifiers)."
        ),
    ] = None,
    outputs: Annotated[
        str | None, typer.Option(help="What the model outputs: embedding, logits or probabilities.")
    ] = None,
    input_name: Annotated[
        str | None, typer.Option("--input", help="Image input name, if the model has several.")
    ] = None,
    output_name: Annotated[
        str | None, typer.Option("--output-name", help="Output to use, if several.")
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(
            help="Input shape with batch, e.g. 1,3,112,112 (TorchScript, Keras models without a fixed shape)."
        ),
    ] = None,
    validate: Annotated[
        bool, typer.Option(help="Check features against the source and grad against finite differences.")
    ] = True,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", help="Show the log lines of onnxruntime, TensorFlow and tf2onnx (hidden by default)."
        ),
    ] = False,
) -> None:
    """Build the attack graph of a model: folded preprocessing, head, objective and d objective/d image.

    Inputs: image \\[N,S,S,3] (RGB 0..255) and reference \\[N,D]. Outputs: features, objective, grad.

    Standard ONNX only, so stock onnxruntime runs it on any execution provider.
    """
    with clean_errors():
        out = _output_path(model_path, output)  # checked before the conversion, which takes a while
        quiet_frameworks(verbose)
        from uncnn_rt.converters.attack_graph import build_attack_graph
        from uncnn_rt.converters.validate import validate_attack_graph

        shape = (
            tuple(int(v) for v in _floats(input_shape, input_shape.count(",") + 1, "--input-shape"))
            if input_shape
            else None
        )
        source = load_source(model_path, shape)
        guessed_layout, guessed_size = (
            (None, None) if (layout and native_size) else _infer_layout(source, input_name)
        )
        lay = layout.value if layout else guessed_layout
        size_hw = _size(native_size) if native_size else guessed_size
        assert size_hw is not None
        window = _floats(crop, 4, "--crop")
        pre = C.Preprocessing(
            native_size=size_hw,
            layout=lay,  # type: ignore[arg-type]
            channel_order=channel_order.value,  # type: ignore[arg-type]
            mean=_floats(mean, 3, "--mean"),
            std=_floats(std, 3, "--std"),  # type: ignore[arg-type]
            crop=window,
            resize=resize.value,  # type: ignore[arg-type]
        )
        label_list = labels.read_text(encoding="utf-8").splitlines() if labels else None
        notes: list[str] = []
        attack = build_attack_graph(
            source,
            kind=kind.value,
            preprocessing=pre,  # type: ignore[arg-type]
            canonical_size=canonical_size or size_hw[0],
            name=name or model_path.name.split(".")[0],
            threshold=threshold,
            labels=label_list,
            input_name=input_name,
            output_name=output_name,
            outputs=outputs,  # type: ignore[arg-type]
            notes=notes,
        )
        for note in notes:
            typer.echo(f"note: {note}", err=True)
        if validate:
            report = validate_attack_graph(attack, source, outputs=outputs)
            typer.echo(f"validation: {report.describe()}")
            if not report.ok:
                raise InputError("validation failed: the attack graph does not match its source model")
        atomic_write_bytes(out, attack.SerializeToString())
        typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
