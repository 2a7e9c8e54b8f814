"""The augmentation job as a Ray Data pipeline: the same per-image work as the local engine, scaled out.

::

    read_binary_files(pending sources)           Ray's file reader: bytes + path, spread over the cluster
      -> map_batches(_AugmentActor, ActorPoolStrategy(size=workers))
             each actor holds one onnxruntime session (opened once), decodes, attacks, encodes the PNG
             and writes it through pyarrow.fs (Ray Data's filesystem layer; atomic rename)
      -> rows stream back to the driver in input order, which appends them to OUT/manifest.jsonl

The per-image plan (ratio draw, eps, target, seed) is the one :mod:`.variants` derives from the seed and
the image's relative path, and each image is attacked alone, so a Ray run writes the same bytes as a
local run with the same settings.

**On a real cluster.** Every node must see ``DATA`` and ``OUT`` at the same path (a shared filesystem such
as NFS, EFS or a Lustre mount), and the worker nodes need ``uncnn-rt[cpu,ray]`` installed (or a
``runtime_env``). Start the job on the head node, or anywhere with ``--ray-address ray://HEAD:10001``
(``auto`` joins the cluster this machine belongs to); ``RAY_ADDRESS`` works too. Each actor asks Ray for
``threads`` CPUs, so ``--workers`` actors run at once when the cluster has that many CPUs free.

``ray`` is an optional extra (``pip install 'uncnn-rt[ray]'``) and is imported only here, lazily.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from uncnn_rt.runtime.jobs.parallel import WorkerSpec
from uncnn_rt.runtime.jobs.variants import AugmentConfig, Task, VariantOutcome, run_task
from uncnn_rt.runtime.sessions import open_session

BATCH: int = 4
"""Images per actor call."""


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        from uncnn_rt.runtime.errors import MissingExtraError

        raise MissingExtraError(
            "--engine ray needs Ray Data, which the [ray] extra installs: pip install 'uncnn-rt[ray]'"
        ) from exc
    return ray


class _AugmentActor:
    """One Ray actor: one onnxruntime session, used for every batch it is given."""

    def __init__(self, spec: WorkerSpec, config: AugmentConfig, out: str, tasks: dict[str, Task]) -> None:
        import pyarrow.fs

        self.session = open_session(spec.model, device=spec.device, intra_op_threads=spec.threads)
        self.config = config
        self.tasks = tasks
        self.fs, self.out = pyarrow.fs.FileSystem.from_uri(out)

    def __call__(self, batch: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        rows = []
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            task = self.tasks[os.path.normpath(str(path))]
            outcome = run_task(self.session, self.config, task, bytes(data))
            if outcome.row is not None and outcome.png is not None:
                self._write(outcome.row["path"], outcome.png)
            rows.append(json.dumps({"name": outcome.name, "row": outcome.row, "error": outcome.error}))
        return {"outcome": np.array(rows, dtype=object)}

    def _write(self, name: str, png: bytes) -> None:
        target = f"{self.out}/{name}"
        parent, _, base = target.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        temporary = f"{parent}/.{base}.{os.getpid()}.tmp"
        with self.fs.open_output_stream(temporary) as stream:
            stream.write(png)
        self.fs.move(temporary, target)  # a rename: readers never see a half-written file


def run_on_ray(
    spec: WorkerSpec,
    config: AugmentConfig,
    tasks: Iterable[Task],
    out: Path,
    *,
    workers: int,
    address: str | None = None,
) -> Iterator[VariantOutcome]:
    """Run ``tasks`` on Ray (joining ``address``, the running cluster or a new local one); yield the
    outcomes in task order. A cluster this call started is shut down at the end."""
    ray = _ray()
    pending = list(tasks)
    if not pending:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # manifest rows in input order, as locally
        context.enable_progress_bars = False
        by_path = {os.path.normpath(t.item.source): t for t in pending}
        # Reads take no CPU slot, so they never wait behind the actors that hold every CPU.
        dataset = ray.data.read_binary_files(
            [t.item.source for t in pending], include_paths=True, num_cpus=0
        ).map_batches(
            _AugmentActor,
            fn_constructor_kwargs={
                "spec": spec,
                "config": config,
                "out": str(out.resolve()),
                "tasks": by_path,
            },
            batch_size=BATCH,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=spec.threads,
        )
        for record in dataset.iter_rows():
            raw = json.loads(record["outcome"])
            yield VariantOutcome(raw["name"], row=raw["row"], error=raw["error"])
    finally:
        if started:
            ray.shutdown()


__all__ = ["run_on_ray"]
