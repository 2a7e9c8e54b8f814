"""Throughput of ``uncnn_rt.augment`` on this machine: images per second, local with 1 and 2 workers,
and on a local Ray cluster, for a shipped model. Prints figures; asserts nothing.

The data set is a flat folder of ``--images`` 224 x 224 photos (centre crops of scikit-image's sample
photos, cycled; unlabelled, so each image is attacked away from the model's own top class) and the
model is the shipped EfficientNet-Lite0 classifier at its input size. Every engine runs the same job
(PGD, ``--steps`` steps, eps 4, one onnxruntime thread per worker) into its own output folder, and the
outputs are compared byte for byte. Per engine it reports the wall time of the whole ``augment`` call
(worker start-up and model loading included: what a user waits for), images per second, and CPU
seconds of this process and its children against wall seconds (near ``workers`` when the cores were
ours; lower when other work shared the machine; not measurable for Ray, whose actors are the raylet's).
Ray's own cluster start (``ray.init``) is timed apart, since a real cluster is already running.

Usage::

    .venv/bin/python bench/augment_throughput.py                 # 24 images, PGD 3 steps
    .venv/bin/python bench/augment_throughput.py --images 48 --steps 5 --no-ray
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from uncnn_rt.augment import AugmentConfig, augment
from uncnn_rt.runtime import catalog

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry")


def make_folder(root: Path, count: int) -> None:
    from skimage import data

    root.mkdir(parents=True)
    for i in range(count):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        h, w = photo.shape[:2]
        side = min(h, w)
        crop = photo[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        image = Image.fromarray(crop).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
        image.save(root / f"{i:03d}_{PHOTOS[i % len(PHOTOS)]}.png")


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(label: str, model: Path, data: Path, out: Path, config: AugmentConfig, **kwargs: object) -> Path:
    cpu, start = cpu_seconds(), time.perf_counter()
    summary = augment(model, data, out, config, **kwargs)  # type: ignore[arg-type]
    wall = time.perf_counter() - start
    used = cpu_seconds() - cpu
    # Ray's actors are the raylet's children, not ours: their CPU time is not visible here.
    load = "n/a " if kwargs.get("engine") == "ray" else f"{used / wall:4.2f}"
    print(
        f"{label:<18} {summary.written:>4} images  {wall:7.1f} s  {summary.written / wall:6.2f} img/s  "
        f"cpu/wall {load}  success {100 * (summary.success_rate or 0):.0f}%"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="Skip the Ray engine.")
    args = parser.parse_args()
    model = catalog.get_model(args.model).path
    config = AugmentConfig(attack="pgd", eps=(4.0, 4.0), steps=args.steps, threads=1)
    work = Path(tempfile.mkdtemp(prefix="uncnn-augment-bench-"))
    try:
        data = work / "data"
        make_folder(data, args.images)
        print(
            f"{args.model}, {args.images} images 224x224, PGD {args.steps} steps, 1 onnxruntime thread/worker"
        )
        outputs = [
            run("local, 1 worker", model, data, work / "w1", config, workers=1),
            run("local, 2 workers", model, data, work / "w2", config, workers=2),
        ]
        if not args.no_ray:
            import ray

            start = time.perf_counter()
            ray.init(
                num_cpus=2,
                object_store_memory=200 * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            print(f"(ray.init of a local 2-CPU cluster: {time.perf_counter() - start:.1f} s, not counted)")
            try:
                outputs.append(
                    run("ray, 2 actors", model, data, work / "ray", config, workers=2, engine="ray")
                )
            finally:
                ray.shutdown()
        reference = outputs[0]
        names = sorted(p.relative_to(reference) for p in reference.rglob("*.png"))
        same = all(
            (other / n).read_bytes() == (reference / n).read_bytes() for other in outputs[1:] for n in names
        )
        print(f"outputs byte-identical across engines: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
