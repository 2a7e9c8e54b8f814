"""Our AutoAttack against torchattacks' on the same model, images and eps, in one run.

The reference side converts the model's plain forward ONNX to PyTorch with onnx2torch and runs
torchattacks' ``AutoAttack`` (standard: APGD-CE, APGD-T, FAB-T, Square; L-inf) on NCHW images in
0..1; our side runs :class:`uncnn_rt.runtime.attacks.autoattack.AutoAttack` on the attack graph, on
the same images in 0..255, unquantised as the reference is. Both count an image robust when it is
classified correctly clean and after the attack. Printed per model and eps: clean accuracy, both
robust accuracies and their difference in points, our fixed-step PGD's (AutoAttack's should never be
above it), and seconds per image of each implementation on this CPU.

Needs a separate environment, as torchattacks pulls torchvision (keep it out of the dev venv, whose
torch is pinned)::

    python3 -m venv /tmp/aaref && /tmp/aaref/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        onnx2torch torchattacks scikit-image && /tmp/aaref/bin/pip install -e '.[cpu]'
    .venv/bin/python examples/digits/run.py --work /tmp/uncnn-digits        # the two digits models
    /tmp/aaref/bin/python bench/autoattack_reference.py --work /tmp/uncnn-digits --limit 500
    /tmp/aaref/bin/python bench/autoattack_reference.py --shipped efficientnet_lite0 --eps 1,4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from uncnn_rt.runtime import catalog
from uncnn_rt.runtime.attacks import LinfPGD, Misclassified, Victim
from uncnn_rt.runtime.attacks.autoattack import AutoAttack
from uncnn_rt.runtime.sessions import AttackSession, open_session


def digits_test_set(work: Path, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted((work / "test").glob("*/*.png"))
    if not paths:
        raise SystemExit(f"{work}/test holds no images: run examples/digits/run.py --work {work} first")
    order = np.random.default_rng(seed).permutation(len(paths))[:limit]
    chosen = [paths[i] for i in sorted(order)]
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in chosen])
    return images, np.array([int(p.parent.name) for p in chosen])


def sample_photos(size: int, session: AttackSession) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's colour samples, centre-cropped to ``size``; labels: the model's clean predictions."""
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.cat()]
    crops = []
    for rgb in photos:
        h, w = rgb.shape[:2]
        side = min(h, w)
        square = rgb[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        crops.append(
            np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR), np.float32)
        )
    images = np.stack(crops)
    return images, np.argmax(session.features(images), axis=1)


def torch_model(forward_onnx: object) -> object:
    """The forward graph as a torch module taking NCHW 0..1 (what torchattacks feeds)."""
    import onnx
    import torch
    from onnx2torch import convert

    model = onnx.load(forward_onnx) if isinstance(forward_onnx, (str, Path)) else forward_onnx
    inner = convert(model).eval()

    class ToNHWC(torch.autograd.Function):
        """NCHW -> NHWC whose gradient comes back contiguous (torchattacks' FAB views gradients)."""

        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1).contiguous()

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            return grad.permute(0, 3, 1, 2).contiguous()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(ToNHWC.apply(x) * 255.0)

    return Wrapped().eval()


def forward_of_attack_graph(path: Path) -> object:
    """The attack graph pruned to its ``features`` output (log-softmax: the same argmax, the same
    margins and DLR ratios as the logits), with the reference input dropped."""
    import onnx

    from uncnn_rt.runtime.sessions import prune_to_outputs

    model = onnx.load(str(path))
    pruned = prune_to_outputs(model, ["features"])
    kept = [i for i in pruned.graph.input if i.name == "image"]
    del pruned.graph.input[:]
    pruned.graph.input.extend(kept)
    return pruned


def reference_robust(
    model: object, images: np.ndarray, labels: np.ndarray, eps: float, seed: int
) -> tuple[float, float]:
    import torch
    import torchattacks

    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)) / 255.0).float().contiguous()
    y = torch.from_numpy(labels).long()
    attack = torchattacks.AutoAttack(
        model,
        norm="Linf",
        eps=eps / 255.0,
        version="standard",
        n_classes=10 if int(labels.max()) < 10 else 1000,
        seed=seed,
    )
    start = time.perf_counter()
    adv = attack(x, y)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        correct = (model(adv).argmax(1) == y).float().mean().item()
    return correct, seconds / len(images)


def ours_robust(
    session: AttackSession, images: np.ndarray, labels: np.ndarray, eps: float, seed: int
) -> tuple[float, float, dict[str, int]]:
    references = np.eye(session.info.embedding_dim, dtype=np.float32)[labels]
    start = time.perf_counter()
    result = AutoAttack(eps=eps)(images, [Victim(session, references, name="m")], seed=seed)
    seconds = time.perf_counter() - start
    robust = np.asarray(result.clean) & np.array([b is None for b in result.broken_by])
    counts: dict[str, int] = {}
    for name in result.broken_by:
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return float(robust.mean()), seconds / len(images), counts


def pgd_robust(
    session: AttackSession, images: np.ndarray, labels: np.ndarray, eps: float, steps: int, seed: int
) -> float:
    references = np.eye(session.info.embedding_dim, dtype=np.float32)[labels]
    clean = np.argmax(session.features(images), axis=1) == labels
    result = LinfPGD(eps=eps, steps=steps)(
        images, [Victim(session, references, name="m")], stop_when=Misclassified("m"), seed=seed
    )
    after = np.argmax(result.features["m"], axis=1) == labels
    return float((clean & after).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="the digits example's --work folder")
    parser.add_argument("--models", default="baseline,augmented", help="digits models in --work")
    parser.add_argument("--shipped", default=None, help="a shipped classifier, attacked on sample photos")
    parser.add_argument("--eps", default="16,32", help="grey levels (0..255), comma-separated")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    eps_list = [float(e) for e in args.eps.split(",")]
    cases = []
    if args.work is not None:
        images, labels = digits_test_set(args.work, args.limit, args.seed)
        for name in args.models.split(","):
            session = open_session(args.work / f"{name}.attack.onnx", device="cpu")
            cases.append((name, session, torch_model(args.work / f"{name}.onnx"), images, labels))
    if args.shipped is not None:
        path = catalog.resolve_model(args.shipped)
        session = open_session(path, device="cpu")
        images, labels = sample_photos(session.info.canonical_size, session)
        cases.append((args.shipped, session, torch_model(forward_of_attack_graph(path)), images, labels))
    if not cases:
        raise SystemExit("give --work (the digits models) and/or --shipped NAME")
    columns = (
        "model",
        "n",
        "eps",
        "clean",
        "torchattacks",
        "ours",
        "diff pp",
        "our PGD",
        "s/img ref",
        "s/img ours",
    )
    widths = (18, 4, 5, 6, 12, 6, 8, 8, 10, 10)
    print(
        " ".join(
            f"{c:<{w}}" if k == 0 else f"{c:>{w}}"
            for k, (c, w) in enumerate(zip(columns, widths, strict=True))
        ),
        " broken by (ours)",
    )
    for name, session, model, images, labels in cases:
        clean = float((np.argmax(session.features(images), axis=1) == labels).mean())
        for eps in eps_list:
            reference, ref_seconds = reference_robust(model, images, labels, eps, args.seed)
            ours, our_seconds, counts = ours_robust(session, images, labels, eps, args.seed)
            pgd = pgd_robust(session, images, labels, eps, args.pgd_steps, args.seed)
            row = (
                f"{name:<18} {len(images):>4} {eps:>5g} {100 * clean:>6.1f} {100 * reference:>12.1f} "
                f"{100 * ours:>6.1f} {100 * (ours - reference):>+8.1f} {100 * pgd:>8.1f} "
                f"{ref_seconds:>10.3f} {our_seconds:>10.3f}  {counts}"
            )
            print(row, flush=True)


if __name__ == "__main__":
    main()
