"""Close the loop on scikit-learn's digits: train, measure robust accuracy, augment, retrain, measure again.

Run from the repository root (about nine minutes on 2 CPU cores, most of it AutoAttack)::

    .venv/bin/python examples/digits/run.py

1. The 1797 bundled 8x8 digits (grey levels 0..16) become 16x16 grey PNGs in two ImageFolders,
   ``train/<digit>/`` and ``test/<digit>/`` (stratified 2:1 split, fixed seed).
2. A small MLP (64 -> 64 tanh -> 10) is trained with numpy. Its ONNX graph takes the contract's image
   ``[N, 16, 16, 3]`` RGB 0..255 and folds the preprocessing in as one linear map: the grey of each
   2x2 block over the three channels, scaled to 0..1 (the 8x8 digit), then the MLP. ``uncnn-rt convert
   grad`` turns it into an attack graph.
3. ``uncnn-rt robustness`` measures its accuracy on the test set under FGSM, PGD and AutoAttack (the
   standard ensemble, which the field reports robust accuracy with) over eps.
4. Rounds of ``uncnn-rt augment`` then retraining: each round writes a PGD variant of every training
   image against the *current* model (eps drawn per image from a range, a new seed per round), and the
   model continues training (warm start) on the clean images plus every round's variants, labels read
   from the manifests. Adversarial examples are specific to the model they were made against, so one
   round against a fixed model does little (here it even lowers robust accuracy); repeating the loop
   against the model being trained is what raises it.
5. The final model is measured as in step 3. Whether the gain PGD shows survives AutoAttack is the
   honest measure of what the rounds bought.

Everything goes through the real CLI on real files; ``--work`` holds them (a temporary folder by
default). The figures and the JSON reports land in ``examples/digits/figures/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
SIZE = 16  # the PNGs and the model's canonical input
HIDDEN = 64
EPS = "0,16,32,48,64"  # grey levels (0..255); one digit level (1/16) is about 16
AUGMENT_EPS = "16:48"
STEPS = 10
ROUNDS = 4
WARM_EPOCHS = 200
FINAL_ATTACKS = "fgsm,pgd,autoattack"  # the before and after measurements; the rounds' use PGD alone


def pooling_matrix() -> NDArray[np.float32]:
    """``[16 * 16 * 3, 64]``: each 8x8 cell is the mean of its 2x2 block over R, G, B, scaled to 0..1."""
    p = np.zeros((SIZE, SIZE, 3, 8, 8), np.float32)
    for y in range(SIZE):
        for x in range(SIZE):
            p[y, x, :, y // 2, x // 2] = 1.0 / (4 * 3 * 255)
    return p.reshape(SIZE * SIZE * 3, 64)


def features(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """What the graph's first layer computes, for training: ``[N, 16, 16, 3]`` -> ``[N, 64]``."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    return np.asarray(flat @ pooling_matrix(), np.float32)


def write_folders(work: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.rint(digits.images * 255 / 16).astype(np.uint8)  # 0..16 -> 0..255
    big = grey.repeat(2, axis=1).repeat(2, axis=2)  # 8x8 -> 16x16, nearest
    index = np.arange(len(big))
    train, test = train_test_split(index, test_size=1 / 3, random_state=0, stratify=digits.target)
    for split, chosen in (("train", train), ("test", test)):
        for i in chosen:
            folder = work / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(big[i], mode="L").save(folder / f"{i:04d}.png")


def read_folder(root: Path, names: list[str] | None = None) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Images ``[N, 16, 16, 3]`` and labels of an ImageFolder (or of the listed relative paths)."""
    paths = [root / n for n in names] if names is not None else sorted(root.glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    labels = np.array([int(p.parent.name) for p in paths])
    return images, labels


Params = dict[str, NDArray[np.float32]]


def train_mlp(
    x: NDArray[np.float32], y: NDArray[np.int64], *, init: Params | None = None, epochs: int = 400
) -> Params:
    """Full-batch Adam on the cross-entropy, from ``init`` (warm start) or a fixed random initialisation."""
    rng = np.random.default_rng(0)
    params = (
        {k: v.copy() for k, v in init.items()}
        if init is not None
        else {
            "w1": (rng.standard_normal((64, HIDDEN)) * np.sqrt(1 / 64)).astype(np.float32),
            "b1": np.zeros(HIDDEN, np.float32),
            "w2": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(1 / HIDDEN)).astype(np.float32),
            "b2": np.zeros(10, np.float32),
        }
    )
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    onehot = np.eye(10, dtype=np.float32)[y]
    lr, beta1, beta2 = 0.01, 0.9, 0.999
    for t in range(1, epochs + 1):
        h = np.tanh(x @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g_logits = (p - onehot) / len(x)
        g_h = (g_logits @ params["w2"].T) * (1 - h * h)
        grads = {"w2": h.T @ g_logits, "b2": g_logits.sum(0), "w1": x.T @ g_h, "b1": g_h.sum(0)}
        for k, g in grads.items():
            m, v = moments[k]
            m[:] = beta1 * m + (1 - beta1) * g
            v[:] = beta2 * v + (1 - beta2) * g * g
            step = lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + 1e-8)
            params[k] = (params[k] - step).astype(np.float32)
    return params


def accuracy(params: Params, x: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    h = np.tanh(x @ params["w1"] + params["b1"])
    return float(np.mean(np.argmax(h @ params["w2"] + params["b2"], axis=1) == y))


def write_onnx(params: Params, path: Path) -> None:
    """The plain forward model: ``pixels`` ``[N, 16, 16, 3]`` (0..255) -> ``logits`` ``[N, 10]``."""
    n = helper.make_node
    nodes = [
        n("Reshape", ["pixels", "flat_shape"], ["flat"]),
        n("MatMul", ["flat", "pool"], ["digit"]),  # grey 8x8 in 0..1, folded in as one linear map
        n("MatMul", ["digit", "w1"], ["z1"]),
        n("Add", ["z1", "b1"], ["a1"]),
        # tanh, not ReLU: smooth, so convert's finite-difference check of the gradient never straddles a kink
        n("Tanh", ["a1"], ["h"]),
        n("MatMul", ["h", "w2"], ["z2"]),
        n("Add", ["z2", "b2"], ["logits"]),
    ]
    constants = [
        numpy_helper.from_array(np.array([-1, SIZE * SIZE * 3], np.int64), "flat_shape"),
        numpy_helper.from_array(pooling_matrix(), "pool"),
        *(numpy_helper.from_array(v, k) for k, v in params.items()),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "uncnn_rt", "-q", "--device", "cpu", *args]
    print("$ uncnn-rt", " ".join(args[:1] + tuple(a if "/" not in a else Path(a).name for a in args[1:])))
    subprocess.run(command, check=True)


def build_and_measure(
    params: Params, name: str, work: Path, workers: int, *, attacks: str = FINAL_ATTACKS, eps: str = EPS
) -> dict:
    plain = work / f"{name}.onnx"
    write_onnx(params, plain)
    labels = work / "labels.txt"
    labels.write_text("\n".join(str(d) for d in range(10)) + "\n")
    attack_graph = work / f"{name}.attack.onnx"
    cli(
        "convert",
        "grad",
        str(plain),
        "--kind",
        "classifier",
        "--labels",
        str(labels),
        "-o",
        str(attack_graph),
    )
    final = attacks == FINAL_ATTACKS
    report = (FIGURES if final else work) / f"robustness_{name}.json"
    plot = ("--plot", str(FIGURES / f"robustness_{name}.png")) if final else ()
    cli(
        "robustness", str(attack_graph), str(work / "test"), "--attacks", attacks, "--eps", eps,
        "--steps", str(STEPS), "--workers", str(workers), "--json", str(report), *plot,
    )  # fmt: skip
    return dict(json.loads(report.read_text()))


NAMES = {"fgsm": "FGSM", "pgd": "PGD", "autoattack": "AutoAttack"}


def plot_before_after(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    curves = ((before, "clean training", "#d62728"), (after, "after augment rounds", "#1f77b4"))
    for report, label, colour in curves:
        for attack, style in (("fgsm", "--"), ("pgd", "-"), ("autoattack", ":")):
            accuracy = [100 * a for a in report["attacks"][attack]["accuracy"]]
            ax.plot(
                report["eps"], accuracy, style, marker="o", color=colour, label=f"{label}, {NAMES[attack]}"
            )
    ax.set_xlabel("eps (grey levels, 0..255)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"digits MLP, {before['images']} test images, PGD {STEPS} steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "uncnn-digits")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    FIGURES.mkdir(parents=True, exist_ok=True)

    write_folders(work)
    x_train_img, y_train = read_folder(work / "train")
    x_test_img, y_test = read_folder(work / "test")
    params = train_mlp(features(x_train_img), y_train)
    print(f"baseline: train {accuracy(params, features(x_train_img), y_train):.3f}, "
          f"test {accuracy(params, features(x_test_img), y_test):.3f}")  # fmt: skip
    before = build_and_measure(params, "baseline", work, args.workers)

    inputs, labels = [features(x_train_img)], [y_train]
    rounds = []
    model = work / "baseline.attack.onnx"
    for k in range(1, args.rounds + 1):
        adversarial = work / f"train_adv_{k}"
        cli(
            "augment", str(model), str(work / "train"), "-o", str(adversarial),
            "--attack", "pgd", "--eps", AUGMENT_EPS, "--steps", str(STEPS), "--seed", str(k),
            "--workers", str(args.workers),
        )  # fmt: skip
        rows = [json.loads(line) for line in (adversarial / "manifest.jsonl").read_text().splitlines()]
        x_adv_img, _ = read_folder(adversarial, [r["path"] for r in rows])
        inputs.append(features(x_adv_img))
        labels.append(np.array([int(r["label"]) for r in rows]))
        success = float(np.mean([r["success"] for r in rows]))
        params = train_mlp(np.concatenate(inputs), np.concatenate(labels), init=params, epochs=WARM_EPOCHS)
        name = f"round{k}" if k < args.rounds else "augmented"
        if k < args.rounds:
            report = build_and_measure(params, name, work, args.workers, attacks="pgd", eps="0,16,32")
        else:
            report = after = build_and_measure(params, name, work, args.workers)
        pgd = dict(zip(report["eps"], report["attacks"]["pgd"]["accuracy"], strict=True))
        rounds.append({"round": k, "augmented_images": len(rows), "fooled_current_model": round(success, 4)}
                      | {f"pgd_eps{e:g}": pgd[e] for e in (0.0, 16.0, 32.0)})  # fmt: skip
        print(json.dumps(rounds[-1]))
        model = work / f"{name}.attack.onnx"

    plot_before_after(before, after, FIGURES / "robust_accuracy.png")
    summary = {
        "eps": before["eps"],
        "augment": {"attack": "pgd", "eps": AUGMENT_EPS, "steps": STEPS, "rounds": args.rounds},
        "baseline": {a: before["attacks"][a]["accuracy"] for a in NAMES},
        "augmented": {a: after["attacks"][a]["accuracy"] for a in NAMES},
        "autoattack_broken_by": {
            "baseline": before["attacks"]["autoattack"]["broken_by"],
            "augmented": after["attacks"]["autoattack"]["broken_by"],
        },
        "rounds": rounds,
    }
    (FIGURES / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
