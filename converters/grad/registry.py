"""The gradient-rule table and the context every rule builds its nodes through.

A rule is registered per ONNX op type with ``@grad_rule("Conv")``. It receives the forward node and
the names of the gradients that reach its outputs, and returns one gradient name per input, or
``None`` for inputs that need none (weights, shapes, indices). Rules only *emit* ONNX nodes through
:class:`GradContext`; the driver (``driver.py``) owns topology, accumulation and pruning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uncnn_rt.runtime.errors import ModelError

Shape = tuple[int | None, ...]
"""A static shape as shape inference found it; ``None`` marks a dynamic dimension (the batch)."""

GradRule = Callable[["GradContext", onnx.NodeProto, list[str | None]], Sequence[str | None]]

RULES: dict[str, GradRule] = {}

# Ops whose outputs never carry a gradient: they read shapes or produce integers/booleans.
NON_DIFFERENTIABLE: frozenset[str] = frozenset(
    {
        "Shape", "Size", "ConstantOfShape", "Range", "NonZero", "ArgMax", "ArgMin", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Sign",
        "Floor", "Ceil", "Round", "EyeLike", "RandomNormalLike", "RandomUniformLike",
    }
)  # fmt: skip

FLOAT_TYPES: frozenset[int] = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16})

# Ops that onnxruntime's CPU provider runs on its blocked NCHWc layout (nchwc_transformer.cc).
_LAYOUT_AWARE: frozenset[str] = frozenset(
    {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Sum", "Concat", "Relu"}
)
_STEP_SCALE = 2.0**100  # the slope of GradContext.step's ramp: a power of two, so t * scale is exact


def grad_rule(*op_types: str) -> Callable[[GradRule], GradRule]:
    """Register ``fn`` as the gradient rule of each op type in ``op_types``."""

    def register(fn: GradRule) -> GradRule:
        for op_type in op_types:
            if op_type in RULES:
                raise RuntimeError(f"two gradient rules registered for {op_type}")
            RULES[op_type] = fn
        return fn

    return register


class UnsupportedOpError(ModelError):
    """The graph holds an op (or an attribute value of an op) that has no gradient rule."""

    def __init__(self, node: onnx.NodeProto, reason: str | None = None) -> None:
        where = f"{node.op_type} node {node.name or '(unnamed)'!r} (outputs {list(node.output)})"
        if reason is None:
            supported = ", ".join(sorted(RULES))
            message = f"no gradient rule for op {where}; supported ops: {supported}"
        else:
            message = f"unsupported {where}: {reason}"
        super().__init__(message)
        self.op_type = node.op_type
        self.node_name = node.name


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes as Python values (ints, floats, lists, bytes -> str)."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        out[attr.name] = value
    return out


class GradContext:
    """Everything a rule may ask of the graph: shapes, constant values, and node emission.

    ``emit`` appends nodes to the gradient graph with unique names. Constants are created in the
    dtype of the tensor they combine with (``like=``), so one rule serves float32 and float64.
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        shapes: dict[str, Shape],
        elem_types: dict[str, int],
        constants: dict[str, np.ndarray],
        requires_grad: set[str],
    ) -> None:
        self.graph = graph
        self._shapes = shapes
        self._elem_types = elem_types
        self._constants = constants
        self._requires_grad = requires_grad
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._used_names: set[str] = _all_names(graph)
        self._shape_cache: dict[str, str] = {}
        self._step_constants: dict[tuple[int, float, float], tuple[str, str]] = {}
        self._producers: dict[str, onnx.NodeProto] = {}
        self._readers: dict[str, list[onnx.NodeProto]] | None = None
        self._counter = 0

    # --- what the forward graph knows -------------------------------------------------------
    def needs_grad(self, name: str) -> bool:
        """Whether ``name`` depends on the differentiated input (weights and shapes do not)."""
        return name in self._requires_grad

    def shape(self, name: str) -> Shape:
        if name not in self._shapes:
            raise ModelError(f"shape inference found no shape for tensor {name!r}")
        return self._shapes[name]

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def static_shape(self, name: str, node: onnx.NodeProto) -> tuple[int, ...]:
        """The shape of ``name`` with every dimension known; a dynamic one is an error of ``node``."""
        shape = self.shape(name)
        if any(d is None for d in shape):
            raise UnsupportedOpError(
                node, f"tensor {name!r} has dynamic shape {shape}; this rule needs it static"
            )
        return tuple(int(d) for d in shape if d is not None)

    def elem_type(self, name: str) -> int:
        return self._elem_types[name]

    def np_dtype(self, name: str) -> np.dtype[Any]:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type(name)))

    def value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is a constant (initializer, Constant or folded), else None."""
        return self._constants.get(name)

    def require_value(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
        value = self.value(name)
        if value is None:
            raise UnsupportedOpError(node, f"{what} ({name!r}) must be a constant")
        return value

    # --- building the gradient graph --------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor/node name not used anywhere in the graph."""
        while True:
            self._counter += 1
            name = f"grad/{hint}_{self._counter}"
            if name not in self._used_names:
                self._used_names.add(name)
                return name

    def emit(self, op_type: str, inputs: Sequence[str], outputs: int = 1, **attrs: Any) -> str:
        """Append one node and return its (first) output name."""
        return self.emit_multi(op_type, inputs, outputs, **attrs)[0]

    def emit_multi(self, op_type: str, inputs: Sequence[str], outputs: int, **attrs: Any) -> list[str]:
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        node = helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type), **attrs)
        self.nodes.append(node)
        return names

    def const(
        self, value: np.ndarray | float | Sequence[float], *, like: str | None = None, hint: str = "c"
    ) -> str:
        """A float initializer holding ``value`` in the dtype of tensor ``like`` (float32 without one)."""
        dtype = self.np_dtype(like) if like is not None else np.dtype(np.float32)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        """An int64 1-D constant (axes, shapes, pads)."""
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(list(values), dtype=np.int64), name))
        return name

    def shape_of(self, name: str) -> str:
        """A runtime ``Shape(name)`` tensor, emitted once per tensor."""
        if name not in self._shape_cache:
            self._shape_cache[name] = self.emit("Shape", [name])
        return self._shape_cache[name]

    def filled_like(self, name: str, value: float) -> str:
        """A tensor of ``name``'s runtime shape and dtype, every element ``value``."""
        fill = numpy_helper.from_array(np.full((1,), value, dtype=self.np_dtype(name)))
        return self.emit("ConstantOfShape", [self.shape_of(name)], value=fill)

    def zeros_like(self, name: str) -> str:
        return self.filled_like(name, 0.0)

    def blocked(self, node: onnx.NodeProto) -> bool:
        """Whether the maps around activation ``node`` can stay in onnxruntime's blocked CPU layout.

        onnxruntime keeps a float32 ``[N, C, H, W]`` map in NCHWc (blocks of 8 channels with AVX2, 16
        with AVX-512) while only layout-aware ops touch it: Conv (with a fused activation), pools, Add,
        Sum, Concat, Relu, and Mul of two same-shaped maps. That holds here when ``node`` reads a
        blocked Conv's output (:meth:`_after_conv`), every reader of its output is such an op (a Conv
        that runs blocked, :meth:`_blocked_conv`), and ``C`` is a multiple of 16. Then
        its gradient is best built from those ops too (:meth:`step`); elsewhere the maps are reordered
        anyway, and a comparison is cheaper than the Conv that would replace it.
        """
        y = node.output[0]
        shape = self.shape(y)
        if self.elem_type(y) != TensorProto.FLOAT or len(shape) != 4 or shape[1] is None or shape[1] % 16:
            return False
        if self._readers is None:
            self._producers = {o: n for n in self.graph.node for o in n.output}
            self._readers = {}
            for n in self.graph.node:
                for name in n.input:
                    self._readers.setdefault(name, []).append(n)
        readers = self._readers.get(y, [])
        return (
            self._after_conv(node.input[0])
            and bool(readers)
            and all(
                r.op_type in _LAYOUT_AWARE and (r.op_type != "Conv" or self._blocked_conv(r)) for r in readers
            )
        )

    def _blocked_conv(self, node: onnx.NodeProto) -> bool:
        """Whether onnxruntime runs Conv ``node`` blocked: a constant 4-D weight with 16k output channels
        and fewer than 8 or 16k input channels per group (the AVX-512 rule; AVX2 blocks by 8)."""
        weight = self.value(node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.ndim != 4:
            return False
        return weight.shape[0] % 16 == 0 and (weight.shape[1] < 8 or weight.shape[1] % 16 == 0)

    def _after_conv(self, name: str) -> bool:
        """Whether ``name`` is a Conv's output, possibly through Mul/Add by constants that onnxruntime
        folds into that Conv's weights (an unfolded batch norm), each read only by the next."""
        assert self._readers is not None
        producer = self._producers.get(name)
        while producer is not None and producer.op_type in ("Mul", "Add") and len(producer.input) == 2:
            variable = [n for n in producer.input if self.value(n) is None]
            if len(variable) != 1 or len(self._readers.get(variable[0], [])) != 1:
                return False
            producer = self._producers.get(variable[0])
        return producer is not None and producer.op_type == "Conv" and self._blocked_conv(producer)

    def step(self, name: str, threshold: float, *, above: bool, blocked: bool) -> str:
        """The float mask ``[name > threshold]`` (``above``) or ``[name < threshold]``, shaped like ``name``.

        With ``blocked`` (:meth:`blocked` of the activation ``name`` belongs to) it is a depthwise 1x1
        Conv (weight ``+-2^100``, bias ``-+2^100 threshold``) clipped to [0, 1]. onnxruntime fuses the clip
        into the Conv and keeps it, the Mul that applies it and the convolutions around them in its
        blocked (NCHWc) layout, where a comparison and a Cast are not layout-aware and force a reorder
        on both sides (about 40% of a batch-8 step of a MobileNet went to those). The values match the
        comparison: ``2^100 t - 2^100 c`` has the sign of ``t - c`` (an IEEE sum is exact in sign), so
        the clip gives exactly 0 or 1 except where ``0 < |t - c| < 2^-100`` (8e-31: in float32 only
        a ``t`` that tiny at a zero threshold), and an overflow to infinity clips to the right end.
        Elsewhere, or for thresholds beyond ``2^26``, it is ``Cast(Greater/Less)``.
        """
        if blocked and abs(threshold) <= 2.0**26:
            channels = int(self.shape(name)[1] or 0)
            scale = _STEP_SCALE if above else -_STEP_SCALE
            key = (channels, scale, threshold)
            if key not in self._step_constants:  # one pair per distinct step, however many use it
                self._step_constants[key] = (
                    self.const(np.full((channels, 1, 1, 1), scale), like=name, hint="step_w"),
                    self.const(np.full((channels,), -scale * threshold), like=name, hint="step_b"),
                )
            weight, bias = self._step_constants[key]
            ramp = self.emit("Conv", [name, weight, bias], group=channels, kernel_shape=[1, 1])
            return self.emit("Clip", [ramp, self.const(0.0, like=name), self.const(1.0, like=name)])
        bound = self.const(threshold, like=name)
        compare = self.emit("Greater" if above else "Less", [name, bound])
        # Mul by a cast mask runs several times faster than Where in onnxruntime.
        return self.emit("Cast", [compare], to=self.elem_type(name))

    def forward_output(self, node: onnx.NodeProto, index: int) -> str:
        """Name of the forward node's optional output ``index`` (e.g. MaxPool indices); added if absent."""
        while len(node.output) <= index:
            node.output.append("")
        if not node.output[index]:
            node.output[index] = self.fresh(f"{node.op_type.lower()}_out{index}")
        return node.output[index]

    def unbroadcast(self, grad: str, *, like: str, to: str, node: onnx.NodeProto) -> str:
        """Sum ``grad`` (shaped like forward tensor ``like``, a broadcast result) down to ``to``'s shape."""
        grad_shape, target_shape = self.shape(like), self.shape(to)
        lead = len(grad_shape) - len(target_shape)
        axes = list(range(lead))
        for i, dim in enumerate(target_shape):
            if dim == grad_shape[lead + i]:
                continue
            if dim != 1:
                raise UnsupportedOpError(
                    node,
                    f"cannot un-broadcast a gradient of shape {grad_shape} to {to!r} of shape {target_shape}",
                )
            axes.append(lead + i)
        if not axes:
            return grad
        reduced = self.emit("ReduceSum", [grad, self.ints(axes, "axes")], keepdims=1)
        if lead:
            reduced = self.emit("Reshape", [reduced, self.shape_of(to)])
        return reduced


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names
