"""Adversarial data for robust training, and robust accuracy, for any attack-graph model.

The same engine as ``uncnn-rt augment`` and ``uncnn-rt robustness`` (numpy + onnxruntime; Ray only for
``engine="ray"``)::

    from uncnn_rt.augment import AugmentConfig, RobustnessConfig, augment, measure_robustness, read_manifest

    # PGD variants of half of the training images, eps drawn per image from 2..8 grey levels
    summary = augment(
        "digits.attack.onnx", "data/train", "data/train_adv",
        AugmentConfig(attack="pgd", eps=(2, 8), steps=10, ratio=0.5, seed=0),
        workers=2,                      # processes, one onnxruntime session each; engine="ray" scales out
    )
    rows = read_manifest("data/train_adv")   # path, source, label, eps, success, confidence_before/after ...

    report = measure_robustness(
        "digits.attack.onnx", "data/test", RobustnessConfig(attacks=("fgsm", "pgd"), eps=(0, 2, 4, 8))
    )
    report.clean_accuracy, report.accuracy("pgd")

``DATA`` is an ImageFolder (``DATA/<class>/<image>``) or a CSV with ``path,label``; classes are the
model's labels or class indices. Outputs are PNGs at each input's own size under the same relative
paths, plus ``manifest.jsonl``; reruns resume, and the bytes written do not depend on ``workers`` or
``engine``. A plain ONNX model must first become an attack graph (``uncnn-rt convert grad``).
"""

from uncnn_rt.runtime.jobs.augment import MANIFEST, AugmentSummary, augment, read_manifest
from uncnn_rt.runtime.jobs.datasets import Item, count_items, iter_dataset
from uncnn_rt.runtime.jobs.robustness import (
    RobustnessConfig,
    RobustnessReport,
    measure_robustness,
    parse_eps_list,
    plot_robustness,
)
from uncnn_rt.runtime.jobs.variants import ATTACKS, AugmentConfig, output_name, parse_eps, plan_item

__all__ = [
    "ATTACKS",
    "MANIFEST",
    "AugmentConfig",
    "AugmentSummary",
    "Item",
    "RobustnessConfig",
    "RobustnessReport",
    "augment",
    "count_items",
    "iter_dataset",
    "measure_robustness",
    "output_name",
    "parse_eps",
    "parse_eps_list",
    "plan_item",
    "plot_robustness",
    "read_manifest",
]
