"""Small CNNs built in code with seeded weights, shared by ``test_grad_models.py`` and ``bench/``.

Each builder returns a :class:`ReferenceNet`: the source-framework model (the independent reference
for the gradient checks) and its ONNX export, with one input ``x`` and one output ``y``, in eval mode.

* ``resnet``: a ResNet-style net (conv-BN-ReLU stem, MaxPool 3x3/2, basic residual blocks, strided
  1x1 projection shortcuts, global average pool, Linear), used as a face embedder (D = 32).
* ``mobilenet``: a MobileNetV3-style net (depthwise separable and inverted-residual blocks, one dilated
  depthwise conv, Hardswish, ReLU6, squeeze-excitation gated by Hardsigmoid, Linear), a classifier.
* ``inception_v3``: Keras ``InceptionV3(weights=None)`` exported with tf2onnx, a classifier.

Batch-norm statistics and affine parameters are drawn at random so that BatchNormalization is not the
identity it is right after initialisation. torch and TensorFlow are imported lazily, inside the builders.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from uncnn_rt.runtime.contract import Preprocessing

Kind = Literal["face", "classifier"]
HardOps = Literal["native", "explicit"]

OPSET = 17
INCEPTION_SIZE = 75  # the smallest input Keras' InceptionV3 accepts


@dataclass
class ReferenceNet:
    """A source model, its ONNX export (input ``x``, output ``y``) and how it expects its input."""

    name: str
    framework: Literal["torch", "tensorflow"]
    kind: Kind
    model: Any  # torch.nn.Module in eval mode, or a keras.Model
    onnx: onnx.ModelProto
    preprocessing: Preprocessing  # layout, channel order, mean/std the attack graph folds in

    @property
    def native_size(self) -> int:
        return self.preprocessing.native_size[0]


# --- torch nets -------------------------------------------------------------------------------------


def _torch_modules() -> Any:
    """The module classes, defined once torch is imported (torch is optional for the project)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class HardSwish(nn.Module):
        """x * relu6(x + 3) / 6 spelled out, which exports as Add, Clip, Mul, Div."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * F.relu6(x + 3.0) / 6.0

    class HardSigmoid(nn.Module):
        """relu6(x + 3) / 6 spelled out, which exports as Add, Clip, Div."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu6(x + 3.0) / 6.0

    def conv_bn(
        cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, dilation: int = 1
    ) -> nn.Sequential:
        pad = dilation * (k - 1) // 2
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout, 3))
            self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.body(x) + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self, embedding: int = 32) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 48, 2))
            self.fc = nn.Linear(48, embedding)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class SqueezeExcite(nn.Module):
        def __init__(self, c: int, hidden: int, gate: nn.Module) -> None:
            super().__init__()
            self.reduce = nn.Conv2d(c, hidden, 1)
            self.expand = nn.Conv2d(hidden, c, 1)
            self.gate = gate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.mean((2, 3), keepdim=True)
            return x * self.gate(self.expand(F.relu(self.reduce(s))))

    class InvertedResidual(nn.Module):
        def __init__(
            self,
            cin: int,
            hidden: int,
            cout: int,
            k: int,
            stride: int,
            dilation: int,
            act: type[nn.Module],
            gate: type[nn.Module] | None,
        ) -> None:
            super().__init__()
            layers: list[nn.Module] = [
                conv_bn(cin, hidden, 1),
                act(),
                conv_bn(hidden, hidden, k, stride, hidden, dilation),
                act(),
            ]
            if gate is not None:
                layers.append(SqueezeExcite(hidden, hidden // 4, gate()))
            layers.append(conv_bn(hidden, cout, 1))
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return x + y if self.residual else y

    class MobileNet(nn.Module):
        def __init__(self, hard_ops: HardOps, classes: int = 10) -> None:
            super().__init__()
            hswish = nn.Hardswish if hard_ops == "native" else HardSwish
            hsigmoid = nn.Hardsigmoid if hard_ops == "native" else HardSigmoid
            self.features = nn.Sequential(
                conv_bn(3, 16, 3, 2),
                hswish(),
                conv_bn(16, 16, 3, 1, groups=16),
                nn.ReLU6(),
                conv_bn(16, 24, 1),  # depthwise separable
                InvertedResidual(24, 48, 24, 3, 1, 1, nn.ReLU6, None),
                InvertedResidual(24, 64, 32, 5, 2, 1, hswish, hsigmoid),
                InvertedResidual(32, 64, 32, 3, 1, 2, hswish, hsigmoid),  # dilated depthwise conv
                conv_bn(32, 96, 1),
                hswish(),
            )
            self.head = nn.Sequential(nn.Linear(96, 64), hswish(), nn.Linear(64, classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.adaptive_avg_pool2d(self.features(x), 1)
            return self.head(torch.flatten(x, 1))

    return ResNet, MobileNet


def _randomise_batchnorm(module: Any, generator: Any) -> None:
    import torch

    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            with torch.no_grad():
                bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)


def export_torch(module: Any, size: int, *, keep_batchnorm: bool) -> onnx.ModelProto:
    """Export an eval-mode module to ONNX opset 17 with a dynamic batch axis (input ``x``, output ``y``).

    ``keep_batchnorm=False`` is the usual export, where torch folds each BatchNorm into the Conv before
    it; ``True`` keeps the BatchNormalization nodes (so their gradient rule is exercised).
    """
    import torch

    buf = io.BytesIO()
    training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (torch.zeros(1, 3, size, size),),
            buf,
            opset_version=OPSET,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            training=training,
        )
    return onnx.load_from_string(buf.getvalue())


def resnet(seed: int = 0, *, size: int = 64, keep_batchnorm: bool = False) -> ReferenceNet:
    import torch

    resnet_cls, _ = _torch_modules()
    torch.manual_seed(seed)
    module = resnet_cls()
    _randomise_batchnorm(module, torch.Generator().manual_seed(seed + 1))
    module.eval()
    pre = Preprocessing(
        native_size=(size, size),
        layout="NCHW",
        channel_order="BGR",
        mean=(103.9, 116.8, 123.7),
        std=(57.4, 57.1, 58.4),
    )
    name = "resnet-batchnorm" if keep_batchnorm else "resnet"
    exported = export_torch(module, size, keep_batchnorm=keep_batchnorm)
    return ReferenceNet(name, "torch", "face", module, exported, pre)


def mobilenet(
    seed: int = 0, *, size: int = 64, hard_ops: HardOps = "explicit", keep_batchnorm: bool = False
) -> ReferenceNet:
    import torch

    _, mobilenet_cls = _torch_modules()
    torch.manual_seed(seed)
    module = mobilenet_cls(hard_ops)
    _randomise_batchnorm(module, torch.Generator().manual_seed(seed + 1))
    module.eval()
    # Scale the last Linear so the logits spread about 1 (random weights give ~0.05: a flat log-softmax).
    with torch.no_grad():
        probe = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed + 2))
        spread = module(probe).std()
        module.head[-1].weight /= spread
        module.head[-1].bias /= spread
    pre = Preprocessing(
        native_size=(size, size),
        layout="NCHW",
        channel_order="RGB",
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
    )
    name = "mobilenet" if hard_ops == "explicit" else "mobilenet-hardops"
    return ReferenceNet(
        name, "torch", "classifier", module, export_torch(module, size, keep_batchnorm=keep_batchnorm), pre
    )


# --- Keras InceptionV3 ------------------------------------------------------------------------------


def import_tf2onnx() -> Any:
    """tf2onnx with the numpy-2 shims it still needs (``np.product``, ``np.cast``), set only here."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    shims = {"product": np.prod, "cast": _NumpyCast()}  # names numpy 2 removed
    for name, value in shims.items():
        if not hasattr(np, name):
            setattr(np, name, value)
    import tf2onnx
    import tf2onnx.convert

    return tf2onnx


class _NumpyCast:
    """numpy 1's ``np.cast[dtype](x)``."""

    def __getitem__(self, dtype: Any) -> Any:
        return lambda x: np.asarray(x).astype(dtype)


def inception_v3(
    seed: int = 0, *, size: int = INCEPTION_SIZE, classes: int = 10, dtype: str = "float32"
) -> Any:
    """Keras InceptionV3 with random weights, returning logits (no softmax)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(seed)
    previous = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    try:
        return keras.applications.InceptionV3(
            weights=None, input_shape=(size, size, 3), classes=classes, classifier_activation=None
        )
    finally:
        keras.backend.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])


def randomise_keras_batchnorm(model: Any, seed: int) -> None:
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            values = []
            for w in layer.weights:
                n = w.shape[-1]
                short = w.path.rsplit("/", 1)[-1]
                if short == "gamma":
                    v = rng.uniform(0.5, 1.5, n)
                elif short == "beta" or short == "moving_mean":
                    v = rng.normal(0.0, 0.1, n)
                elif short == "moving_variance":
                    v = rng.uniform(0.5, 2.0, n)
                else:
                    raise ValueError(f"unexpected batch-norm weight {w.path}")
                values.append(v.astype(w.dtype))
            layer.set_weights(values)


def _unit_logits(model: Any, size: int, seed: int) -> None:
    """Scale the last Dense layer so that logits spread about 1 on random inputs.

    With random weights the 94 ReLU convolutions shrink the activations, and the logits come out near
    1e-3: the log-softmax is then almost flat and a check of the classifier head would prove little.
    """
    probe = np.random.default_rng(seed).normal(size=(4, size, size, 3)).astype(np.float32)
    spread = float(np.std(np.asarray(model(probe, training=False))))
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / spread, bias])


def export_keras(model: Any) -> onnx.ModelProto:
    """tf2onnx export at opset 17 with a dynamic batch; the graph input and output renamed ``x``/``y``."""
    import tensorflow as tf

    from uncnn_rt.converters.tfjs import collect_between_passes

    tf2onnx = import_tf2onnx()
    size = model.input_shape[1]
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="x"),)
    # from_keras deep-copies the whole graph, weights included, before each of its ~20 optimizer passes
    # (so that a failing pass can be skipped) and the copies wait for the cycle collector: InceptionV3's
    # export peaked at 6-8 GB. Passes in place (any value of the variable: tf2onnx compares its name),
    # collected after each, keep it near 3 GB; a failing pass then fails the export, as it should here.
    previous = os.environ.get("TF2ONNX_CATCH_ERRORS")
    os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
    try:
        with collect_between_passes(tf2onnx):
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    finally:
        if previous is None:
            os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
        else:
            os.environ["TF2ONNX_CATCH_ERRORS"] = previous
    return _rename_output(proto, "y")


def inception(seed: int = 0, *, size: int = INCEPTION_SIZE) -> ReferenceNet:
    model = inception_v3(seed, size=size)
    randomise_keras_batchnorm(model, seed + 1)
    _unit_logits(model, size, seed + 2)
    pre = Preprocessing(
        native_size=(size, size),
        layout="NHWC",
        channel_order="RGB",
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
    )
    return ReferenceNet("inception_v3", "tensorflow", "classifier", model, export_keras(model), pre)


def _rename_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    old = model.graph.output[0].name
    for node in model.graph.node:
        for i, out in enumerate(node.output):
            if out == old:
                node.output[i] = name
        for i, inp in enumerate(node.input):
            if inp == old:
                node.input[i] = name
    model.graph.output[0].name = name
    return model


# --- the objective, and the two ways to differentiate it --------------------------------------------


def with_objective(model: onnx.ModelProto, kind: Kind) -> onnx.ModelProto:
    """Append the contract's head to a net's output ``y``: ``features`` (L2-normalised for face models,
    log-softmax for classifiers) and ``objective`` = sum(features * reference, axis 1), with a new input
    ``reference``. The graph's outputs become ``features`` and ``objective``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    y_info = graph.output[0]
    dim = y_info.type.tensor_type.shape.dim[1].dim_value
    if kind == "face":
        head = [
            helper.make_node("ReduceL2", ["y"], ["head/norm"], axes=[1], keepdims=1),
            helper.make_node("Div", ["y", "head/norm"], ["features"]),
        ]
    else:
        head = [helper.make_node("LogSoftmax", ["y"], ["features"], axis=1)]
    head += [
        helper.make_node("Mul", ["features", "reference"], ["head/weighted"]),
        helper.make_node("ReduceSum", ["head/weighted", "head/axis1"], ["objective"], keepdims=0),
    ]
    graph.node.extend(head)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "head/axis1"))
    graph.input.append(helper.make_tensor_value_info("reference", TensorProto.FLOAT, ["n", dim]))
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", dim]),
            helper.make_tensor_value_info("objective", TensorProto.FLOAT, ["n"]),
        ]
    )
    return model


def differentiated(net: ReferenceNet) -> onnx.ModelProto:
    """The net with the contract's head and ``grad`` = d objective / d ``x`` (no preprocessing)."""
    from uncnn_rt.converters.grad import differentiate

    return differentiate(with_objective(net.onnx, net.kind), wrt="x", objective="objective", grad_name="grad")


def attack_graph(net: ReferenceNet) -> onnx.ModelProto:
    """The contract's attack graph of the net, with canonical size = native size (so no resize)."""
    from uncnn_rt.converters.attack_graph import build_attack_graph

    return build_attack_graph(
        net.onnx,
        kind=net.kind,
        preprocessing=net.preprocessing,
        canonical_size=net.native_size,
        name=net.name,
    )


def embedding_dim(model: onnx.ModelProto, output: str = "features") -> int:
    info = next(o for o in model.graph.output if o.name == output)
    return int(info.type.tensor_type.shape.dim[1].dim_value)
