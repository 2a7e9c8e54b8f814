"""Forward + gradient against forward only, in onnxruntime, per model, side by side in one run.

Target: the attack graph's forward + gradient costs at most 3.0x the forward-only run of the same model.
Models: the reference nets of ``tests/reference_nets.py`` (ResNet- and MobileNet-style torch nets, Keras
InceptionV3 through tf2onnx) and every shipped attack graph listed in ``models/manifest.json``.

* forward + gradient: the attack graph, all outputs (features, objective, grad);
* forward only: the same file cut to ``image -> features`` with ``onnx.utils.Extractor`` (the backward
  nodes removed, and the optional outputs the gradient added to forward nodes, e.g. MaxPool indices);
* also shown: the attack graph asked for ``features`` alone, which says whether onnxruntime skips the
  backward nodes by itself when their outputs are not requested.

CPU: 2 intra-op threads, ORT_ENABLE_ALL, warm-up, median of ``--runs`` runs, batch 1 and 8.
``--device cuda`` runs on CUDAExecutionProvider with IO binding (inputs and outputs stay on the device),
and falls back to the CPU with a message when onnxruntime has no CUDA provider. Prints ratios; asserts
nothing about timing.

``--baseline REV`` adds a before/after table: each graph's forward + gradient with the gradient built by
the autodiff of git revision ``REV``, by this tree, and by this tree without its layout pass, timed side
by side (see ``bench/gradient_versions.py``), and whether this tree's graph is REV's node for node.

    python bench/grad_overhead.py [--device cpu|cuda] [--runs 20] [--models resnet mobilenet ...]
    python bench/grad_overhead.py --baseline HEAD~3 --batches 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # reference_nets lives beside the tests that share it

TARGET = 3.0
MODELS = ("resnet", "mobilenet", "mobilenet-hardops", "inception_v3")
OPTIONAL_FORWARD_OUTPUTS = {"MaxPool", "Dropout", "BatchNormalization"}


@dataclass
class Subject:
    name: str
    attack: onnx.ModelProto


# --- the models ---------------------------------------------------------------------------------------


def reference_subjects(names: list[str], sizes: dict[str, int]) -> list[Subject]:
    import reference_nets as nets

    from uncnn_rt.converters.grad import RULES

    builders: dict[str, Callable[[], nets.ReferenceNet]] = {
        "resnet": lambda: nets.resnet(size=sizes["torch"]),
        "mobilenet": lambda: nets.mobilenet(size=sizes["torch"], hard_ops="explicit"),
        "mobilenet-hardops": lambda: nets.mobilenet(size=sizes["torch"], hard_ops="native"),
        "inception_v3": lambda: nets.inception(size=sizes["inception"]),
    }
    subjects = []
    for name in names:
        if name == "mobilenet-hardops" and not {"HardSwish", "HardSigmoid"} <= set(RULES):
            print(f"skip {name}: no gradient rule for HardSwish/HardSigmoid", file=sys.stderr)
            continue
        print(f"building {name} ...", file=sys.stderr, flush=True)
        net = builders[name]()
        subjects.append(Subject(name, nets.attack_graph(net)))
    return subjects


def shipped_subjects() -> list[Subject]:
    """Attack graphs of the shipped zoo (entries whose file carries the contract's outputs)."""
    from uncnn_rt.runtime import catalog

    subjects = []
    for entry in catalog.load_manifest():
        if not entry.path.is_file():
            print(f"skip shipped {entry.name}: {entry.file} is missing", file=sys.stderr)
            continue
        model = onnx.load(str(entry.path))
        outputs = {o.name for o in model.graph.output}
        if not {"features", "grad"} <= outputs:
            print(
                f"skip shipped {entry.name}: not an attack graph (outputs {sorted(outputs)})", file=sys.stderr
            )
            continue
        subjects.append(Subject(f"{entry.name} (shipped)", model))
    return subjects


def forward_only(attack: onnx.ModelProto) -> onnx.ModelProto:
    """``image -> features`` of an attack graph, without the backward nodes or the outputs they read."""
    inferred = onnx.shape_inference.infer_shapes(attack)
    model = onnx.utils.Extractor(inferred).extract_model(["image"], ["features"])
    consumed = {name for node in model.graph.node for name in node.input}
    consumed |= {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type in OPTIONAL_FORWARD_OUTPUTS:
            while len(node.output) > 1 and node.output[-1] not in consumed:
                node.output.pop()
    return model


# --- timing -------------------------------------------------------------------------------------------


def session(model: onnx.ModelProto, providers: list[str], threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def runner(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: list[str], device: str
) -> Callable[[], None]:
    if device == "cpu":

        def run() -> None:
            sess.run(outputs, feeds)

        return run
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for name in outputs:
        binding.bind_output(name, "cuda", 0)
    return lambda: sess.run_with_iobinding(binding)


def median_ms(fns: list[Callable[[], None]], runs: int, warmup: int) -> list[float]:
    """Median wall time of each function; the functions take turns so that load on the machine
    (other processes on the same cores) weighs on each of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) * 1e3 for samples in times]


def nodes_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str]) -> int:
    """How many node kernels onnxruntime (CPU, unoptimised graph) runs for ``outputs``, from its profile."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_profiling = True
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess.run(outputs, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    return sum(1 for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))


def feeds_for(model: onnx.ModelProto, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    size, dim = dims["image"][1], dims["reference"][1]
    reference = rng.normal(size=(batch, dim)).astype(np.float32)
    return {
        "image": rng.uniform(0.0, 255.0, size=(batch, size, size, 3)).astype(np.float32),
        "reference": reference / np.linalg.norm(reference, axis=1, keepdims=True),
    }


def fixed_batch(model: onnx.ModelProto) -> int | None:
    d = model.graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_value if d.HasField("dim_value") else None


def pick_device(requested: str) -> tuple[str, list[str]]:
    if requested == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
        print(
            "CUDA requested but onnxruntime has no CUDAExecutionProvider "
            f"(available: {ort.get_available_providers()}); falling back to the CPU.",
            file=sys.stderr,
        )
    return "cpu", ["CPUExecutionProvider"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median; >= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--torch-size", type=int, default=112, help="input size of the torch nets")
    parser.add_argument("--inception-size", type=int, default=139, help="input size of InceptionV3 (>= 75)")
    parser.add_argument("--no-shipped", action="store_true", help="skip the shipped attack graphs")
    parser.add_argument("--baseline", metavar="REV", help="also time the gradient built by git revision REV")
    parser.add_argument("--no-overhead", action="store_true", help="skip the forward-only table")
    args = parser.parse_args(argv)

    device, providers = pick_device(args.device)
    subjects = reference_subjects(args.models, {"torch": args.torch_size, "inception": args.inception_size})
    if not args.no_shipped:
        subjects += shipped_subjects()

    rng = np.random.default_rng(0)
    if not args.no_overhead:
        overhead_table(subjects, args, device, providers, rng)
    if args.baseline:
        baseline_table(subjects, args, device, providers, rng)


def overhead_table(
    subjects: list[Subject],
    args: argparse.Namespace,
    device: str,
    providers: list[str],
    rng: np.random.Generator,
) -> None:
    print(
        f"\nonnxruntime {ort.__version__}, {device} ({providers[0]}), {args.threads} intra-op threads, "
        f"ORT_ENABLE_ALL, median of {args.runs} runs after {args.warmup} warm-up"
    )
    width = max([len("model"), *(len(s.name) for s in subjects)])
    header = (
        f"{'model':<{width}} {'batch':>5} {'forward ms':>11} {'fwd+grad ms':>12} {'ratio':>6} "
        f"{'<= 3.0x':>7} {'nodes run':>15}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    pruned = []
    for subject in subjects:
        fwd_sess = session(forward_only(subject.attack), providers, args.threads)
        full_sess = session(subject.attack, providers, args.threads)
        probe = feeds_for(subject.attack, fixed_batch(subject.attack) or 1, rng)
        ran = nodes_run(subject.attack, probe, ["features"])
        total = nodes_run(subject.attack, probe, ["features", "objective", "grad"])
        pruned.append(ran < total)
        nodes = f"{ran}/{total}"
        for batch in args.batches:
            fixed = fixed_batch(subject.attack)
            if fixed is not None and fixed != batch:
                print(f"{subject.name:<{width}} {batch:>5}   (the graph has a fixed batch of {fixed})")
                continue
            feeds = feeds_for(subject.attack, batch, rng)
            fwd, full = median_ms(
                [
                    runner(fwd_sess, {"image": feeds["image"]}, ["features"], device),
                    runner(full_sess, feeds, ["features", "objective", "grad"], device),
                ],
                args.runs,
                args.warmup,
            )
            ratio = full / fwd
            ok = ratio <= TARGET
            verdicts.append(ok)
            print(
                f"{subject.name:<{width}} {batch:>5} {fwd:>11.2f} {full:>12.2f} {ratio:>5.2f}x "
                f"{'yes' if ok else 'NO':>7} {nodes:>15}",
                flush=True,
            )
            nodes = "-"
    print(f"\n{sum(verdicts)}/{len(verdicts)} measurements meet the <= {TARGET}x target.")
    verdict = (
        f"it skipped unrequested nodes in {sum(pruned)}/{len(pruned)} graphs."
        if any(pruned)
        else "it runs them all, so forward-only timings need their own graph (as here)."
    )
    print(
        "nodes run: node kernels onnxruntime runs for `features` alone / for all outputs of the attack "
        f"graph; {verdict}"
    )


def baseline_table(
    subjects: list[Subject],
    args: argparse.Namespace,
    device: str,
    providers: list[str],
    rng: np.random.Generator,
) -> None:
    """Forward + gradient of each graph with its gradient built by ``args.baseline`` and by this tree."""
    import gradient_versions as versions

    rev = versions.revision_name(args.baseline)
    print(f"\nbuilding the gradients with the autodiff of {rev} ...", file=sys.stderr, flush=True)
    before = versions.at_revision(args.baseline, [s.attack for s in subjects])
    print(
        f"\nforward + gradient, gradient built by {rev} / this tree / this tree without the layout pass; "
        f"{device}, {args.threads} intra-op threads, median of {args.runs} runs, taking turns"
    )
    width = max([len("model"), *(len(s.name) for s in subjects)])
    header = (
        f"| {'model':<{width}} | batch | {rev} ms | this tree ms | this / {rev} | no layout pass ms "
        f"| no pass / this | same graph as {rev} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for subject, old in zip(subjects, before, strict=True):
        new = versions.this_tree(subject.attack, ort_layout=True)
        plain = versions.this_tree(subject.attack, ort_layout=False)
        same = versions.same_graph(new, old)
        sessions = [session(m, providers, args.threads) for m in (old, new, plain)]
        for batch in args.batches:
            fixed = fixed_batch(subject.attack)
            if fixed is not None and fixed != batch:
                continue
            feeds = feeds_for(subject.attack, batch, rng)
            outputs = ["features", "objective", "grad"]
            old_ms, new_ms, plain_ms = median_ms(
                [runner(sess, feeds, outputs, device) for sess in sessions], args.runs, args.warmup
            )
            print(
                f"| {subject.name:<{width}} | {batch} | {old_ms:.2f} | {new_ms:.2f} | {new_ms / old_ms:.3f}x "
                f"| {plain_ms:.2f} | {plain_ms / new_ms:.2f}x | {'yes' if same else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
