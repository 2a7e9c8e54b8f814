"""The layout pass (``converters/grad/ort_layout.py``): where it rewrites the rules' plain masks, what it
emits instead, and that the gradient keeps its values with the pass on and off."""

from __future__ import annotations

import tempfile
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from harness import tensor_type
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.converters.grad.driver import OPSET, differentiate


def _model(nodes, dtype, x_shape, outputs, initializers=()) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", tensor_type(dtype), x_shape)]
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs]
    graph = helper.make_graph(nodes, "layout_test", inputs, outs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.output}
    del model.graph.output[:]
    model.graph.output.extend(inferred[o] for o in outputs)
    return model


def _emitted(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.name.startswith("grad/")]


def _ort_grad(model: onnx.ModelProto, x: np.ndarray, *, optimise: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(["grad"], {"x": x})[0]


def _conv_activation_stack(activation: str, channels: int = 16, layers: int = 3) -> onnx.ModelProto:
    """objective[n] = sum(Conv(Conv->activation, ``layers`` times) * r), x [N, channels, 8, 8], N dynamic."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, 3, 3)) * 0.2).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        if activation == "Relu6":
            inits += [numpy_helper.from_array(np.array(v, np.float32), f"b{i}{v}") for v in (0, 6)]
            nodes.append(helper.make_node("Clip", [f"c{i}", f"b{i}0", f"b{i}6"], [f"a{i}"]))
        elif activation == "PRelu":
            slope = rng.uniform(0.05, 0.5, (channels, 1, 1)).astype(np.float32)
            inits.append(numpy_helper.from_array(slope, f"s{i}"))
            nodes.append(helper.make_node("PRelu", [f"c{i}", f"s{i}"], [f"a{i}"]))
        else:
            nodes.append(helper.make_node(activation, [f"c{i}"], [f"a{i}"]))
        current = f"a{i}"
    # a last Conv, so that every activation sits between two (the case the layout pass looks for)
    inits.append(
        numpy_helper.from_array(
            (rng.standard_normal((channels, channels, 1, 1)) * 0.2).astype(np.float32), "wl"
        )
    )
    inits.append(numpy_helper.from_array(rng.standard_normal((1, channels, 8, 8)).astype(np.float32), "r"))
    nodes += [
        helper.make_node("Conv", [current, "wl"], ["last"]),
        helper.make_node("Mul", ["last", "r"], ["yr"]),
        helper.make_node("ReduceSum", ["yr", "axes"], ["objective"], keepdims=0),
    ]
    inits.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"))
    return _model(nodes, np.float32, ["N", channels, 8, 8], ["objective"], inits)


@pytest.mark.parametrize("activation", ["Relu", "Relu6"])
def test_activation_masks_stay_in_onnxruntimes_blocked_layout(activation: str) -> None:
    # A comparison + Cast mask, a ConvTranspose, or a gradient whose batch dimension shape inference
    # cannot prove equal to the forward one, each make onnxruntime's NCHWc pass reorder around every
    # layer (two reorders or more each: 12+ here). With step masks, stride-1 convolutions differentiated
    # as Convs, and declared gradient shapes, only the ends are reordered: the input, the forward
    # output, the last layer's masks against the objective's plain-layout gradient, and dx. (On a CPU
    # where the pass does not run there are none.)
    layers = 6
    model = differentiate(_conv_activation_stack(activation, layers=layers), wrt="x", objective="objective")
    assert not any(n.op_type in ("Greater", "Less", "Cast") for n in _emitted(model))
    emitted = {o for n in _emitted(model) for o in n.output}
    declared = [
        [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in model.graph.value_info
        if vi.name in emitted
    ]
    maps = [dims for dims in declared if len(dims) == 4]
    assert len(maps) >= layers, "the gradient reaching each activation has a declared shape"
    assert all(dims == ["N", 16, 8, 8] for dims in maps), maps
    assert ["N"] in declared  # the seed: ones shaped like the per-sample objective
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with_layout = onnx.load(options.optimized_model_filepath)
    reorders = [n for n in with_layout.graph.node if n.op_type in ("ReorderInput", "ReorderOutput")]
    assert len(reorders) <= 6 < 2 * layers, [n.op_type for n in with_layout.graph.node]


@pytest.mark.parametrize("activation", ["Relu", "Relu6", "PRelu"])
def test_step_masks_match_the_comparison_at_the_edges(activation: str) -> None:
    # x sits exactly on, and one float32 ulp either side of, each kink; the gradient must be exactly
    # what the comparison mask gives: weight * [0 < x (< 6)] (PRelu: slope below 0). Identity depthwise
    # Convs around the activation (exact: one product by 1 per value) make it take the Conv step.
    channels = 16
    values = np.array(
        [0.0, -0.0, 1e-30, -1e-30, 6.0, np.nextafter(np.float32(6), np.float32(0)),
         np.nextafter(np.float32(6), np.float32(7)), 1e30, -1e30, 3.0, -3.0, 1e-19], np.float32,
    )  # fmt: skip
    x = np.resize(values, (2, channels, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(1)
    slope = rng.uniform(0.05, 0.5, (channels, 1, 1)).astype(np.float32)
    r = rng.standard_normal((1, channels, 8, 8)).astype(np.float32)
    if activation == "Relu6":
        bounds = [numpy_helper.from_array(np.array(v, np.float32), f"b{v}") for v in (0, 6)]
        node = helper.make_node("Clip", ["c", "b0", "b6"], ["a"])
        local = ((x > 0) & (x < 6)).astype(np.float32)
        inits = bounds
    elif activation == "PRelu":
        node = helper.make_node("PRelu", ["c", "s"], ["a"])
        local = np.where(x > 0, np.float32(1), slope).astype(np.float32)
        inits = [numpy_helper.from_array(slope, "s")]
    else:
        node = helper.make_node("Relu", ["c"], ["a"])
        local = (x > 0).astype(np.float32)
        inits = []
    depthwise = {"group": channels, "kernel_shape": [1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "one"], ["c"], **depthwise),
        node,
        helper.make_node("Conv", ["a", "one"], ["ca"], **depthwise),
        helper.make_node("Mul", ["ca", "r"], ["ar"]),
        helper.make_node("ReduceSum", ["ar", "axes"], ["objective"], keepdims=0),
    ]
    inits += [numpy_helper.from_array(r, "r"), numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")]
    inits.append(numpy_helper.from_array(np.ones((channels, 1, 1, 1), np.float32), "one"))
    model = differentiate(
        _model(nodes, np.float32, ["N", channels, 8, 8], ["objective"], inits), wrt="x", objective="objective"
    )
    assert not any(n.op_type in ("Greater", "Less") for n in _emitted(model)), "took the Conv step"
    np.testing.assert_array_equal(_ort_grad(model, x), r * local)


def test_activations_outside_convolution_chains_keep_the_comparison() -> None:
    # Relu on a graph input, read by a broadcast Mul: the maps are reordered around it anyway, so the
    # pass leaves the mask a comparison, cheaper than a Conv there.
    r = np.random.default_rng(0).standard_normal((1, 16, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Mul", ["a", "r"], ["ar"]),
        helper.make_node("ReduceSum", ["ar", "axes"], ["objective"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(r, "r"), numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")]
    model = differentiate(
        _model(nodes, np.float32, ["N", 16, 4, 4], ["objective"], inits), wrt="x", objective="objective"
    )
    assert [n.op_type for n in _emitted(model) if n.op_type in ("Greater", "Conv")] == ["Greater"]
    x = np.random.default_rng(1).standard_normal((2, 16, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_ort_grad(model, x), np.broadcast_to(r, x.shape) * (x > 0))


# What the pass does to one node's gradient, by op type: (ops it removes, ops it adds).
REWRITES = {
    "Relu": (Counter({"Greater": 1, "Cast": 1}), Counter({"Conv": 1, "Clip": 1})),
    "Relu6": (
        Counter({"Greater": 1, "Less": 1, "And": 1, "Cast": 1}),
        Counter({"Conv": 2, "Clip": 2, "Mul": 1}),
    ),
    "PRelu": (Counter({"Greater": 1, "Cast": 1, "Mul": 1, "Add": 1}), Counter({"Conv": 2, "Clip": 1})),
}
DENSE_CONV = (Counter({"ConvTranspose": 1}), Counter({"Transpose": 1, "Slice": 1, "Conv": 1}))


def _op_types(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in _emitted(model))


@pytest.mark.parametrize("activation", sorted(REWRITES))
@pytest.mark.parametrize("channels", [16, 8])
def test_pass_rewrites_each_blocked_activation_and_keeps_the_gradient(activation: str, channels: int) -> None:
    # With 16 channels every activation sits between blocked convolutions and the pass rewrites its mask;
    # with 8 it leaves the masks alone. Every 3x3 convolution's ConvTranspose becomes a Conv either way.
    # The values are those of the plain rules, to the rounding of the convolutions' sums, whose order
    # differs between a ConvTranspose and a Conv and between onnxruntime's plain and blocked kernels.
    layers = 3
    source = _conv_activation_stack(activation, channels=channels, layers=layers)
    plain = differentiate(source, wrt="x", objective="objective", ort_layout=False)
    shaped = differentiate(source, wrt="x", objective="objective")
    removed, added = DENSE_CONV[0].copy(), DENSE_CONV[1].copy()
    if channels % 16 == 0:
        removed += REWRITES[activation][0]
        added += REWRITES[activation][1]
    assert _op_types(plain) - _op_types(shaped) == Counter({k: layers * v for k, v in removed.items()})
    assert _op_types(shaped) - _op_types(plain) == Counter({k: layers * v for k, v in added.items()})
    x = np.random.default_rng(2).standard_normal((2, channels, 8, 8)).astype(np.float32)
    for optimise in (False, True):
        expected = _ort_grad(plain, x, optimise=optimise)
        np.testing.assert_allclose(
            _ort_grad(shaped, x, optimise=optimise), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()
        )


@pytest.mark.convert
@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_reference_nets_keep_their_gradient_with_the_pass(name: str) -> None:
    # The reference nets (conv-BN-ReLU blocks, ReLU6, depthwise convolutions), differentiated with the
    # pass and without: the pass rewrites some masks and convolutions, and the gradients agree.
    pytest.importorskip("torch")
    import reference_nets as nets

    net = nets.resnet(size=32) if name == "resnet" else nets.mobilenet(size=32, hard_ops="explicit")
    source = nets.with_objective(net.onnx, net.kind)
    plain = differentiate(source, wrt="x", objective="objective", ort_layout=False)
    shaped = differentiate(source, wrt="x", objective="objective")
    assert _op_types(shaped)["Clip"] > _op_types(plain)["Clip"], "the pass rewrote no mask"
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)

    def grad(model: onnx.ModelProto, optimise: bool) -> np.ndarray:
        options = ort.SessionOptions()
        if not optimise:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {"x": x, "reference": np.ones((2, nets.embedding_dim(model)), np.float32)}
        return sess.run(["grad"], feeds)[0]

    for optimise in (False, True):
        expected = grad(plain, optimise)
        np.testing.assert_allclose(
            grad(shaped, optimise), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
        )
