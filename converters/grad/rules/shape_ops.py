"""Ops that move or copy values without arithmetic: their gradients route ``dy`` back."""

from __future__ import annotations

import onnx

from uncnn_rt.converters.grad.registry import GradContext, grad_rule

Grads = list[str | None]


@grad_rule("Identity")
def identity(ctx: GradContext, node: onnx.NodeProto, dys: Grads) -> Grads:
    return [dys[0]]
