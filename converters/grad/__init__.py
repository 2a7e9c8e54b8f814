"""Reverse-mode autodiff over ONNX that emits only standard ``ai.onnx`` ops.

``differentiate`` appends d objective / d input to any graph. The attack graph of the contract
(preprocessing + model + head, then this gradient) is built by
:func:`uncnn_rt.converters.attack_graph.build_attack_graph`.
"""

from uncnn_rt.converters.grad.driver import OPSET, differentiate
from uncnn_rt.converters.grad.registry import RULES, UnsupportedOpError, grad_rule

__all__ = [
    "OPSET",
    "RULES",
    "UnsupportedOpError",
    "differentiate",
    "grad_rule",
]
