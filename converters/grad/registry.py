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

    def step(self, name: str, threshold: float, *, above: bool) -> str:
        """The float mask ``[name > threshold]`` (``above``) or ``[name < threshold]``, like ``name``."""
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
