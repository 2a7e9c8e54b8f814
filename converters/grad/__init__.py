"""Reverse-mode autodiff over ONNX that emits only standard ``ai.onnx`` ops.

``differentiate`` appends d objective / d input to any graph; ``build_attack_graph`` folds a model's
preprocessing and head in and emits the attack graph of the contract in ``uncnn_rt.runtime.contract``.
"""

from uncnn_rt.converters.grad.assemble import build_attack_graph, resize_matrix
from uncnn_rt.converters.grad.driver import OPSET, differentiate
from uncnn_rt.converters.grad.registry import RULES, UnsupportedOpError, grad_rule

__all__ = [
    "OPSET",
    "RULES",
    "UnsupportedOpError",
    "build_attack_graph",
    "differentiate",
    "grad_rule",
    "resize_matrix",
]
