"""Intermediate-layer victims for feature-level transfer probes (``bench/loo_probe.py --extra``).

For each shipped default recognizer, cuts its attack graph's forward part at the convolution found at
``--depth`` (a fraction of its convolutions, in graph order), flattens that feature map and builds an
attack graph of it with ``uncnn-rt convert grad``: its ``features`` are the L2-normalised feature map
and its objective the cosine to a reference, so attacking it with the face's own clean map as the
reference pushes the intermediate representation away from the clean one (feature-level objectives as
in FDA / FIA, without their gradient-aggregation weights). The graph's "threshold" (``--threshold``,
default 0.6, under the 0.68-0.75 cosine of two different dev identities' mid-layer maps) only gives the
ensemble's early stop and focus a goal for it.

Usage::

    .venv/bin/python bench/mid_layer_victims.py --depth 0.5 --out /tmp/mid
    .venv/bin/python bench/loo_probe.py fr_feature '{}' '{"extra": true}' --extra /tmp/mid/*.onnx
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import onnx.utils
from onnx import helper

from uncnn_rt.runtime import catalog, contract
from uncnn_rt.runtime.cloak import default_recognizer_names


def cut(model: onnx.ModelProto, depth: float) -> tuple[onnx.ModelProto, str]:
    """``image -> flattened feature map`` at the convolution at ``depth`` of the forward part."""
    model = onnx.shape_inference.infer_shapes(model)
    forward = [n for n in model.graph.node if not any(o.startswith("grad") for o in n.output)]
    convs = [n for n in forward if n.op_type == "Conv"]
    tensor = convs[min(int(len(convs) * depth), len(convs) - 1)].output[0]
    sub = onnx.utils.Extractor(model).extract_model([contract.INPUT_IMAGE], [tensor])
    info = next(v for v in model.graph.value_info if v.name == tensor)
    size = int(np.prod([d.dim_value for d in info.type.tensor_type.shape.dim][1:]))
    sub.graph.node.append(helper.make_node("Flatten", [tensor], ["mid"], axis=1))
    del sub.graph.output[:]
    sub.graph.output.append(helper.make_tensor_value_info("mid", onnx.TensorProto.FLOAT, ["N", size]))
    del sub.metadata_props[:]
    # The attack graph's own tensor names (image, pre/...) are reserved in the graph built from it.
    return onnx.compose.add_prefix(sub, "src_"), tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=float, default=0.5, help="fraction of the convolutions")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in default_recognizer_names():
        entry = catalog.get_model(name)
        model = onnx.load(str(entry.path))
        size = int({p.key: p.value for p in model.metadata_props}[contract.META_CANONICAL_SIZE])
        source, tensor = cut(model, args.depth)
        src = args.out / f"{name}_mid{round(args.depth * 100)}.source.onnx"
        onnx.save(source, src)
        out = args.out / f"{name}_mid{round(args.depth * 100)}.onnx"
        command = [
            str(Path(sys.executable).parent / "uncnn-rt"), "convert", "grad", str(src), "-o", str(out),
            "--kind", "face", "--name", f"{name}_mid", "--layout", "NHWC", "--native-size",
            f"{size}x{size}", "--canonical-size", str(size), "--threshold", str(args.threshold),
            "--outputs", "embedding", "--no-validate",
        ]  # fmt: skip
        subprocess.run(command, check=True)
        src.unlink()
        print(f"{name}: cut at {tensor!r} -> {out}")


if __name__ == "__main__":
    main()
