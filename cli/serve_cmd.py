"""``uncnn-rt serve``: the HTTP service and its page (FastAPI + uvicorn, from the ``[serve]`` extra).

fastapi and uvicorn are imported only when the command runs, so the rest of the CLI works without them.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Annotated

import typer

from uncnn_rt.cli.errors import clean_errors
from uncnn_rt.cli.exit_codes import EXIT_INPUT

SERVE_HELP = "\n\n".join(
    [
        "Run the cloaking service: an HTTP API and a page to drop a photo on.",
        "Open the server's address (HOST:PORT, path /) in a browser: pick or drop a photo, choose the "
        "mode, watch the progress, "
        "compare before and after with each recognizer's similarity and the PROTECTED verdict, and "
        "download the result. The API is described at /docs (and /openapi.json): POST /v1/cloak, "
        "/v1/compare and /v1/classify take multipart uploads; GET /v1/models and /healthz.",
        "Privacy: uploads are processed in memory and never written to disk or logged; nothing is sent "
        "anywhere else (no telemetry, no external resources on the page). No access log unless "
        "--access-log.",
        "Under load: each worker process computes at most --max-concurrency requests at once and lets "
        "--queue more wait; beyond that it answers 503 with Retry-After. Bodies are read before a request "
        "takes one of those slots (at most 2 x (max-concurrency + queue) at once); an upload that sends "
        "nothing for --read-timeout seconds is answered 408. A request that takes longer than "
        "--timeout seconds (waiting included), or whose client disconnects, is stopped at its next attack "
        "step. Each image is limited to --max-upload-mb bytes (413) and --max-megapixels pixels, read from "
        "its header before decoding (413: decompression bombs); a cloak attacks at most --max-faces faces "
        "(422 beyond, unless face= or largest= picks one). On SIGINT or SIGTERM the server stops "
        "accepting connections and lets the requests in flight finish, for at most --grace seconds.",
        "Models: over HTTP the models field takes only the shipped recognizers' names and the graphs "
        "given to --models here (by their name or the text given); any other value is 422.",
        "Sizing: one cloak keeps every core busy (onnxruntime runs each model on all of them), so on a "
        "small server --max-concurrency 1 gives the best throughput. Each worker process (--workers) "
        "loads its own copy of the models and has its own queue (a process is about 250 MB resident when "
        "idle).",
        "Needs the serve extra: pip install 'uncnn-rt\\[serve]'.",
    ]
)


def _require_extra() -> None:
    """One clean line instead of a traceback when fastapi, uvicorn or python-multipart is missing."""
    for module, *other_names in (("fastapi",), ("uvicorn",), ("python_multipart", "multipart")):
        if not any(importlib.util.find_spec(name) for name in (module, *other_names)):
            typer.echo(
                f"error: uncnn-rt serve needs the [serve] extra ({module} is not installed): "
                "pip install 'uncnn-rt[serve]'",
                err=True,
            )
            raise typer.Exit(EXIT_INPUT) from None


def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface, e.g. in a container).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    workers: Annotated[
        int, typer.Option(help="Worker processes; each loads the models and has its own queue.", min=1)
    ] = 1,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", help="Requests computed at once per worker process.", min=1)
    ] = 1,
    queue: Annotated[
        int | None,
        typer.Option(
            help="Requests that may wait for a free slot, per worker process, before 503 "
            "\\[default: 4 x --max-concurrency].",
            min=0,
        ),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest image file accepted, in MB.", min=0.001)
    ] = 20.0,
    max_megapixels: Annotated[
        float,
        typer.Option(
            "--max-megapixels", help="Largest image accepted, in megapixels (read from its header).", min=0.01
        ),
    ] = 24.0,
    timeout: Annotated[
        float, typer.Option(help="Seconds a request may take, waiting in the queue included.", min=1)
    ] = 120.0,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout", help="Seconds an upload may send nothing before it is answered 408.", min=0.1
        ),
    ] = 10.0,
    max_faces: Annotated[
        int,
        typer.Option(
            "--max-faces",
            help="Most faces one cloak attacks; more is 422 unless the request picks a face.",
            min=1,
        ),
    ] = 20,
    grace: Annotated[
        float | None,
        typer.Option(help="Seconds given to requests in flight on shutdown \\[default: --timeout].", min=0),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Execution device: cpu, cuda, auto or a provider name \\[default: the global --device]."
        ),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated recognizers cloaks use: shipped names, or paths of face attack graphs; "
            "clients may name these and the shipped ones \\[default: the shipped default ensemble]."
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log one line per request (method, path, status, client).")
    ] = False,
) -> None:
    _require_extra()
    import uvicorn

    from uncnn_rt import serve as server
    from uncnn_rt.runtime.cloak.report import split_models

    chosen_device = device or getattr(ctx.obj, "device", "auto")
    with clean_errors():
        names = split_models(models)
        config = server.ServeConfig(
            device=chosen_device,
            models=None if names is None else tuple(names),
            max_concurrency=max_concurrency,
            queue=queue,
            max_upload_mb=max_upload_mb,
            max_megapixels=max_megapixels,
            timeout=timeout,
            read_timeout=read_timeout,
            max_faces=max_faces,
        )
        # Load once here: a missing model or a bad device is one line and exit code 3 or 2, not a
        # traceback from a worker; with one worker process these are the sessions it serves with.
        loaded = server.load_models(config)
    options = {
        "host": host,
        "port": port,
        "timeout_graceful_shutdown": int(timeout if grace is None else grace),
        "access_log": access_log,
        # Connections beyond this get uvicorn's own 503, before any byte of their body is read.
        "limit_concurrency": 16 * (max_concurrency + config.queue_size) + 64,
        "server_header": False,
    }
    typer.echo(f"uncnn-rt serving on http://{host}:{port}/ (API docs at /docs)", err=True)
    if workers == 1:
        uvicorn.run(server.create_app(config, models=loaded), **options)
    else:
        os.environ[server.CONFIG_ENV] = config.to_json()
        uvicorn.run(
            "uncnn_rt.serve.app:app_from_environment",
            factory=True,
            workers=workers,
            **options,
        )


serve.__doc__ = SERVE_HELP
