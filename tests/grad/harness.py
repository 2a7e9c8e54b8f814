"""Gradient checks shared by the rule tests: one small model, its attack gradient, finite differences.

A :class:`Case` builds a model with one input ``x`` in a given float dtype. The check adds an objective
``sum(y_i * r_i)`` over every float output (random ``r_i``), differentiates it w.r.t. ``x`` with the
builder, and compares:

1. in float64, with onnx's reference evaluator: the gradient graph against central finite
   differences (step 1e-6) of the forward graph, within ``rtol``/``atol`` (default 1e-5 / 1e-7);
2. in float32, with onnxruntime: the same gradient graph runs on stock onnxruntime and agrees with
   the float64 gradient to 1e-3 of its largest magnitude.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import scipy.special
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as ReferenceConvTranspose

from uncnn_rt.converters.grad.driver import OPSET, differentiate

Builder = Callable[[type[np.floating]], onnx.ModelProto]


@dataclass
class Case:
    """One drawn test model: ``build(dtype)`` returns it; ``x`` is sampled uniformly in [low, high]."""

    build: Builder
    x_shape: tuple[int, ...]
    low: float = -2.0
    high: float = 2.0
    rtol: float = 1e-5
    atol: float = 1e-7
    extra: dict[str, object] = field(default_factory=dict)


def tensor_type(dtype: type[np.floating]) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def one_node(
    op_type: str,
    dtype: type[np.floating],
    x_shape: tuple[int, ...],
    *,
    inputs: list[str | np.ndarray] | None = None,
    n_outputs: int = 1,
    **attrs: object,
) -> onnx.ModelProto:
    """A model with one ``op_type`` node. ``inputs`` lists the node's inputs: ``"x"`` for the graph input,
    arrays for constant initializers (float arrays are cast to ``dtype``), ``""`` for an omitted one."""
    inputs = inputs if inputs is not None else ["x"]
    initializers = []
    names = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            names.append(item)
            continue
        arr = np.asarray(item)
        if arr.dtype.kind == "f":
            arr = arr.astype(dtype)
        name = f"c{i}"
        initializers.append(numpy_helper.from_array(arr, name))
        names.append(name)
    outs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, **attrs)
    return model_of([node], dtype, x_shape, outs, initializers)


def model_of(
    nodes: list[onnx.NodeProto],
    dtype: type[np.floating],
    x_shape: tuple[int, ...],
    outputs: list[str],
    initializers: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info("x", tensor_type(dtype), x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
        initializer=initializers or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    del model.graph.output[:]
    by_name = {vi.name: vi for vi in [*inferred.graph.output, *inferred.graph.value_info]}
    model.graph.output.extend(by_name[o] for o in outputs)
    return model


def with_objective(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """Append ``objective = sum_i sum(y_i * r_i)`` (a scalar) over the model's float outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    terms = []
    float_outs = [
        o for o in g.output if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
    ]
    for i, out in enumerate(float_outs):
        dtype = helper.tensor_dtype_to_np_dtype(out.type.tensor_type.elem_type)
        shape = [d.dim_value for d in out.type.tensor_type.shape.dim]
        r = numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), f"r{i}")
        g.initializer.append(r)
        g.node.append(helper.make_node("Mul", [out.name, f"r{i}"], [f"yr{i}"]))
        g.node.append(helper.make_node("ReduceSum", [f"yr{i}"], [f"t{i}"], keepdims=0))
        terms.append(f"t{i}")
    g.node.append(
        helper.make_node("Sum", terms, ["objective"])
        if len(terms) > 1
        else helper.make_node("Identity", terms, ["objective"])
    )
    elem = float_outs[0].type.tensor_type.elem_type
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("objective", elem, []))
    return model


class _ExactErf(OpRun):
    """onnx's reference Erf is a ~1e-3 approximation; finite differences need the exact function."""

    op_domain = ""

    def _run(self, x):  # type: ignore[no-untyped-def]
        return (scipy.special.erf(x).astype(x.dtype),)


_ExactErf.__name__ = "Erf"


class _GroupedConvTranspose(ReferenceConvTranspose):
    """onnx's reference ConvTranspose slices weights and outputs wrongly when group > 1 (it is right only
    when every group has one input and one output channel); run each group on its own with group=1."""

    op_domain = ""

    def _run(self, X, W, B=None, **attrs):  # type: ignore[no-untyped-def]
        group = attrs.get("group") or 1
        if group == 1:
            return super()._run(X, W, B, **attrs)
        parts = [
            super(_GroupedConvTranspose, self)._run(xg, wg, None, **{**attrs, "group": 1})[0]
            for xg, wg in zip(np.split(X, group, axis=1), np.split(W, group, axis=0), strict=True)
        ]
        y = np.concatenate(parts, axis=1)
        if B is not None:
            y = y + B.reshape(1, -1, *[1] * (y.ndim - 2))
        return (y.astype(X.dtype),)


_GroupedConvTranspose.__name__ = "ConvTranspose"


class _MaxPool(OpRun):
    """onnx's reference MaxPool returns per-channel Indices when strides and dilations are all 1 (the spec,
    and onnxruntime, index the whole N*C*H*W tensor) and misplaces SAME_LOWER windows otherwise."""

    op_domain = ""

    def _run(
        self,
        x,
        auto_pad=None,
        ceil_mode=None,
        dilations=None,
        kernel_shape=None,
        pads=None,  # type: ignore[no-untyped-def]
        storage_order=None,
        strides=None,
    ):
        if storage_order:
            raise NotImplementedError("storage_order=1")
        rank = x.ndim - 2
        strides, dilations = strides or [1] * rank, dilations or [1] * rank
        spans = [(k - 1) * d + 1 for k, d in zip(kernel_shape, dilations, strict=True)]
        auto_pad = auto_pad or "NOTSET"
        begin, out = [], []
        for i, (n, s, span) in enumerate(zip(x.shape[2:], strides, spans, strict=True)):
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                y = -(-n // s)
                total = max((y - 1) * s + span - n, 0)
                begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
            elif auto_pad == "VALID":
                y = (n - span) // s + 1
                begin.append(0)
            else:
                b, e = (pads[i], pads[rank + i]) if pads else (0, 0)
                room = n + b + e - span
                y = (-(-room // s) if ceil_mode else room // s) + 1
                if ceil_mode and (y - 1) * s >= n + b:
                    y -= 1
                begin.append(b)
            out.append(y)
        flat = np.arange(x.size).reshape(x.shape)
        best = np.full((*x.shape[:2], *out), -np.inf, dtype=x.dtype)
        where = np.zeros(best.shape, dtype=np.int64)
        for offsets in np.ndindex(*kernel_shape):
            # window tap `offsets` of output o reads input o * s - begin + offset * d (outside: never wins)
            pos = [
                np.arange(y) * s - b + o * d
                for y, s, b, o, d in zip(out, strides, begin, offsets, dilations, strict=True)
            ]
            inside = np.ones(out, dtype=bool)
            for axis, p in enumerate(pos):
                shape = [1] * rank
                shape[axis] = len(p)
                inside = inside & ((p >= 0) & (p < x.shape[2 + axis])).reshape(shape)
            grid = np.ix_(*[np.clip(p, 0, n - 1) for p, n in zip(pos, x.shape[2:], strict=True)])
            values = np.where(inside, x[(..., *grid)], -np.inf)
            better = values > best
            best = np.where(better, values, best)
            where = np.where(better, flat[(..., *grid)], where)
        return (best.astype(x.dtype), where) if len(self.output) > 1 else (best.astype(x.dtype),)


_MaxPool.__name__ = "MaxPool"


def evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=[_ExactErf, _GroupedConvTranspose, _MaxPool])


def numeric_gradient(model: onnx.ModelProto, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    sess = evaluator(model)
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + h
        plus = float(sess.run(["objective"], {"x": x})[0])
        flat[i] = orig - h
        minus = float(sess.run(["objective"], {"x": x})[0])
        flat[i] = orig
        grad.reshape(-1)[i] = (plus - minus) / (2 * h)
    return grad


def check_case(case: Case, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(case.low, case.high, case.x_shape).astype(np.float64)

    f64 = with_objective(case.build(np.float64), np.random.default_rng(seed + 1))
    g64 = differentiate(f64, wrt="x", objective="objective")
    onnx.checker.check_model(g64, full_check=True)
    analytic = evaluator(g64).run(["grad"], {"x": x})[0]
    numeric = numeric_gradient(f64, x.copy())
    np.testing.assert_allclose(
        analytic,
        numeric,
        rtol=case.rtol,
        atol=case.atol,
        err_msg="gradient graph vs central finite differences (float64)",
    )

    f32 = with_objective(case.build(np.float32), np.random.default_rng(seed + 1))
    g32 = differentiate(f32, wrt="x", objective="objective")
    sess = ort.InferenceSession(g32.SerializeToString(), providers=["CPUExecutionProvider"])
    on_ort = sess.run(["grad"], {"x": x.astype(np.float32)})[0]
    scale = max(float(np.abs(analytic).max()), 1e-6)
    np.testing.assert_allclose(
        on_ort,
        analytic,
        rtol=0,
        atol=1e-3 * scale,
        err_msg="onnxruntime float32 gradient vs reference float64 gradient",
    )
