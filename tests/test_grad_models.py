"""Whole-model gradients of the builder against independent references: torch autograd and TF GradientTape.

Each net of ``reference_nets`` is differentiated two ways, and both run on onnxruntime (CPU, float32):

* ``differentiate`` on the net's own input ``x`` with the contract's head appended (``with_objective``);
* ``build_attack_graph``: the contract's attack graph, whose input is the RGB 0..255 ``image`` with the
  net's preprocessing (colour order, mean/std, layout) folded in; the canonical size equals the native
  size, so the resize is the identity and the reference applies the same preprocessing by hand.

The reference is the source framework's own model, with the same weights, evaluated in float64:
``features`` (L2-normalised output for face models, log-softmax for classifiers), ``objective`` =
sum(features * reference) per sample, and d objective / d input from autograd / GradientTape.

Tolerances, float32 ONNX against float64 reference, on a batch of 2 random inputs:

* gradient: cosine similarity >= ``MIN_COSINE`` per sample, and max |g - g_ref| <= ``MAX_REL_ERR`` of
  max |g_ref| per sample;
* features and objective: max |f - f_ref| <= ``FORWARD_REL_ERR`` of max |f_ref| (plus ``FORWARD_ATOL``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import reference_nets as nets

from uncnn_rt.converters.grad import RULES
from uncnn_rt.runtime.contract import Preprocessing

MIN_COSINE = 0.9999
MAX_REL_ERR = 1e-3
FORWARD_REL_ERR = 1e-4
FORWARD_ATOL = 1e-6
BATCH = 2

pytestmark = pytest.mark.convert


@dataclass
class Outputs:
    features: np.ndarray  # [N, D]
    objective: np.ndarray  # [N]
    grad: np.ndarray  # like the differentiated input


# --- inputs and comparisons ---------------------------------------------------------------------------


def _references(kind: str, dim: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.normal(size=(BATCH, dim))
    if kind == "face":  # a unit embedding, as the contract prescribes for face models
        r /= np.linalg.norm(r, axis=1, keepdims=True)
    return r.astype(np.float32)


def _run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> Outputs:
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"the gradient graph must use only ai.onnx ops, got domains {domains}"
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    features, objective, grad = sess.run(["features", "objective", "grad"], feeds)
    return Outputs(features, objective, grad)


def _compare(name: str, got: Outputs, want: Outputs) -> None:
    """Assert the tolerances of the module docstring and print the measured errors (``pytest -s``)."""
    for what in ("features", "objective"):
        g, w = getattr(got, what), getattr(want, what)
        assert g.shape == w.shape, f"{name}: {what} shape {g.shape}, reference {w.shape}"
        err = float(np.max(np.abs(g - w)))
        bound = FORWARD_REL_ERR * float(np.max(np.abs(w))) + FORWARD_ATOL
        assert err <= bound, f"{name}: {what} differs from the reference by {err:.3g} (bound {bound:.3g})"
    assert got.grad.shape == want.grad.shape, f"{name}: grad {got.grad.shape}, reference {want.grad.shape}"
    cosines, rel_errs = [], []
    got_flat, want_flat = got.grad.reshape(BATCH, -1).astype(np.float64), want.grad.reshape(BATCH, -1)
    for g, w in zip(got_flat, want_flat, strict=True):
        scale = float(np.max(np.abs(w)))
        assert scale > 0, f"{name}: the reference gradient is zero; the check would prove nothing"
        cosines.append(float(g @ w / (np.linalg.norm(g) * np.linalg.norm(w))))
        rel_errs.append(float(np.max(np.abs(g - w))) / scale)
    print(f"\n{name}: gradient 1 - cosine <= {1 - min(cosines):.1e}, max relative error {max(rel_errs):.1e}")
    assert min(cosines) >= MIN_COSINE, f"{name}: gradient cosines {cosines} (need >= {MIN_COSINE})"
    assert max(rel_errs) <= MAX_REL_ERR, (
        f"{name}: gradient max relative errors {rel_errs} (need <= {MAX_REL_ERR} of the largest magnitude)"
    )


def _preprocess(image: Any, pre: Preprocessing, lib: Any) -> Any:
    """The contract's preprocessing for canonical size == native size and the full crop (no resize):
    RGB 0..255 [N, S, S, 3] -> the model's channel order, (x - mean) / std, its layout."""
    assert pre.crop == (0.0, 0.0, 1.0, 1.0) and pre.native_size[0] == image.shape[1]
    x = lib.reverse_channels(image) if pre.channel_order == "BGR" else image
    x = (x - lib.constant(pre.mean, dtype=x.dtype)) / lib.constant(pre.std, dtype=x.dtype)
    return lib.permute(x, (0, 3, 1, 2)) if pre.layout == "NCHW" else x


# --- torch reference ----------------------------------------------------------------------------------


class _TorchOps:
    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def constant(self, values: Any, dtype: Any) -> Any:
        return self.torch.tensor(values, dtype=dtype)

    def permute(self, x: Any, perm: tuple[int, ...]) -> Any:
        return x.permute(*perm)

    def reverse_channels(self, x: Any) -> Any:
        return self.torch.flip(x, dims=(-1,))


def torch_reference(
    net: nets.ReferenceNet, x: np.ndarray, reference: np.ndarray, preprocessing: Preprocessing | None = None
) -> Outputs:
    """features, objective and d objective / d x with torch autograd in float64."""
    torch = pytest.importorskip("torch")
    from torch.nn import functional as F

    module = copy.deepcopy(net.model).double().eval()
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    inp = _preprocess(xt, preprocessing, _TorchOps(torch)) if preprocessing else xt
    y = module(inp)
    features = F.normalize(y, dim=1) if net.kind == "face" else F.log_softmax(y, dim=1)
    objective = (features * torch.tensor(reference, dtype=torch.float64)).sum(dim=1)
    (grad,) = torch.autograd.grad(objective.sum(), xt)
    return Outputs(features.detach().numpy(), objective.detach().numpy(), grad.numpy())


# --- TensorFlow reference -----------------------------------------------------------------------------


class _TfOps:
    def __init__(self, tf: Any) -> None:
        self.tf = tf

    def constant(self, values: Any, dtype: Any) -> Any:
        return self.tf.constant(values, dtype=dtype)

    def permute(self, x: Any, perm: tuple[int, ...]) -> Any:
        return self.tf.transpose(x, perm)

    def reverse_channels(self, x: Any) -> Any:
        return self.tf.reverse(x, axis=[-1])


def keras_float64(net: nets.ReferenceNet) -> Any:
    """The same Keras InceptionV3 built in float64, holding the float32 model's weights."""
    model = nets.inception_v3(dtype="float64", size=net.native_size)
    model.set_weights([w.astype(np.float64) for w in net.model.get_weights()])
    return model


def tf_reference(
    net: nets.ReferenceNet,
    model64: Any,
    x: np.ndarray,
    reference: np.ndarray,
    preprocessing: Preprocessing | None = None,
) -> Outputs:
    """features, objective and d objective / d x with tf.GradientTape in float64."""
    tf = pytest.importorskip("tensorflow")

    xt = tf.constant(x, dtype=tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        inp = _preprocess(xt, preprocessing, _TfOps(tf)) if preprocessing else xt
        y = model64(inp, training=False)
        features = tf.math.l2_normalize(y, axis=1) if net.kind == "face" else tf.nn.log_softmax(y, axis=1)
        objective = tf.reduce_sum(features * tf.constant(reference, dtype=tf.float64), axis=1)
    grad = tape.gradient(objective, xt)  # the gradient of the sum over the batch, i.e. per sample
    return Outputs(features.numpy(), objective.numpy(), grad.numpy())


# --- fixtures -----------------------------------------------------------------------------------------

TORCH_NETS = {
    # BatchNormalization kept as its own node (the export the ResNet checks use) and folded into the Conv.
    "resnet-batchnorm": lambda: nets.resnet(keep_batchnorm=True),
    "resnet": lambda: nets.resnet(keep_batchnorm=False),
    # Hardswish / Hardsigmoid written as x * relu6(x + 3) / 6, which exports as Clip.
    "mobilenet": lambda: nets.mobilenet(hard_ops="explicit"),
}


@pytest.fixture(scope="module", params=sorted(TORCH_NETS))
def torch_net(request: pytest.FixtureRequest) -> nets.ReferenceNet:
    pytest.importorskip("torch")
    return TORCH_NETS[request.param]()


@pytest.fixture(scope="module")
def inception() -> tuple[nets.ReferenceNet, Any]:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("keras")
    net = nets.inception()
    return net, keras_float64(net)


def _net_input(net: nets.ReferenceNet, rng: np.random.Generator) -> np.ndarray:
    s = net.native_size
    shape = (BATCH, 3, s, s) if net.preprocessing.layout == "NCHW" else (BATCH, s, s, 3)
    return rng.normal(size=shape).astype(np.float32)


def _image(net: nets.ReferenceNet, rng: np.random.Generator) -> np.ndarray:
    s = net.native_size
    return rng.uniform(0.0, 255.0, size=(BATCH, s, s, 3)).astype(np.float32)


# --- torch nets ---------------------------------------------------------------------------------------


def test_torch_net_gradient_matches_autograd(torch_net: nets.ReferenceNet) -> None:
    rng = np.random.default_rng(1)
    model = nets.differentiated(torch_net)
    x = _net_input(torch_net, rng)
    ref = _references(torch_net.kind, nets.embedding_dim(model), rng)
    got = _run_onnx(model, {"x": x, "reference": ref})
    _compare(f"{torch_net.name} (differentiate)", got, torch_reference(torch_net, x, ref))


def test_torch_net_attack_graph_matches_autograd(torch_net: nets.ReferenceNet) -> None:
    rng = np.random.default_rng(2)
    model = nets.attack_graph(torch_net)
    image = _image(torch_net, rng)
    ref = _references(torch_net.kind, nets.embedding_dim(model), rng)
    got = _run_onnx(model, {"image": image, "reference": ref})
    want = torch_reference(torch_net, image, ref, torch_net.preprocessing)
    _compare(f"{torch_net.name} (attack graph)", got, want)


def test_mobilenet_native_hard_ops_match_autograd() -> None:
    """torch exports nn.Hardswish / nn.Hardsigmoid as the ONNX ops HardSwish / HardSigmoid."""
    pytest.importorskip("torch")
    missing = sorted({"HardSwish", "HardSigmoid"} - set(RULES))
    if missing:
        pytest.skip(f"no gradient rule yet for {missing}, which torch's MobileNetV3 exports use")
    net = nets.mobilenet(hard_ops="native")
    ops = {n.op_type for n in net.onnx.graph.node}
    assert {"HardSwish", "HardSigmoid"} <= ops, f"expected the export to use HardSwish/HardSigmoid, got {ops}"
    rng = np.random.default_rng(3)
    model = nets.attack_graph(net)
    image = _image(net, rng)
    ref = _references(net.kind, nets.embedding_dim(model), rng)
    got = _run_onnx(model, {"image": image, "reference": ref})
    _compare(f"{net.name} (attack graph)", got, torch_reference(net, image, ref, net.preprocessing))


# --- Keras InceptionV3 through tf2onnx ----------------------------------------------------------------


@pytest.mark.slow
def test_inception_v3_gradient_matches_gradient_tape(inception: tuple[nets.ReferenceNet, Any]) -> None:
    net, model64 = inception
    rng = np.random.default_rng(4)
    model = nets.differentiated(net)
    x = _net_input(net, rng)
    ref = _references(net.kind, nets.embedding_dim(model), rng)
    got = _run_onnx(model, {"x": x, "reference": ref})
    _compare(f"{net.name} (differentiate)", got, tf_reference(net, model64, x, ref))


@pytest.mark.slow
def test_inception_v3_attack_graph_matches_gradient_tape(inception: tuple[nets.ReferenceNet, Any]) -> None:
    net, model64 = inception
    rng = np.random.default_rng(5)
    model = nets.attack_graph(net)
    image = _image(net, rng)
    ref = _references(net.kind, nets.embedding_dim(model), rng)
    got = _run_onnx(model, {"image": image, "reference": ref})
    _compare(f"{net.name} (attack graph)", got, tf_reference(net, model64, image, ref, net.preprocessing))
