"""One PGD step on each shipped recognizer: onnxruntime (the attack graph) vs PyTorch autograd (onnx2torch).

Both sides compute the same function: the torch model is the attack graph's own forward part
(``image``, ``reference`` -> ``objective``, cut out with ``onnx.utils.Extractor``) converted with
onnx2torch, so preprocessing and head are identical; the table shows the relative L2 error between the
two gradients to prove it. One step is: forward + gradient of the objective, then
``delta <- clip(delta - alpha * sign(g))`` and the pixel-range clip, at batch sizes 1 and 8, on the CPU
with the same thread count on both sides. Each figure is the median of ``--repeats`` timed steps after
warm-up, the two sides alternating in blocks of 5 so that both see the same machine load, in one run.

Setup (once). onnx2torch needs a torchvision that matches torch, which the project venv lacks, so the
bench has its own venv (the torch wheels come from the local wheel mirror)::

    python -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx2torch onnxruntime onnx \
        numpy pillow
    .venv-bench/bin/pip install -e . --no-deps

Run::

    .venv-bench/bin/python bench/attack_step.py                      # every face model in the manifest
    .venv-bench/bin/python bench/attack_step.py --model a.onnx ...   # any attack graphs
    .venv-bench/bin/python bench/attack_step.py --synthetic          # a built 112-px CNN, no zoo needed

Before/after (no torch needed, the project venv will do): ``--baseline REV`` times the onnxruntime step
alone, on each graph with its gradient built by the autodiff of git revision ``REV``, by this tree, and
by this tree without its layout pass (``bench/gradient_versions.py``), side by side in one run::

    .venv/bin/python bench/attack_step.py --synthetic --baseline HEAD~3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
from onnx import numpy_helper

from uncnn_rt.runtime import catalog, contract
from uncnn_rt.runtime.sessions import AttackSession

EPS, ALPHA = 8.0, 1.0
# onnxruntime's idle threads spin here as torch's OpenMP threads do: the steps are back to back, and a
# side that yields its cores between steps while the other spins would pay for the other's spinning.
# (The attack runtime turns spinning off: there numpy work runs between steps.)
SPIN = True


def median_ms(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 3, block: int = 5
) -> dict[str, float]:
    """Median wall time per call of each step over ``repeats`` timed calls.

    The sides alternate in blocks of ``block`` timed calls, so that both see the same machine load
    over the run; each block starts with one untimed call, which absorbs the other side's threads
    still spinning down and its evicted caches (alternating call by call, each side paid for those).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    while any(len(t) < repeats for t in times.values()):
        for name, step in steps.items():
            step()
            for _ in range(min(block, repeats - len(times[name]))):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(t) for name, t in times.items()}


def forward_model(path: Path) -> onnx.ModelProto:
    """The attack graph's forward part: image, reference -> objective (the gradient nodes cut away).

    PRelu slopes shaped ``[1, C, 1, 1]`` are reshaped to ``[C, 1, 1]`` (the same values, broadcast the
    same way): onnx2torch runs ``torch.nn.functional.prelu`` only for the latter and otherwise a masked
    copy several times slower, which would flatter onnxruntime.
    """
    model = onnx.load(str(path))
    extractor = onnx.utils.Extractor(model)
    forward = extractor.extract_model(
        [contract.INPUT_IMAGE, contract.INPUT_REFERENCE], [contract.OUTPUT_OBJECTIVE]
    )
    slopes = {n.input[1] for n in forward.graph.node if n.op_type == "PRelu"}
    for init in forward.graph.initializer:
        if init.name in slopes and len(init.dims) == 4 and init.dims[0] == 1:
            value = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(value.reshape(value.shape[1:]), init.name))
    return forward


def pgd_step(session: AttackSession, x0: np.ndarray, reference: np.ndarray) -> Callable[[], None]:
    """One L-inf PGD step of the attack graph in ``session``, from a state it keeps between calls."""
    stepper = session.stepper(reference)
    delta = np.zeros_like(x0)

    def step() -> None:
        nonlocal delta
        grad = stepper(np.clip(x0 + delta, 0, 255)).grad
        delta = np.clip(delta - ALPHA * np.sign(grad), -EPS, EPS)
        delta = np.clip(x0 + delta, 0, 255) - x0

    return step


def bench_model(path: Path, batch: int, threads: int, repeats: int) -> dict[str, float]:
    import onnx2torch  # type: ignore[import-untyped]
    import torch

    session = AttackSession(path, device="cpu", intra_op_threads=threads, inter_op_threads=1, spin=SPIN)
    size = session.info.canonical_size
    if session.info.batch_size not in (None, batch):
        raise SystemExit(f"{path}: fixed batch {session.info.batch_size}, cannot time batch {batch}")
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32)
    # Random unit references: near-identical embeddings would make the cosine gradient a difference of
    # nearly equal vectors, and the float32 cancellation would hide whether both sides agree.
    reference = rng.standard_normal((batch, session.info.embedding_dim)).astype(np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)

    ort_step = pgd_step(session, x0, reference)

    torch.set_num_threads(threads)
    module = onnx2torch.convert(forward_model(path)).eval()
    # Gradients w.r.t. the image only, as the attack graph computes: without this, backward() would
    # also compute (and accumulate) a gradient for every weight, work the attack has no use for.
    module.requires_grad_(False)
    tx0, tref = torch.from_numpy(x0), torch.from_numpy(reference)
    torch_delta = torch.zeros_like(tx0)

    def torch_grad(delta: torch.Tensor) -> torch.Tensor:
        image = (tx0 + delta).clamp(0, 255).requires_grad_(True)
        module(image, tref).sum().backward()
        assert image.grad is not None
        return image.grad

    def torch_step() -> None:
        nonlocal torch_delta
        grad = torch_grad(torch_delta)
        with torch.no_grad():
            torch_delta = (torch_delta - ALPHA * grad.sign()).clamp(-EPS, EPS)
            torch_delta = (tx0 + torch_delta).clamp(0, 255) - tx0

    start = rng.uniform(-EPS, EPS, x0.shape).astype(np.float32)
    ort_grad = session.run(np.clip(x0 + start, 0, 255), reference).grad
    reference_grad = torch_grad(torch.from_numpy(start)).numpy()
    mismatch = float(np.linalg.norm(ort_grad - reference_grad) / max(np.linalg.norm(reference_grad), 1e-30))
    timings = median_ms({"ort_ms": ort_step, "torch_ms": torch_step}, repeats)
    return {**timings, "grad_mismatch": mismatch}


def synthetic_recognizer(directory: Path) -> Path:
    """A 112-px, 128-d conv recognizer with random weights (Conv-BN-ReLU stages), as an attack graph."""
    from onnx import TensorProto, helper, numpy_helper

    from uncnn_rt.converters.attack_graph import build_attack_graph

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    channels, current = 3, "input"
    for i, (out, stride) in enumerate([(32, 2), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)]):
        w = (rng.standard_normal((out, channels, 3, 3)) * np.sqrt(2 / (9 * channels))).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.ones(out, np.float32), f"g{i}"),
            numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}"),
            numpy_helper.from_array(np.zeros(out, np.float32), f"m{i}"),
            numpy_helper.from_array(np.ones(out, np.float32), f"v{i}"),
        ]
        nodes += [
            helper.make_node(
                "Conv", [current, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride, stride]
            ),
            helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"]),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        channels, current = out, f"r{i}"
    inits.append(
        numpy_helper.from_array(rng.standard_normal((channels, 128)).astype(np.float32) * 0.05, "fc")
    )
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 128])],
        inits,
    )
    source = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    preprocessing = contract.Preprocessing(
        native_size=(112, 112), layout="NCHW", mean=(127.5,) * 3, std=(128.0,) * 3
    )
    attack = build_attack_graph(
        source,
        kind="face",
        preprocessing=preprocessing,
        canonical_size=112,
        name="synthetic-112",
        threshold=0.5,
    )
    path = directory / "synthetic-112.onnx"
    onnx.save(attack, str(path))
    return path


def baseline_table(
    models: list[tuple[str, Path]], rev: str, threads: int, repeats: int, scratch: Path
) -> None:
    """The onnxruntime step on each graph, its gradient built by ``rev``, this tree, and this tree
    without the layout pass (the forward part is the same in all three)."""
    import gradient_versions as versions

    attacks = [onnx.load(str(path)) for _, path in models]
    before = versions.at_revision(rev, attacks)
    name = versions.revision_name(rev)
    print(
        f"one L-inf PGD step in onnxruntime (CPU, {threads} threads), median of {repeats}; gradient built by"
    )
    print(f"{name} / this tree / this tree without the layout pass, taking turns in one run")
    print(
        f"| model | N | {name} ms | this tree ms | this / {name} | no layout pass ms | no pass / this "
        f"| same graph as {name} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, ((label, _), attack, old) in enumerate(zip(models, attacks, before, strict=True)):
        new = versions.this_tree(attack, ort_layout=True)
        plain = versions.this_tree(attack, ort_layout=False)
        paths = []
        for which, model in (("old", old), ("new", new), ("plain", plain)):
            paths.append(scratch / f"{i}-{which}.onnx")
            onnx.save(model, str(paths[-1]))
        sessions = [
            AttackSession(p, device="cpu", intra_op_threads=threads, inter_op_threads=1, spin=SPIN)
            for p in paths
        ]
        for batch in (1, 8):
            if sessions[0].info.batch_size not in (None, batch):
                continue
            rng = np.random.default_rng(0)
            size = sessions[0].info.canonical_size
            x0 = rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32)
            reference = rng.standard_normal((batch, sessions[0].info.embedding_dim)).astype(np.float32)
            reference /= np.linalg.norm(reference, axis=1, keepdims=True)
            steps = {
                w: pgd_step(s, x0, reference) for w, s in zip(("old", "new", "plain"), sessions, strict=True)
            }
            ms = median_ms(steps, repeats)
            same = "yes" if versions.same_graph(new, old) else "NO"
            print(
                f"| {label} | {batch} | {ms['old']:.2f} | {ms['new']:.2f} | {ms['new'] / ms['old']:.3f}x "
                f"| {ms['plain']:.2f} | {ms['plain'] / ms['new']:.2f}x | {same} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", default=[], help="attack graph (repeatable)")
    parser.add_argument("--synthetic", action="store_true", help="also time a built 112-px CNN recognizer")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--baseline", metavar="REV", help="time the onnxruntime step against git revision REV"
    )
    args = parser.parse_args(argv)

    models = [(p.stem, p) for p in args.model]
    if not args.model:
        models += [(e.name, e.path) for e in catalog.load_manifest() if e.kind == "face"]
    scratch = tempfile.TemporaryDirectory()
    if args.synthetic:
        models.append(("synthetic-112 (random weights)", synthetic_recognizer(Path(scratch.name))))
    if not models:
        print("no face models in the manifest; pass --model PATH or --synthetic", file=sys.stderr)
        return 2
    if args.baseline:
        baseline_table(models, args.baseline, args.threads, args.repeats, Path(scratch.name))
        scratch.cleanup()
        return 0

    import onnxruntime
    import torch

    versions = f"onnxruntime {onnxruntime.__version__} vs torch {torch.__version__} (onnx2torch)"
    print(f"{versions}, CPU, {args.threads} threads")
    print(f"one L-inf PGD step (forward + gradient + update), median of {args.repeats}")
    print("| model | N | onnxruntime ms | torch ms | torch / onnxruntime | gradient relative L2 error |")
    print("|---|---|---|---|---|---|")
    for name, path in models:
        for batch in (1, 8):
            row = bench_model(path, batch, args.threads, args.repeats)
            ratio = row["torch_ms"] / row["ort_ms"]
            print(
                f"| {name} | {batch} | {row['ort_ms']:.2f} | {row['torch_ms']:.2f} | {ratio:.2f}x "
                f"| {row['grad_mismatch']:.1e} |",
                flush=True,
            )
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
